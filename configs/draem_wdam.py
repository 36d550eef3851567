r"""DRAEM + WDAM (Table 5, "Final Model"): WDAM after the first three of the reconstructive
encoder's five blocks (Sec. 4.2).

  python -m launch.train --config=configs/draem_wdam.py --workdir=workdirs/draem_wdam_bottle \
      --config.data.root=data/mvtec_ad --config.data.category=bottle \
      --config.data.anomaly_source_dir=data/dtd/images
  python -m launch.train --config=configs/draem_wdam.py:demo --workdir=workdirs/draem_wdam_demo
  python -m launch.evaluate --workdir=workdirs/draem_wdam_demo

The paper's Table 5 uses DRAEM's own Perlin anomalies (no FMAS); ``--config.data.anomaly_source=
fmas --config.data.fmas_records=...`` swaps in FMAS samples.
"""

import ml_collections

from configs import draem

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo", "custom")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The DRAEM config with ``model.wdam_blocks = (1, 2, 3)``."""
    config = draem.get_config(arg)
    config.model.wdam_blocks = (1, 2, 3)
    return config
