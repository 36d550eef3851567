"""Fig. 2: Haar sub-bands (LL, LH, HL, HH) of normal images, of their synthetic anomalous
counterparts, and their difference; one PNG per example.

  python -m launch.subband_figure --config=configs/cutpaste.py:demo --source=scar \
      --out=workdirs/fig2_demo --num_examples=4
  python -m launch.subband_figure --config=configs/draem.py:demo --source=perlin --out=...
  python -m launch.subband_figure --config=configs/cutpaste_fmas.py --source=fmas \
      --records='workdirs/fmas_mvtec/fmas-*.tfrecord' --config.data.category=bottle --out=...

The config names the data (``data.*``, any method's config) and, for ``cutpaste`` / ``scar`` /
``perlin``, the augmentation's ranges (``augment.*`` when it has them). Writes
``<out>/subbands_<source>_<k>.png``.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import cli
from wdam_jax.analysis import subband_figure

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config naming the data.", lock_config=True
)
_SOURCE = flags.DEFINE_enum("source", "scar", subband_figure.SOURCES, "Anomaly source.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_NUM = flags.DEFINE_integer("num_examples", 4, "Examples (first normal training images).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the augmentation.")
_RECORDS = flags.DEFINE_string("records", "", "FMAS TFRecord glob (--source=fmas).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    paths = subband_figure.write_figures(
        _CONFIG.value,
        out=_OUT.value,
        source=_SOURCE.value,
        count=_NUM.value,
        seed=_SEED.value,
        records=_RECORDS.value,
    )
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    cli.run(main)
