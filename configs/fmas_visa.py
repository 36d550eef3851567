"""FMAS anomaly synthesis on VisA (Sec. 3.1): the MVTec config with VisA's classes and paths.

  python -m launch.synthesize --config=configs/fmas_visa.py
  python -m launch.synthesize --config=configs/fmas_visa.py --shard_index=0 --num_shards=8
  python -m launch.synthesize --config=configs/fmas_visa.py:demo

VisA is read in the MVTec-style (1cls) layout: ``<root>/<category>/train/good/*``.
"""

import ml_collections

from configs import fmas_mvtec

VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """FMAS on VisA; ``arg="demo"`` is the same demo run as ``fmas_mvtec.py:demo``."""
    config = fmas_mvtec.get_config(arg)
    if arg == "demo":
        config.output_dir = "workdirs/fmas_visa_demo"
        config.prompts.cache_dir = "workdirs/fmas_visa_demo/prompts"
        return config
    config.output_dir = "workdirs/fmas_visa"
    config.data.root = "data/visa_1cls"
    config.data.categories = VISA_CATEGORIES
    config.masks.fg_root = "workdirs/foreground_masks/visa"
    return config
