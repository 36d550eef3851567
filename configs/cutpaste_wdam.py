r"""The final model (Table 3, last column): CutPaste + FMAS + FM + WDAM in every layer1 bottleneck.

  python -m launch.train --config=configs/cutpaste_wdam.py --workdir=workdirs/cutpaste_wdam_bottle
  python -m launch.train --config=configs/cutpaste_wdam.py:demo \
      --workdir=workdirs/cutpaste_wdam_demo

``:demo`` is what ``make demo`` runs. The demo data has no FMAS records unless
``python -m launch.synthesize --config=configs/fmas_mvtec.py:demo`` ran, so the demo keeps the
CutPaste class (``data.anomaly_source = "cutpaste"``) with FM and WDAM; pass
``--config.data.anomaly_source=fmas`` once the records exist.
"""

import ml_collections

from configs import cutpaste_fm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """CutPaste + FMAS + FM config with WDAM in layer1 (Sec. 3.3)."""
    config = cutpaste_fm.get_config(arg)
    config.model.wdam_layers = (1,)
    if arg == "demo":
        config.data.anomaly_source = "cutpaste"
    return config
