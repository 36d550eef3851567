"""FMAS entry point: synthesise anomalies from normal training images into TFRecords.

  python -m launch.synthesize --config=configs/fmas_mvtec.py [--shard_index=i --num_shards=n]

Runs :func:`synthesis.pipeline.run_fmas`; output goes to ``config.output_dir``. Re-running the
same command resumes an interrupted run.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli
from synthesis.pipeline import run_fmas
from synthesis.writer import ShardBusyError
from wdam_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This worker's index in [0, num_shards).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Number of workers splitting the images.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        manifest = run_fmas(
            _CONFIG.value, shard_index=_SHARD_INDEX.value, num_shards=_NUM_SHARDS.value
        )
    except ShardBusyError as e:  # synthesis/ knows nothing of wdam_jax: reported as one here
        raise UserError(str(e)) from e
    logging.info("FMAS counts: %s", manifest["counts"])


if __name__ == "__main__":
    cli.run(main)
