"""Fits PatchCore and evaluates it: ``python -m launch.patchcore --config=... --workdir=...``."""

from absl import app, flags
from ml_collections import config_flags

from wdam_jax import patchcore_run

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (banks, metrics, figures).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    patchcore_run.fit_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
