r"""Trains (or resumes) a method and evaluates it: the main entry point.

  python -m launch.train --config=configs/cutpaste_wdam.py:demo \
      --workdir=workdirs/cutpaste_wdam_demo
  python -m launch.train --config=configs/cutpaste_wdam.py --workdir=workdirs/wdam_bottle \
      --config.data.root=data/mvtec_ad --config.data.category=bottle

Re-running the same command after an interruption resumes from the newest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from wdam_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train.quiet_orbax()
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
