r"""Table 3: CutPaste and its variants on MVTec AD (I-AUROC, P-AUROC, PRO), 15 categories x 3 seeds.

  python -m launch.experiment --config=configs/experiments/table3.py --workdir=workdirs/table3
  python -m launch.experiment --config=configs/experiments/table3.py --workdir=workdirs/table3 \
      --shard_index=0 --num_shards=4      # one process per GPU or machine, same --workdir
  python -m launch.experiment --config=configs/experiments/table3.py:demo \
      --workdir=workdirs/table3_demo

Rows (cumulative, as the paper's columns): CutPaste, +FMAS, +FM, +WDAM (final model), each the
run config of the same name (``configs/cutpaste*.py``), so a row differs from the previous one in
one component. The CutPaste row runs CutPaste's published schedule, the SGD stage alone
(``configs/cutpaste.py:published``, whose docstring says why that is the paper's first column);
the optional row ``cutpaste_staged`` is the three-stage CutPaste. Table 7's first row prints the
same numbers as this CutPaste column and runs the same config (``configs/experiments/table7.py``).
Three seeds ("All results represent averages across three independent runs"). The FMAS rows need
the FMAS records (``python -m launch.synthesize --config=configs/fmas_mvtec.py``) and the FM rows
the foreground masks it writes.

``:demo`` runs the same rows on two demo categories with one seed; its FMAS rows read the
records of ``python -m synthesis.tiny_models --out_dir=workdirs/tiny_models`` then
``python -m launch.synthesize --config=configs/fmas_mvtec.py:demo`` (tiny stand-in models; the
experiment names the missing records before it trains anything). The demo final model reads them
too (``configs/cutpaste_wdam.py:demo`` alone keeps the CutPaste class).
"""

import ml_collections

from configs.experiments import common
from configs.fmas_mvtec import MVTEC_CATEGORIES

VARIANTS = common.VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    demo = common.parse_demo(arg)
    config = common.experiment(
        "Table 3",
        "table3_paper.json",
        section="MVTec AD",
        categories=common.DEMO_CATEGORIES if demo else MVTEC_CATEGORIES,
        data_root=common.DEMO_ROOT if demo else common.MVTEC_ROOT,
        seeds=common.DEMO_SEEDS if demo else (0, 1, 2),
    )
    final_overrides = {"data": {"anomaly_source": "fmas"}} if demo else {}
    # CutPaste's own schedule (the SGD stage alone) is what the paper's first column is: see
    # configs/cutpaste.py. The three-stage CutPaste, differing from +FMAS in the anomaly source
    # alone, is an extra row: --config.order=cutpaste,cutpaste_staged,fmas,fm,cutpaste_wdam.
    config.rows.cutpaste = common.row(
        "CutPaste", common.spec("cutpaste", "published", demo), paper_column="CutPaste"
    )
    config.rows.cutpaste_staged = common.row(
        "CutPaste (3 stages)", common.spec("cutpaste", "", demo), paper_column="CutPaste"
    )
    config.rows.fmas = common.row(
        "+FMAS", common.spec("cutpaste_fmas", "", demo), paper_column="+FMAS"
    )
    config.rows.fm = common.row("+FM", common.spec("cutpaste_fm", "", demo), paper_column="+FM")
    config.rows.cutpaste_wdam = common.row(
        "+WDAM (Final Model)",
        common.spec("cutpaste_wdam", "", demo),
        paper_column="+WDAM (Final Model)",
        overrides=final_overrides,
    )
    config.order = ("cutpaste", "fmas", "fm", "cutpaste_wdam")
    return config
