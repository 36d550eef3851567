"""Evaluates a run directory's newest (or a named) checkpoint, for every method.

  python -m launch.evaluate --workdir=workdirs/cutpaste_wdam_demo
  python -m launch.evaluate --workdir=workdirs/cutpaste_wdam_demo --step=80
  python -m launch.evaluate --workdir=workdirs/draem_wdam_demo --checkpoint=best

Writes ``<workdir>/eval/step_<step>/`` (metrics JSON/CSV/markdown, per-image scores, heatmaps,
learning curves) and prints the I-AUROC / P-AUROC / PRO table. The run's config is the one
recorded in the workdir.
"""

from absl import app, flags

from launch import cli
from wdam_jax import checkpoints, evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
_CHECKPOINT = cli.CheckpointChoice()
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax()
    evaluate.evaluate(None, _WORKDIR.value, **_CHECKPOINT.resolve())


if __name__ == "__main__":
    cli.run(main, config_flag=None)
