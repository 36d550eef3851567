"""Damaged or unwritable checkpoints (issue 13, item 3): a damaged newest checkpoint is skipped with
a warning naming it and the run resumes exactly from the newest readable one; with none readable
the run stops with a clear message instead of restarting from step 0; a full disk or a read-only
folder stops a save with a clear message and leaves the previous checkpoint readable. On the toy
method of ``tests/test_train.py`` (a few KB per checkpoint), in process."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import resource
import shutil
import subprocess

import jax
import numpy as np
import pytest
from test_train import ToyMethod, toy_config

from wdam_jax import checkpoints, runs, train
from wdam_jax.errors import InputsError


def _largest(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoints.CHECKSUMS]
    return max(files, key=lambda p: p.stat().st_size)


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array data file of the state item (what holds the parameters)."""
    return _largest(step_dir / checkpoints.STATE / "ocdbt.process_0" / "d")


def _truncate(step_dir):
    path = _array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _change_a_byte(step_dir):
    path = _array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _delete_a_file(step_dir):
    _array_file(step_dir).unlink()


def _truncate_metadata_without_checksums(step_dir):
    # A step saved before checksums existed (or killed just before writing them): what orbax
    # itself notices must still make the step be skipped.
    (step_dir / checkpoints.CHECKSUMS).unlink()
    path = step_dir / checkpoints.STATE / "_METADATA"
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {
    "truncated": _truncate,
    "byte_changed": _change_a_byte,
    "file_deleted": _delete_a_file,
    "truncated_no_checksums": _truncate_metadata_without_checksums,
}


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["params"]))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run and a copy stopped after step 5 (checkpoints 2, 4, 5)."""
    tmp = tmp_path_factory.mktemp("damage")
    config = toy_config(steps=6)
    config.train.keep_checkpoints = 3
    _, full = train.train(config, tmp / "full", method=ToyMethod(config))
    train.train(config, tmp / "stopped", method=ToyMethod(config), stop_at=5)
    manager = checkpoints.checkpoint_manager(tmp / "stopped")
    assert sorted(manager.all_steps()) == [2, 4, 5]
    manager.close()
    return {"config": config, "full": full, "stopped": tmp / "stopped"}


def _copy(reference, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(reference["stopped"], workdir)
    return workdir


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_resumes_from_the_one_before(damage, reference, tmp_path, caplog):
    config, workdir = reference["config"], _copy(reference, tmp_path)
    ckpt = workdir / checkpoints.CHECKPOINT_DIR
    DAMAGE[damage](ckpt / "5")
    with caplog.at_level(logging.WARNING):
        _, state = train.train(config, workdir, method=ToyMethod(config))
    assert f"{ckpt / '5'} is damaged or unreadable" in caplog.text
    assert f"Using checkpoint {ckpt / '4'}" in caplog.text
    # Resumed from step 4, not 0: the result is the uninterrupted run's, bit for bit.
    assert int(state["step"]) == 6
    for a, b in zip(_params(reference["full"]), _params(state), strict=True):
        np.testing.assert_array_equal(a, b)
    # The damaged step is kept aside for inspection, out of the way of the new steps.
    assert (workdir / checkpoints.DAMAGED_DIR / "5").is_dir()
    manager = checkpoints.checkpoint_manager(workdir)
    assert sorted(manager.all_steps()) == [2, 4, 6]
    manager.close()


def test_evaluation_falls_back_without_moving_anything(reference, tmp_path, caplog):
    config, workdir = reference["config"], _copy(reference, tmp_path)
    ckpt = workdir / checkpoints.CHECKPOINT_DIR
    _change_a_byte(ckpt / "5")
    with caplog.at_level(logging.WARNING):
        run = runs.restore(workdir, config=config, method=ToyMethod(config))
    assert run.step == 4 and f"{ckpt / '5'} is damaged" in caplog.text
    assert (ckpt / "5").is_dir() and not (workdir / checkpoints.DAMAGED_DIR).exists()
    # A step asked for by name is not replaced by another one.
    with pytest.raises(checkpoints.CheckpointError, match=r"step 5: .*5.* is damaged"):
        runs.restore(workdir, step=5, config=config, method=ToyMethod(config))


def test_no_readable_checkpoint_stops_instead_of_restarting(reference, tmp_path):
    config, workdir = reference["config"], _copy(reference, tmp_path)
    ckpt = workdir / checkpoints.CHECKPOINT_DIR
    for step in (2, 4, 5):
        _truncate(ckpt / str(step))
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    with pytest.raises(checkpoints.CheckpointError, match="No readable checkpoint") as err:
        train.train(config, workdir, method=ToyMethod(config))
    assert all(f"step {s}:" in str(err.value) for s in (2, 4, 5))
    assert "step 0" in str(err.value)  # says how to start again, and that it was not done
    after = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    assert [p for p in after if p.parts[0] == "checkpoints"] == [
        p for p in before if p.parts[0] == "checkpoints"
    ]


def test_full_disk_stops_the_save_and_keeps_the_previous_checkpoint(reference, tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes every write past 5 kB fail
    with EFBIG, as a full disk fails with ENOSPC (Python ignores SIGXFSZ)."""
    config, workdir = reference["config"], _copy(reference, tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (5000, hard))
    try:
        with pytest.raises(checkpoints.CheckpointError) as err:
            train.train(config, workdir, method=ToyMethod(config))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(err.value)
    assert "Could not write checkpoint 6" in message and "disk full" in message
    assert "checkpoint at step 5 is kept" in message
    run = runs.restore(workdir, config=config, method=ToyMethod(config))
    assert run.step == 5
    # Space freed, the same command resumes from step 5 and finishes as the uninterrupted run.
    _, state = train.train(config, workdir, method=ToyMethod(config))
    for a, b in zip(_params(reference["full"]), _params(state), strict=True):
        np.testing.assert_array_equal(a, b)


