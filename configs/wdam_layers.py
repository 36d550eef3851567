r"""Table 8: WDAM in one layer of the final model's backbone (0 = none, the baseline row).

  python -m launch.train --config=configs/wdam_layers.py:2 --workdir=workdirs/wdam_layer2_bottle
  python -m launch.train --config=configs/wdam_layers.py:2,demo --workdir=workdirs/wdam_layer2_demo
  for l in 0 1 2 3 4; do python -m launch.train --config=configs/wdam_layers.py:$l \
      --workdir=workdirs/wdam_layer$l; done

The argument is ``<layer>`` or ``<layer>,demo``; ``demo`` alone is layer 1. Everything else is
``configs/cutpaste_wdam.py`` (with its ``:demo`` variant).
"""

import ml_collections

from configs import cutpaste_wdam

LAYERS = (0, 1, 2, 3, 4)
# The arguments --config=<this file>:<arg> accepts ("": layer 1); the launchers check them.
VARIANTS = ("", "demo", *(f"{n}" for n in LAYERS), *(f"{n},demo" for n in LAYERS))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The final-model config with ``model.wdam_layers = (layer,)`` (``()`` for layer 0)."""
    parts = [p for p in (arg or "1").split(",") if p]
    demo = "demo" in parts
    layers = [p for p in parts if p != "demo"] or ["1"]
    if len(layers) != 1 or not layers[0].isdigit() or int(layers[0]) not in LAYERS:
        raise ValueError(f"Config argument {arg!r}: use one of {LAYERS}, optionally ',demo'.")
    config = cutpaste_wdam.get_config("demo" if demo else None)
    layer = int(layers[0])
    config.model.wdam_layers = (layer,) if layer else ()
    return config
