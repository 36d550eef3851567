"""Pixel metrics of a run at the masks' original resolution and at the method's own resolution.

  python -m launch.pixel_resolution --workdir=workdirs/patchcore_demo
  python -m launch.pixel_resolution --workdir=workdirs/draem_demo --checkpoint=best

Prints P-AUROC and PRO both ways and their difference (``wdam_jax/analysis/pixel_resolution.py``;
the reported numbers are the original-resolution ones, the MVTec AD protocol).
"""

import json

from absl import app, flags

from launch import cli
from wdam_jax import checkpoints
from wdam_jax.analysis import pixel_resolution

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_CHECKPOINT = cli.CheckpointChoice()
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoints.quiet_orbax()
    result = pixel_resolution.compare_resolutions(_WORKDIR.value, **_CHECKPOINT.resolve())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main, config_flag=None)