def _chattr(flag: str, folder: pathlib.Path) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, flag, str(folder)], capture_output=True).returncode == 0


@contextlib.contextmanager
def _read_only(*folders: pathlib.Path):
    """Makes folders really read-only: no write permission and, for root (whom permission bits do
    not stop), the immutable attribute (``chattr +i``). Skips the test where neither stops a
    write (root on a file system without the attribute)."""
    modes = {f: f.stat().st_mode for f in folders}
    immutable = []
    try:
        for folder in folders:
            folder.chmod(modes[folder] & ~0o222)
            if os.geteuid() == 0 and _chattr("+i", folder):
                immutable.append(folder)
        for folder in folders:
            with contextlib.suppress(OSError):
                (folder / ".probe").touch()
                (folder / ".probe").unlink()
                pytest.skip(f"cannot make {folder} read-only here (root without chattr +i)")
        yield
    finally:
        for folder in immutable:
            _chattr("-i", folder)
        for folder, mode in modes.items():
            folder.chmod(mode)


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def _resumes_to_the_uninterrupted_result(reference, workdir):
    config = reference["config"]
    assert runs.restore(workdir, config=config, method=ToyMethod(config)).step == 5
    _, state = train.train(config, workdir, method=ToyMethod(config))
    for a, b in zip(_params(reference["full"]), _params(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_read_only_workdir_is_refused_up_front_and_keeps_its_checkpoints(reference, tmp_path):
    config, workdir = reference["config"], _copy(reference, tmp_path)
    ckpt = workdir / checkpoints.CHECKPOINT_DIR
    before = _files(workdir)
    with _read_only(workdir, ckpt), pytest.raises(InputsError) as err:
        train.train(config, workdir, method=ToyMethod(config))
    message = str(err.value)
    assert f"{workdir} is read-only" in message and f"chmod -R u+w {workdir}" in message
    assert _files(workdir) == before  # nothing written, nothing removed
    _resumes_to_the_uninterrupted_result(reference, workdir)


class _FreezesCheckpoints(ToyMethod):
    """Makes the checkpoint folder read-only while training, when the batch of ``at`` is built:
    the up-front check passes, the next save fails for real."""

    def __init__(self, config, *, folder: pathlib.Path, at: int, stack: contextlib.ExitStack):
        super().__init__(config)
        self.folder, self.at, self.stack = folder, at, stack

    def batch(self, step: int, **part):
        if step == self.at:
            self.stack.enter_context(_read_only(self.folder))
        return super().batch(step, **part)


def test_checkpoint_folder_turned_read_only_stops_the_save_and_keeps_the_previous(
    reference, tmp_path
):
    config, workdir = reference["config"], _copy(reference, tmp_path)
    ckpt = workdir / checkpoints.CHECKPOINT_DIR
    before = _files(ckpt)
    with contextlib.ExitStack() as stack, pytest.raises(checkpoints.CheckpointError) as err:
        method = _FreezesCheckpoints(config, folder=ckpt, at=5, stack=stack)
        train.train(config, workdir, method=method)
    message = str(err.value)
    assert f"Could not write checkpoint 6: {ckpt} is read-only" in message
    assert "checkpoint at step 5 is kept" in message and f"chmod -R u+w {workdir}" in message
    assert _files(ckpt) == before
    _resumes_to_the_uninterrupted_result(reference, workdir)
