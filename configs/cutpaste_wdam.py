r"""The final model (Table 3, last column): CutPaste + FMAS + FM + WDAM in every layer1 bottleneck.

  python -m launch.train --config=configs/cutpaste_wdam.py --workdir=workdirs/cutpaste_wdam_bottle
  python -m launch.train --config=configs/cutpaste_wdam.py:demo \
      --workdir=workdirs/cutpaste_wdam_demo

``:demo`` is what ``make demo`` runs. Your own images (MVTec layout), from scratch on a CPU, without
FMAS, foreground masks or ImageNet weights:

  python -m launch.train --config=configs/cutpaste_wdam.py:custom --workdir=runs/mine \
      --config.data.root=my_images --config.data.category=my_product

The demo data has no FMAS records unless
``python -m launch.synthesize --config=configs/fmas_mvtec.py:demo`` ran, so the demo keeps the
CutPaste class (``data.anomaly_source = "cutpaste"``) with FM and WDAM; pass
``--config.data.anomaly_source=fmas`` once the records exist.
"""

import ml_collections

from configs import cutpaste, cutpaste_fm

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo", "custom")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """CutPaste + FMAS + FM config with WDAM in layer1 (Sec. 3.3); ``:custom`` is CutPaste + WDAM
    on your own images (see ``configs/cutpaste.py`` ``apply_custom``)."""
    if arg == "custom":
        config = cutpaste.get_config("custom")
        config.model.wdam_layers = (1,)
        return config
    config = cutpaste_fm.get_config(arg)
    config.model.wdam_layers = (1,)
    if arg == "demo":
        config.data.anomaly_source = "cutpaste"
    return config
