"""Evaluates a training workdir's newest (or a named) checkpoint: metrics tables and heatmaps.

  python -m launch.evaluate --workdir=workdirs/cutpaste_wdam_demo
  python -m launch.evaluate --workdir=workdirs/cutpaste_wdam_demo --step=80

Writes ``<workdir>/eval/step_<step>/{metrics.json,metrics.csv,metrics.md,heatmaps.png}`` and
prints the I-AUROC / P-AUROC / PRO table. The run's config is the one recorded in the workdir.
"""

from absl import app, flags

from wdam_jax import evaluate, train

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train.quiet_orbax()
    evaluate.evaluate(None, _WORKDIR.value, step=_STEP.value)


if __name__ == "__main__":
    app.run(main)
