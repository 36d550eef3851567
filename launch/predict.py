"""Scores new images with a trained run: decisions, normalised scores, overlays (any method).

  python -m launch.predict --workdir=workdirs/cutpaste_wdam_demo \
      --images=workdirs/demo_data/mvtec_demo/washer/test/crack --out=workdirs/predictions_demo
  python -m launch.predict --workdir=W --images='line3/*.png' --out=O --threshold=12.5

Writes ``<out>/predictions.csv``, ``<out>/predictions.json`` and ``<out>/overlays/*.png`` (see
``wdam_jax/predict.py``). The threshold is the one ``launch.evaluate`` stored with the run, unless
``--threshold`` (on the raw image score) is given. ``--out`` is written whole or not at all: a
new or empty folder, or a previous prediction with ``--overwrite``.
"""

from absl import app, flags

from launch import cli
from wdam_jax import checkpoints, predict

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained (and evaluated) run directory.")
_IMAGES = flags.DEFINE_string("images", None, "A folder of images, or a glob (quote it).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Manual image threshold on the raw score.")
_PIXEL_THRESHOLD = flags.DEFINE_float(
    "pixel_threshold", None, "Manual pixel threshold on the raw map."
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Files read and scored at a time.")
_OVERLAYS = flags.DEFINE_bool("overlays", True, "Write one overlay PNG per image.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a previous prediction in --out (whole, once the new one is done)."
)
_SAVE_MAPS = flags.DEFINE_bool(
    "save_maps", False, "Write each raw anomaly map at full resolution to <out>/maps/*.npy."
)
_CHECKPOINT = cli.CheckpointChoice()
flags.mark_flags_as_required(["workdir", "images", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax()
    predict.predict(
        _WORKDIR.value,
        _IMAGES.value,
        _OUT.value,
        threshold=_THRESHOLD.value,
        pixel_threshold=_PIXEL_THRESHOLD.value,
        batch_size=_BATCH_SIZE.value,
        overlays=_OVERLAYS.value,
        overwrite=_OVERWRITE.value,
        save_maps=_SAVE_MAPS.value,
        **_CHECKPOINT.resolve(),
    )


if __name__ == "__main__":
    cli.run(main, config_flag=None)
