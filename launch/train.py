r"""Trains (or resumes, or fits) a method and evaluates it: the main entry point for every method.

  python -m launch.train --config=configs/cutpaste_wdam.py:demo \
      --workdir=workdirs/cutpaste_wdam_demo
  python -m launch.train --config=configs/cutpaste_wdam.py --workdir=workdirs/wdam_bottle \
      --config.data.root=data/mvtec_ad --config.data.category=bottle
  python -m launch.train --config=configs/patchcore.py:demo --workdir=workdirs/patchcore_demo

Re-running the same command after an interruption resumes from the newest checkpoint. A workdir
made with another config is refused (the differing fields are named) unless
``--allow_config_change`` is given.

On N hosts, the same command on each with ``--coordinator_address=HOST0:PORT
--num_processes=N --process_id=<0..N-1>`` and a ``--workdir`` all hosts see
(:mod:`wdam_jax.distributed`); it trains and fits, then ``python -m launch.evaluate`` on one
host evaluates.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli
from wdam_jax import checkpoints, distributed, evaluate, train

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
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host: host:port of process 0's coordinator (or $JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host: number of processes (or $JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host: this process's index, 0..N-1 (or $JAX_PROCESS_ID)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cluster = distributed.resolve(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    distributed.initialize(cluster)
    checkpoints.quiet_orbax()
    if jax.process_count() == 1:
        evaluate.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value
        )
        return
    train.train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value)
    if distributed.is_primary():
        logging.info(
            "Trained on %d processes; evaluate on one host: python -m launch.evaluate --workdir=%s",
            jax.process_count(),
            _WORKDIR.value,
        )


if __name__ == "__main__":
    cli.run(main)
