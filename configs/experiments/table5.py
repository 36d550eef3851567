r"""Table 5: DRAEM and DRAEM + WDAM on MVTec AD (I-AUROC, P-AUROC), 15 categories.

  python -m launch.experiment --config=configs/experiments/table5.py --workdir=workdirs/table5
  python -m launch.experiment --config=configs/experiments/table5.py:demo \
      --workdir=workdirs/table5_demo

Rows: ``configs/draem.py`` (the official DRAEM hyperparameters) and ``configs/draem_wdam.py``
(WDAM after the first three encoder blocks, the paper's "Final Model"). One seed: the paper does
not say Table 5 averages several, and a DRAEM run is long; ``--config.seeds='(0, 1, 2)'`` for
three. CFLOW-AD, MSTUnet, MambaAD and DRAEM+SSPCAB are quoted competitors, in
``table5_paper.json`` only.
"""

import ml_collections

from configs.experiments import common
from configs.fmas_mvtec import MVTEC_CATEGORIES

VARIANTS = common.VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    demo = common.parse_demo(arg)
    config = common.experiment(
        "Table 5",
        "table5_paper.json",
        section="MVTec AD",
        categories=common.DEMO_CATEGORIES if demo else MVTEC_CATEGORIES,
        data_root=common.DEMO_ROOT if demo else common.MVTEC_ROOT,
        seeds=common.DEMO_SEEDS if demo else (0,),
    )
    config.metrics = ("i_auroc", "p_auroc")
    config.rows.draem = common.row("DRAEM", common.spec("draem", "", demo), paper_column="DRAEM")
    config.rows.draem_wdam = common.row(
        "+WDAM (Final Model)", common.spec("draem_wdam", "", demo), paper_column="Final Model"
    )
    config.order = ("draem", "draem_wdam")
    return config
