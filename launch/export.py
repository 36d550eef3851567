"""Exports a trained run as StableHLO (jax.export) and a TF SavedModel, thresholds as metadata.

  python -m launch.export --workdir=workdirs/cutpaste_wdam_demo --out=workdirs/export_demo

Writes ``<out>/model.stablehlo``, ``<out>/saved_model/``, ``<out>/model.onnx`` (with
``<out>/onnx_scorer.py``, which loads and checks it) and ``<out>/metadata.json`` (see
``wdam_jax/export.py``), with the packages and the Python that load each artefact in
``metadata.json`` under ``loading``, whole or not at all: a new or empty ``--out``, or a previous
export with ``--overwrite``. A run without stored thresholds (run ``launch.evaluate`` first) is
refused with exit code 2 unless ``--allow_no_thresholds``.
"""

from absl import app, flags

from launch import cli
from wdam_jax import checkpoints, export

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run directory.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_SAVED_MODEL = flags.DEFINE_bool("saved_model", True, "Also write the TF SavedModel.")
_ONNX = flags.DEFINE_bool("onnx", True, "Also write model.onnx (opset 17) and onnx_scorer.py.")
_ALLOW_NO_THRESHOLDS = flags.DEFINE_bool(
    "allow_no_thresholds",
    False,
    "Export a run that has no stored thresholds (never evaluated): metadata thresholds null.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a previous export in --out (whole, once the new one is written)."
)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax()
    export.export(
        _WORKDIR.value,
        _OUT.value,
        step=_STEP.value,
        saved_model=_SAVED_MODEL.value,
        onnx=_ONNX.value,
        allow_no_thresholds=_ALLOW_NO_THRESHOLDS.value,
        overwrite=_OVERWRITE.value,
    )


if __name__ == "__main__":
    cli.run(main, config_flag=None)
