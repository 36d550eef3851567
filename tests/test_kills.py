"""Real kills (issue 13, items 1-2): the real command lines started as separate processes, killed
with SIGKILL at random moments, and run again.

- training (tiny CutPaste): after the kills, the same command finishes with parameters, batch
  statistics and optimiser state bitwise equal to an uninterrupted run's (float32, CPU);
- FMAS: two workers into one folder, the second started after the first's records exist (it
  crashed with a segfault when TF was loaded before torch) and killed at random moments while
  it writes; every selected source image ends up exactly once, and every ``*.tfrecord`` present
  after any kill reads whole with TensorFlow's own reader;
- PatchCore (tiny): a killed fit leaves no checkpoint that does not restore whole; evaluating
  after a kill either refuses clearly (no checkpoint yet) or scores a complete bank.

The kill moments are drawn from a seed printed with every failure (``WDAM_KILL_SEED=<n>``
replays it); ``WDAM_KILLS`` sets the kills per scenario (default 2). Subprocesses share the test
session's XLA compilation cache, so only the first run of a program compiles it.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import synthesis_fixtures as sf

from wdam_jax import checkpoints
from wdam_jax.data.tf_setup import import_tensorflow

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("WDAM_KILL_SEED", random.SystemRandom().randrange(2**31)))
KILLS = int(os.environ.get("WDAM_KILLS", "2"))
TIMEOUT_S = 600
XLA_CACHE = pathlib.Path(tempfile.gettempdir()) / "wdam_jax_test_xla_cache"  # conftest's


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(
            pathlib.Path(tempfile.gettempdir()) / "wdam_jax_test_xla_cache"
        ),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.1",
        HF_HUB_OFFLINE="1",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONUNBUFFERED="1",
    )
    return env


def _command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run(command: list[str], *, log: pathlib.Path) -> subprocess.CompletedProcess:
    """Runs ``command`` to its end (output to ``log``)."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
        out.flush()
        return subprocess.run(
            command, cwd=REPO, env=_env(), stdout=out, stderr=out, timeout=TIMEOUT_S, check=False
        )


def kill_at(
    command: list[str], *, ready: Callable[[], bool], delay_s: float, log: pathlib.Path
) -> str:
    """Starts ``command``, waits until ``ready()``, then ``delay_s`` more, then SIGKILLs it (its
    whole process group). Returns what happened: ``"killed"`` or ``"exited <code>"``."""
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(command)}  (to be killed {delay_s:.2f}s after ready)\n".encode())
        out.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, env=_env(), stdout=out, stderr=out, start_new_session=True
        )
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while proc.poll() is None and not ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            end = time.monotonic() + delay_s
            while proc.poll() is None and time.monotonic() < end:
                time.sleep(0.01)
            if proc.poll() is not None:
                return f"exited {proc.returncode}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _tail(log: pathlib.Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:]


def _why(log: pathlib.Path, rng_note: str) -> str:
    return f"WDAM_KILL_SEED={SEED} ({rng_note})\n--- log tail ---\n{_tail(log)}"


