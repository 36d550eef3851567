"""Figs. 6 and 7: heatmaps of two or more runs side by side on the same test images.

  python -m launch.compare --workdirs=workdirs/cutpaste_demo,workdirs/cutpaste_wdam_demo \
      --labels=CutPaste,Ours --out=workdirs/compare_demo

Each run scores its test split (the runs must share it); writes ``<out>/compare.png`` (image,
ground truth, one heatmap row per run with a shared colour scale and colour bar, each run's image
score) and ``<out>/compare.json``. ``--images=crack/000.png,good/003.png`` picks the columns.
"""

from absl import app, flags

from launch import cli
from wdam_jax import checkpoints
from wdam_jax.analysis import compare

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Two or more run directories of one category.")
_LABELS = flags.DEFINE_list("labels", [], "Row names, one per run (default: method labels).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Columns (anomalous images first).")
_IMAGES = flags.DEFINE_list("images", [], "Test image path suffixes to show, in order.")
_NORMALIZE = flags.DEFINE_enum(
    "normalize", "minmax", compare.NORMALIZE, "minmax: each run's maps to [0, 1]; none: raw."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: each run's newest).")
flags.mark_flags_as_required(["workdirs", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax()
    paths = compare.compare(
        _WORKDIRS.value,
        out=_OUT.value,
        labels=_LABELS.value,
        num_images=_NUM_IMAGES.value,
        images=_IMAGES.value,
        normalize=_NORMALIZE.value,
        step=_STEP.value,
    )
    print(f"Wrote {paths['png']} and {paths['json']}.")


if __name__ == "__main__":
    cli.run(main, config_flag=None)
