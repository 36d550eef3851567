r"""The demo study of CutPaste (Table 3's rows on the built-in demo data), with its untrained start.

  python -m launch.experiment --config=configs/experiments/study_cutpaste_demo.py \
      --workdir=workdirs/study_cutpaste_demo
  python -m launch.experiment --config=configs/experiments/study_cutpaste_demo.py:quick \
      --workdir=workdirs/study_cutpaste_quick      # seed 0 on washer and brick

Rows: the CutPaste network untrained (stages 0 / 0 / 0: the step-0 network, scored as ``validate``
scores step 0, with the BatchNorm statistics re-estimated and the Gaussians fitted), CutPaste,
+FM, +WDAM, each ``configs/<row>.py:demo`` as ``make demo`` trains it, on the four demo
categories (two objects' worth of texture and one object) with three seeds. Without FMAS records
for the demo data every row keeps the CutPaste class (``data.anomaly_source="cutpaste"``), so
"+FM" is CutPaste + FM and "+WDAM" is CutPaste + FM + WDAM. Learning curves are off
(``train.eval_every=0``): they change no number in the table.

Each run is an ordinary run folder ``<workdir>/<row>/<category>/seed<k>``; the table is
``<workdir>/results.md`` (mean ± sample std over seeds), rewritten as runs finish.
"""

import ml_collections

from configs.experiments import common

VARIANTS = common.STUDY_VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.demo_study("CutPaste demo study", arg)
    config.overrides.data.anomaly_source = "cutpaste"
    config.overrides.train = ml_collections.ConfigDict({"eval_every": 0})
    untrained = {"train": {"stage1_steps": 0, "stage2_steps": 0, "stage3_steps": 0}}
    config.rows.untrained = common.row("untrained (step 0)", "cutpaste:demo", overrides=untrained)
    config.rows.cutpaste = common.row("CutPaste", "cutpaste:demo")
    config.rows.fm = common.row("+FM", "cutpaste_fm:demo")
    config.rows.wdam = common.row("+WDAM", "cutpaste_wdam:demo")
    config.order = ("untrained", "cutpaste", "fm", "wdam")
    return config
