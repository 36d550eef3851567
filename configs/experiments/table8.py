r"""Table 8: WDAM in one layer of the final model's backbone, MVTec AD, 15 categories x 3 seeds.

  python -m launch.experiment --config=configs/experiments/table8.py --workdir=workdirs/table8
  python -m launch.experiment --config=configs/experiments/table8.py:demo \
      --workdir=workdirs/table8_demo

Rows: ``configs/wdam_layers.py:<layer>`` for layer 0 (no WDAM: the CutPaste + FMAS + FM
baseline, the paper's first row) and layers 1-4 (WDAM in every bottleneck of that layer alone).
The paper gives dataset-level values only, so the paper column fills the mean row. Three seeds,
as Table 3 (the paper does not say for Table 8; its layer-1 row equals Table 3's final model).

``:demo``: two demo categories, one seed, the FMAS records of the demo synthesis (see
``configs/experiments/table3.py``).
"""

import ml_collections

from configs.experiments import common
from configs.fmas_mvtec import MVTEC_CATEGORIES

VARIANTS = common.VARIANTS

LAYERS = (0, 1, 2, 3, 4)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    demo = common.parse_demo(arg)
    config = common.experiment(
        "Table 8",
        "table8_paper.json",
        section="MVTec AD",
        categories=common.DEMO_CATEGORIES if demo else MVTEC_CATEGORIES,
        data_root=common.DEMO_ROOT if demo else common.MVTEC_ROOT,
        seeds=common.DEMO_SEEDS if demo else (0, 1, 2),
    )
    if demo:  # configs/cutpaste_wdam.py:demo keeps the CutPaste class; the table compares FMAS
        config.overrides.data.anomaly_source = "fmas"
    for layer in LAYERS:
        setattr(
            config.rows,
            f"layer{layer}",
            common.row(
                f"WDAM in layer{layer}" if layer else "no WDAM",
                common.spec("wdam_layers", str(layer), demo),
                paper_column=f"layer{layer}" if layer else "none",
            ),
        )
    config.order = tuple(f"layer{layer}" for layer in LAYERS)
    return config
