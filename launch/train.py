r"""Trains (or resumes, or fits) a method and evaluates it: the main entry point for every method.

  python -m launch.train --config=configs/cutpaste_wdam.py:demo \
      --workdir=workdirs/cutpaste_wdam_demo
  python -m launch.train --config=configs/cutpaste_wdam.py --workdir=workdirs/wdam_bottle \
      --config.data.root=data/mvtec_ad --config.data.category=bottle
  python -m launch.train --config=configs/patchcore.py:demo --workdir=workdirs/patchcore_demo

Re-running the same command after an interruption resumes from the newest checkpoint. A workdir
made with another config is refused (the differing fields are named) unless
``--allow_config_change`` is given.
"""

from absl import app, flags
from ml_collections import config_flags

from wdam_jax import checkpoints, evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and metrics.")
_ALLOW_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir whose recorded config differs in fields that change the model, data or "
    "schedule (the old config is kept as config.<n>.json).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax()
    evaluate.train_and_evaluate(
        _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value
    )


if __name__ == "__main__":
    app.run(main)
