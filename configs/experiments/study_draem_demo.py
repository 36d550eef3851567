r"""The demo study of DRAEM (Table 5's rows on the built-in demo data).

  python -m launch.experiment --config=configs/experiments/study_draem_demo.py \
      --workdir=workdirs/study_draem_demo

Rows DRAEM and +WDAM, each ``configs/draem*.py:demo`` as it is (its validation phase included,
so each run is scored from its validation-selected checkpoint), on the four demo categories with
three seeds.
"""

import ml_collections

from configs.experiments import common

VARIANTS = common.STUDY_VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.demo_study("DRAEM demo study", arg)
    config.rows.draem = common.row("DRAEM", "draem:demo")
    config.rows.draem_wdam = common.row("+WDAM", "draem_wdam:demo")
    config.order = ("draem", "draem_wdam")
    return config
