"""Multi-host training with ``jax.distributed``: two real processes on this machine (a coordinator
on 127.0.0.1, one CPU device each, gloo collectives) train the tiny CutPaste model through
``python -m launch.train`` and save orbax checkpoints together; the parameters they reach equal
a one-process run's with the same global batch."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from test_concurrency import HOLD_LOCK
from test_contract import tiny_config

from wdam_jax import distributed, runlock, runs, train
from wdam_jax import state as state_lib
from wdam_jax.errors import InputsError
from wdam_jax.methods import registry

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(config) -> list[str]:
    """``--config.*`` flags that make ``configs/cutpaste.py:demo`` the test's tiny config."""
    fields = {
        "model.depths": config.model.depths,
        "model.base_width": config.model.base_width,
        "model.wdam_layers": config.model.wdam_layers,
        "model.head_dims": config.model.head_dims,
        "train.batch_size": config.train.batch_size,
        "train.stage1_steps": config.train.stage1_steps,
        "train.stage2_steps": config.train.stage2_steps,
        "train.stage3_steps": config.train.stage3_steps,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "train.eval_every": config.train.eval_every,
        "augment.foreground_mask": config.augment.foreground_mask,
        "data.root": config.data.root,
        "data.image_size": config.data.image_size,
    }
    return [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in fields.items()]


def _config(demo_data_root):
    config = tiny_config("cutpaste", demo_data_root)
    config.train.batch_size = 4  # two examples (six rows) per process
    config.train.stage1_steps = config.train.stage2_steps = config.train.stage3_steps = 1
    config.train.eval_every = 0
    return config


def _start_job(config, workdir: pathlib.Path) -> list[subprocess.Popen]:
    """``launch.train`` as a two-process job on this machine (stderr piped)."""
    address = f"127.0.0.1:{_free_port()}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    command = [
        sys.executable,
        "-m",
        "launch.train",
        "--config=configs/cutpaste.py:demo",
        f"--workdir={workdir}",
        *_overrides(config),
    ]
    # Process 0 from flags, process 1 from the environment: both ways are read.
    first = [f"--coordinator_address={address}", "--num_processes=2", "--process_id=0"]
    second_env = dict(
        env, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"
    )
    return [
        subprocess.Popen(command + first, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(command, cwd=REPO, env=second_env, stderr=subprocess.PIPE, text=True),
    ]


def test_two_processes_train_the_one_process_model(demo_data_root, tmp_path):
    config = _config(demo_data_root)
    procs = _start_job(config, tmp_path / "two")
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "Process 1 of 2 joined" in errors[1] and "launch.evaluate" in errors[0]
    # The run's lock was the job's (process 0's): taken once, released at the end.
    assert not (tmp_path / "two" / runlock.LOCK_FILE).exists()

    _, one = train.train(config, tmp_path / "one")
    two = runs.restore(tmp_path / "two")
    total = registry.get_method(config).total_steps
    assert two.step == int(one["step"]) == total
    assert sorted(int(p.name) for p in (tmp_path / "two" / "checkpoints").iterdir()) == [2, 3]
    # The same global batch (rows in another order): equal up to float summation order, which
    # Adam's normalised steps can amplify to ~lr on a parameter whose gradient is near zero. So
    # the difference is measured against how far training moved the parameters (a run that saw
    # only its own half of the batch differs by the order of the move itself).
    start = state_lib.init_state(registry.get_method(config), config)[3]["params"]
    trees = [jax.device_get(one["params"]), nnx.state(two.model, nnx.Param), start]
    a, b, a0 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in trees)
    moved, diff = np.linalg.norm(a - a0), np.linalg.norm(b - a)
    assert moved > 0.1 and diff <= 1e-2 * moved, (moved, diff, np.abs(b - a).max())
    # The fitted statistics (each process fits them, process 0's are saved) agree as closely
    # (the Gaussian's precision matrix, an inverse, amplifies the parameters' rounding).
    fitted_one = runs.restore(tmp_path / "one").fitted
    for k, v in fitted_one.items():
        assert np.linalg.norm(two.fitted[k] - v) <= 1e-2 * np.linalg.norm(v), k


def test_a_job_whose_run_is_being_written_stops_on_every_host(demo_data_root, tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        procs = _start_job(_config(demo_data_root), workdir)
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        holder.kill()
        holder.wait()
    assert [p.returncode for p in procs] == [2, 2], errors
    assert f"is being written by process {holder.pid}" in errors[0], errors[0][-3000:]
    assert "Process 0 of this job was refused" in errors[1], errors[1][-3000:]
    assert sorted(p.name for p in workdir.iterdir()) == [runlock.LOCK_FILE]  # nothing written


def test_batch_parts_hold_the_rows_of_the_whole_batch(demo_data_root):
    config = tiny_config("cutpaste", demo_data_root)
    config.train.batch_size = 4
    method = registry.get_method(config)
    whole = method.batch(3)
    parts = [method.batch(3, part=p, parts=2) for p in range(2)]
    b = config.train.batch_size
    for p, part in enumerate(parts):
        # Part p holds examples [2p, 2p + 2) of each view (normal, anomaly, scar) of the whole.
        rows = np.concatenate([np.arange(v * b + 2 * p, v * b + 2 * p + 2) for v in range(3)])
        np.testing.assert_array_equal(part["image"], whole["image"][rows])
        np.testing.assert_array_equal(part["label"], whole["label"][rows])
    with pytest.raises(ValueError, match="divisible by the process count"):
        method.batch(3, part=0, parts=3)


def test_cluster_from_flags_and_environment():
    assert distributed.resolve(environ={}) is None
    env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve(environ=env) == distributed.Cluster("h0:99", 4, 3)
    # A flag wins over its variable.
    assert distributed.resolve(process_id=1, environ=env).process_id == 1
    with pytest.raises(InputsError, match="missing --process_id"):
        distributed.resolve(coordinator_address="h0:99", num_processes=2, environ={})
    with pytest.raises(InputsError, match=r"must be in \[0, 2\)"):
        distributed.resolve(coordinator_address="h0:99", num_processes=2, process_id=2, environ={})
    with pytest.raises(InputsError, match="expected host:port"):
        distributed.resolve(coordinator_address="h0", num_processes=2, process_id=0, environ={})
    with pytest.raises(InputsError, match="not an integer"):
        distributed.resolve(environ={**env, "JAX_PROCESS_ID": "x"})
