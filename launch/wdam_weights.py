"""Table 10: the mean and std of each WDAM module's sub-band weights over a run's test images.

  python -m launch.wdam_weights --workdir=workdirs/cutpaste_wdam_demo
  python -m launch.wdam_weights --workdirs=runs/cutpaste_wdam_bottle,runs/cutpaste_wdam_cable \
      --out=runs/table10

Works for any run with WDAM (CutPaste + WDAM, DRAEM + WDAM, PatchCore with a WDAM member). Writes
``<workdir>/analysis/subband_weights.{md,csv,json,npz,png}`` (one run: ``--out`` if given); with
``--workdirs`` also ``<out>/table10.{md,csv,json}``, the paper's per-category layout.
"""

from absl import app, flags

from launch import cli
from wdam_jax import checkpoints
from wdam_jax.analysis import subband_weights

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory.")
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Several run directories (one per category).")
_OUT = flags.DEFINE_string("out", None, "Output folder (required with --workdirs).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: each run's newest).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if (_WORKDIR.value is None) == (_WORKDIRS.value is None):
        raise app.UsageError("Pass exactly one of --workdir and --workdirs.")
    checkpoints.quiet_orbax()
    workdirs = [_WORKDIR.value] if _WORKDIR.value else _WORKDIRS.value
    subband_weights.analyse(workdirs, out=_OUT.value, step=_STEP.value)


if __name__ == "__main__":
    cli.run(main, config_flag=None)
