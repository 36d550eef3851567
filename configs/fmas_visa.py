"""FMAS anomaly synthesis on VisA (Sec. 3.1): the MVTec config with VisA's classes and paths.

  python -m launch.synthesize --config=configs/fmas_visa.py
  python -m launch.synthesize --config=configs/fmas_visa.py --shard_index=0 --num_shards=8
  python -m launch.synthesize --config=configs/fmas_visa.py:demo

VisA is read in the MVTec-style (1cls) layout: ``<root>/<category>/train/good/*``.
"""

import ml_collections

from configs import fmas_mvtec

# The arguments --config=<this file>:<arg> accepts ("": none); the launchers check them.
VARIANTS = ("", "demo")

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


# A single centre point segments one object, or the gap between objects, where an image holds
# several: candle (four candles), capsules (a group of capsules), macaroni1 and macaroni2 (four
# pieces each) are VisA's "multiple instances" classes (VisA paper's grouping). pcb4 is listed as
# issue 12 found the centre point failing on it (it lands on one part of the board). These use
# the point grid (masks unioned); the single-instance classes (cashew, chewinggum, fryum,
# pipe_fryum) and pcb1-3 keep the centre point. Not checked on the real images here (no VisA).
MULTI_OBJECT_CATEGORIES = ("candle", "capsules", "macaroni1", "macaroni2", "pcb4")


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
    config.sam.multi_object_categories = MULTI_OBJECT_CATEGORIES
    return config