def _state_leaves(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    """Every array of a checkpoint's train state, read back by orbax without a target."""
    path = workdir / checkpoints.CHECKPOINT_DIR / str(step) / checkpoints.STATE
    tree = ocp.PyTreeCheckpointer().restore(path)
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / checkpoints.CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


# --------------------------------------------------------------------------------------------
# Training.

TINY_CUTPASTE = [
    "--config=configs/cutpaste.py:demo",
    "--config.model.depths=(1,1,1,1)",
    "--config.model.base_width=8",
    "--config.model.wdam_layers=(1,)",
    "--config.model.head_dims=(16,)",
    "--config.train.batch_size=2",
    "--config.train.stage1_steps=2",
    "--config.train.stage2_steps=2",
    "--config.train.stage3_steps=2",
    "--config.augment.foreground_mask=False",
    "--config.data.image_size=32",
    "--config.train.checkpoint_every=1",
    "--config.train.keep_checkpoints=2",
    "--config.score.eval_batch_size=8",
    "--config.score.num_figures=1",
]
TOTAL_STEPS = 6


def test_training_killed_at_random_moments_ends_as_an_uninterrupted_run(demo_data_root, tmp_path):
    rng = random.Random(SEED)
    log = tmp_path / "log.txt"
    args = [*TINY_CUTPASTE, f"--config.data.root={demo_data_root}"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = run(_command("launch.train", *args, f"--workdir={reference}"), log=log)
    assert done.returncode == 0, _why(log, "reference run")
    notes = []
    for _ in range(KILLS):
        # Once checkpoint k exists, a little later: during a step, a save, the fit or the eval.
        k = rng.randint(1, TOTAL_STEPS - 1)
        delay = rng.uniform(0.0, 1.5)
        what = kill_at(
            _command("launch.train", *args, f"--workdir={killed}"),
            ready=lambda k=k: any(s >= k for s in _steps(killed)),
            delay_s=delay,
            log=log,
        )
        notes.append(f"after checkpoint {k} + {delay:.2f}s: {what}, steps {_steps(killed)}")
        assert what == "killed" or what == "exited 0", _why(log, "; ".join(notes))
    done = run(_command("launch.train", *args, f"--workdir={killed}"), log=log)
    assert done.returncode == 0, _why(log, "; ".join(notes))
    assert _steps(killed)[-1] == _steps(reference)[-1] == TOTAL_STEPS
    ours, theirs = _state_leaves(killed, TOTAL_STEPS), _state_leaves(reference, TOTAL_STEPS)
    assert len(ours) == len(theirs)
    for a, b in zip(theirs, ours, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=_why(log, "; ".join(notes)))
    assert (killed / "eval" / f"step_{TOTAL_STEPS}" / "metrics.json").is_file()


# --------------------------------------------------------------------------------------------
# FMAS.


@pytest.fixture(scope="module")
def fmas_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmas_kills")
    sources = sf.make_mvtec_images(tmp / "data", per_category=3, size=64, seed=0)
    return {"tmp": tmp, "sources": sources, "models": sf.make_models(tmp / "models")}


def _fmas_args(env, output: pathlib.Path) -> list[str]:
    return [
        "--config=configs/fmas_mvtec.py:demo",
        f"--config.output_dir={output}",
        "--config.device=cpu",
        "--config.cpu_threads=1",
        f"--config.data.root={env['tmp'] / 'data'}",
        f"--config.data.categories=('{sf.OBJECT}','{sf.TEXTURE}')",
        f"--config.masks.fg_root={output / 'fg'}",
        f"--config.sam.checkpoint={env['models']['sam']}",
        f"--config.prompts.cache_dir={output / 'prompts'}",
        f"--config.inpaint.model_dir={env['models']['sd']}",
        "--config.inpaint.resolution=64",
        "--config.inpaint.steps=2",
        "--config.inpaint.num_candidates=2",
        "--config.output.records_per_file=1",
    ]


def _records_with_tensorflow(output: pathlib.Path) -> list[str]:
    """``image/source`` of every record of every complete file, read by TF's own reader (which
    fails on a truncated or corrupt file)."""
    tf = import_tensorflow()
    spec = {"image/source": tf.io.FixedLenFeature([], tf.string)}
    files = sorted(str(p) for p in output.glob("fmas-*.tfrecord"))
    if not files:
        return []
    return [
        tf.io.parse_single_example(r, spec)["image/source"].numpy().decode()
        for r in tf.data.TFRecordDataset(files)
    ]


def _shard1_files(output: pathlib.Path) -> int:
    return len(list(output.glob("fmas-00001-of-00002-*.tfrecord")))


def test_two_fmas_workers_one_folder_second_killed_and_resumed(fmas_env, tmp_path):
    rng = random.Random(SEED + 1)
    log = tmp_path / "log.txt"
    output = tmp_path / "out"
    args = _fmas_args(fmas_env, output)
    shard = lambda i: _command("launch.synthesize", *args, f"--shard_index={i}", "--num_shards=2")
    first = run(shard(0), log=log)
    assert first.returncode == 0, _why(log, "shard 0")
    assert len(_records_with_tensorflow(output)) == 3
    assert not list(output.glob("fmas-00001-of-00002-*.tfrecord"))
    notes = []
    for _ in range(KILLS):
        # Shard 1 starts with shard 0's records in the folder (where TF-before-torch crashed);
        # killed once it has written k more files, a little later (mid-image, mid-write, ...).
        k = rng.randint(1, 2)
        delay = rng.uniform(0.0, 0.4)
        target = _shard1_files(output) + k
        what = kill_at(
            shard(1),
            ready=lambda target=target: _shard1_files(output) >= target,
            delay_s=delay,
            log=log,
        )
        notes.append(f"after {k} files + {delay:.2f}s: {what}")
        assert what in ("killed", "exited 0"), _why(log, "; ".join(notes))
        seen = _records_with_tensorflow(output)  # every complete-named file reads whole
        assert len(seen) == len(set(seen)), _why(log, "; ".join(notes))
    second = run(shard(1), log=log)
    assert second.returncode == 0, _why(log, "; ".join(notes))
    seen = _records_with_tensorflow(output)
    assert sorted(seen) == sorted(fmas_env["sources"]), _why(log, "; ".join(notes))
    assert not list(output.glob("*.tmp")) and not list(output.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------
# PatchCore.

TINY_PATCHCORE = [
    "--config=configs/patchcore.py:demo",
    "--config.members.plain.depths=(1,1,1,1)",
    "--config.members.plain.base_width=8",
    "--config.data.image_size=32",
    "--config.score.eval_batch_size=8",
    "--config.score.num_figures=1",
]


def _saving(workdir: pathlib.Path) -> bool:
    folder = workdir / checkpoints.CHECKPOINT_DIR
    return folder.is_dir() and any(folder.iterdir())


def test_patchcore_killed_fit_leaves_no_half_written_bank(demo_data_root, tmp_path):
    rng = random.Random(SEED + 2)
    log = tmp_path / "log.txt"
    workdir = tmp_path / "run"
    train = _command(
        "launch.train",
        *TINY_PATCHCORE,
        f"--config.data.root={demo_data_root}",
        f"--workdir={workdir}",
    )
    notes = []
    for i in range(KILLS):
        if i % 2 == 0:  # the moment the checkpoint folder gets its first entry: mid-save
            ready, delay = (lambda: _saving(workdir)), rng.uniform(0.0, 0.05)
        else:  # any moment of the fit: feature extraction, coreset, save
            ready, delay = (lambda: (workdir / "config.json").exists()), rng.uniform(0.0, 6.0)
        what = kill_at(train, ready=ready, delay_s=delay, log=log)
        notes.append(f"kill {i} +{delay:.2f}s: {what}, steps {_steps(workdir)}")
        assert what in ("killed", "exited 0"), _why(log, "; ".join(notes))
        for step in _steps(workdir):  # whatever is there restores whole
            checkpoints.verify(workdir / checkpoints.CHECKPOINT_DIR / str(step))
            assert _state_leaves(workdir, step)
    evaluated = run(_command("launch.evaluate", f"--workdir={workdir}"), log=log)
    if _steps(workdir):
        assert evaluated.returncode == 0, _why(log, "; ".join(notes))
    else:  # killed before its bank was saved: a clear refusal, not a crash or a random bank
        assert evaluated.returncode == 2, _why(log, "; ".join(notes))
        assert "has no checkpoint yet" in _tail(log, 2000), _why(log, "; ".join(notes))
    done = run(train, log=log)
    assert done.returncode == 0, _why(log, "; ".join(notes))
    assert _steps(workdir) == [0]
    assert (workdir / "eval" / "step_0" / "metrics.json").is_file()
