r"""Table 4: CutPaste and its variants on VisA (I-AUROC, P-AUROC), 12 categories x 3 seeds.

  python -m launch.experiment --config=configs/experiments/table4.py --workdir=workdirs/table4
  python -m launch.experiment --config=configs/experiments/table4.py:demo \
      --workdir=workdirs/table4_demo

The rows of Table 3 on VisA in the MVTec-style (1cls, RealNet) layout under ``data/visa_1cls``,
with the VisA FMAS records and foreground masks (``python -m launch.synthesize
--config=configs/fmas_visa.py``). The paper reports I-AUROC and P-AUROC only for this table (PRO
of VisA is in Table 7). EawT and AST are quoted competitors: their published numbers are in
``table4_paper.json``, not run here.

``:demo`` runs the same rows on the demo data (which is MVTec-layout, not VisA).
"""

import ml_collections

from configs.experiments import common, table3
from configs.fmas_visa import VISA_CATEGORIES

VARIANTS = common.VARIANTS

VISA = {
    "dataset": "visa",
    "root": "data/visa_1cls",
    "fmas_records": "workdirs/fmas_visa/fmas-*.tfrecord",
    "foreground_root": "workdirs/foreground_masks/visa",
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    demo = common.parse_demo(arg)
    config = table3.get_config(arg)
    config.table = "Table 4"
    config.paper_values = str(common.HERE / "table4_paper.json")
    config.section = "VisA"
    config.metrics = ("i_auroc", "p_auroc")
    if not demo:
        config.categories = VISA_CATEGORIES
        config.overrides.data = VISA
    return config
