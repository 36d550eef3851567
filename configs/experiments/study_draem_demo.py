r"""The demo study of DRAEM (Table 5's rows on the built-in demo data).

  python -m launch.experiment --config=configs/experiments/study_draem_demo.py \
      --workdir=workdirs/study_draem_demo

Rows DRAEM and +WDAM, each ``configs/draem*.py:demo`` as it is (its validation phase included,
so each run is scored from its validation-selected checkpoint), on the four demo categories with
three seeds.
"""

import ml_collections

from configs.experiments import common
from configs.experiments.study_cutpaste_demo import CATEGORIES

VARIANTS = ("", "quick")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg not in (None, "", "quick"):
        raise ValueError(f"Unknown argument {arg!r}; use nothing or 'quick'.")
    quick = arg == "quick"  # one seed, an object and a texture: a first look in minutes
    config = common.experiment(
        "DRAEM demo study",
        "",
        section="demo data",
        categories=CATEGORIES[:2] if quick else CATEGORIES,
        data_root=common.DEMO_ROOT,
        seeds=(0,) if quick else (0, 1, 2),
    )
    config.rows.draem = common.row("DRAEM", "draem:demo")
    config.rows.draem_wdam = common.row("+WDAM", "draem_wdam:demo")
    config.order = ("draem", "draem_wdam")
    return config
