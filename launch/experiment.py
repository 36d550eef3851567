r"""Runs a paper table (rows x categories x seeds) and writes it beside the paper's numbers.

  python -m launch.experiment --config=configs/experiments/table3.py --workdir=workdirs/table3
  python -m launch.experiment --config=configs/experiments/table3.py:demo \
      --workdir=workdirs/table3_demo
  python -m launch.experiment --config=configs/experiments/table3.py --workdir=workdirs/table3 \
      --shard_index=1 --num_shards=4    # one process per GPU; shards are disjoint
  python -m launch.experiment --config=configs/experiments/table3.py --workdir=workdirs/table3 \
      --aggregate_only                   # after every shard finished: the whole table

Each run is an ordinary run directory ``<workdir>/<row>/<category>/seed<k>`` (``launch.evaluate``
reads it). Re-running the same command skips finished runs and resumes an interrupted one from
its newest checkpoint. Results: ``<workdir>/results.{md,csv,json}`` (see
``wdam_jax/experiment.py``).
"""

from absl import app, flags
from ml_collections import config_flags

from launch import cli
from wdam_jax import checkpoints, experiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config (configs/experiments/<table>.py[:demo]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the experiment's runs and results.")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This process's shard, 0-based.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of disjoint shards.")
_AGGREGATE_ONLY = flags.DEFINE_bool(
    "aggregate_only", False, "Run nothing; write the results of the finished runs."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax()
    if _AGGREGATE_ONLY.value:
        experiment.write_results(_CONFIG.value, _WORKDIR.value)
        return
    experiment.run_experiment(
        _CONFIG.value,
        _WORKDIR.value,
        shard_index=_SHARD_INDEX.value,
        num_shards=_NUM_SHARDS.value,
    )


if __name__ == "__main__":
    cli.run(main)
