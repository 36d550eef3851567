r"""Table 7: module ablation (FMAS, WDAM) of CutPaste on MVTec AD and VisA, 3 seeds.

  python -m launch.experiment --config=configs/experiments/table7.py --workdir=workdirs/table7
  python -m launch.experiment --config=configs/experiments/table7.py:demo \
      --workdir=workdirs/table7_demo

Four rows per dataset: CutPaste; FMAS (with FM: the paper treats "FMAS and FM [as] a single
component"), ``configs/cutpaste_fm.py``; WDAM alone (CutPaste's class kept, WDAM in layer1),
``configs/cutpaste.py`` with ``model.wdam_layers=(1,)``; both, ``configs/cutpaste_wdam.py``. The
paper's check marks were lost in its text; the row order is read from the values (see
``table7_paper.json``). The paper gives dataset-level values, so its column fills the mean rows.
VisA rows read ``data/visa_1cls`` and the VisA FMAS records, as Table 4.

Rows 1, 2 and 4 print the same numbers as Table 3's CutPaste, +FM and final columns (MVTec AD)
and Table 4's (VisA), so they are the same runs: row 1 is ``configs/cutpaste.py:published``
(CutPaste's own schedule, the SGD stage alone), exactly Table 3's CutPaste row
(``tests/test_experiment.py`` checks that the three pairs resolve to identical run configs).
The WDAM row cannot share that schedule: WDAM enters training with the Adam stages (see
``configs/cutpaste.py``), so it runs the three stages, as the FMAS rows do. The three-stage
CutPaste without WDAM is the optional row ``<mvtec|visa>_cutpaste_staged``
(``--config.order=...``), the baseline that differs from the WDAM row in WDAM alone.

``:demo``: both sections on two demo categories (the demo data stands in for VisA too), one seed,
the demo FMAS records (see ``configs/experiments/table3.py``).
"""

import ml_collections

from configs.experiments import common, table4
from configs.fmas_mvtec import MVTEC_CATEGORIES
from configs.fmas_visa import VISA_CATEGORIES

VARIANTS = common.VARIANTS

ROWS = (  # slug suffix, label, run config, its argument, paper column, extra overrides
    ("cutpaste", "CutPaste", "cutpaste", "published", "CutPaste", {}),
    ("fmas", "+FMAS (with FM)", "cutpaste_fm", "", "FMAS", {}),
    ("wdam", "+WDAM", "cutpaste", "", "WDAM", {"model": {"wdam_layers": (1,)}}),
    ("final", "+FMAS +WDAM", "cutpaste_wdam", "", "FMAS + WDAM", {}),
)
# Not in config.order: the three-stage CutPaste, WDAM's own baseline.
OPTIONAL_ROWS = (("cutpaste_staged", "CutPaste (3 stages)", "cutpaste", "", "CutPaste", {}),)
OPTIONAL_SUFFIXES = tuple(r[0] for r in OPTIONAL_ROWS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    demo = common.parse_demo(arg)
    config = common.experiment(
        "Table 7",
        "table7_paper.json",
        section="MVTec AD",
        categories=common.DEMO_CATEGORIES if demo else MVTEC_CATEGORIES,
        data_root=common.DEMO_ROOT if demo else common.MVTEC_ROOT,
        seeds=common.DEMO_SEEDS if demo else (0, 1, 2),
    )
    order = []
    for prefix, section in (("mvtec", "MVTec AD"), ("visa", "VisA")):
        for suffix, label, module, module_arg, column, overrides in ROWS + OPTIONAL_ROWS:
            overrides = {k: dict(v) for k, v in overrides.items()}
            if demo and module == "cutpaste_wdam":
                overrides["data"] = {"anomaly_source": "fmas"}
            if prefix == "visa" and not demo:
                overrides["data"] = {**overrides.get("data", {}), **table4.VISA}
            slug = f"{prefix}_{suffix}"
            setattr(
                config.rows,
                slug,
                common.row(
                    label,
                    common.spec(module, module_arg, demo),
                    paper_column=column,
                    section=section,
                    categories=() if prefix == "mvtec" or demo else VISA_CATEGORIES,
                    overrides=overrides,
                ),
            )
            if suffix not in OPTIONAL_SUFFIXES:
                order.append(slug)
    config.order = tuple(order)
    return config
