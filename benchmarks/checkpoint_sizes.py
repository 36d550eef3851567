r"""On-disk size (``du -sh``) of a run's final checkpoint, full and without the optimiser state
(``train.save_final_params_only``), as quoted in WORKSPACE.md ("Checkpoint sizes").

One run is trained to the step before its last, copied, and finished both ways; the sizes do not
depend on the number of steps or the image size (the network, the optimiser and the fitted
statistics do not), so short runs on small images measure the real configs:

  python benchmarks/checkpoint_sizes.py --config=configs/cutpaste_wdam.py:demo \
      --config.train.stage1_steps=1 --config.train.stage2_steps=1 --config.train.stage3_steps=1
"""

import pathlib
import shutil
import subprocess
import tempfile

from absl import flags
from ml_collections import config_flags

from launch import cli
from wdam_jax import checkpoints, train
from wdam_jax.methods.registry import get_method

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Scratch folder (default: a temporary one).")
flags.mark_flags_as_required(["config"])


def _du(path: pathlib.Path) -> str:
    out = subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def main(argv):
    del argv
    checkpoints.quiet_orbax()
    config = _CONFIG.value
    base = pathlib.Path(_WORKDIR.value or tempfile.mkdtemp(prefix="checkpoint_sizes_"))
    total = get_method(config).total_steps
    train.train(config, base / "full", stop_at=total - 1)
    shutil.copytree(base / "full", base / "params_only")
    train.train(config, base / "full")
    config.train.save_final_params_only = True
    train.train(config, base / "params_only")
    for run in ("full", "params_only"):
        step = base / run / checkpoints.CHECKPOINT_DIR / str(total)
        parts = {p.name: _du(p) for p in sorted(step.iterdir()) if p.is_dir()}
        print(f"{run}: {_du(step)} ({', '.join(f'{k} {v}' for k, v in parts.items())})")
    if not _WORKDIR.value:
        shutil.rmtree(base)


if __name__ == "__main__":
    cli.run(main)
