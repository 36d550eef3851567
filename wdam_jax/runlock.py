"""One writer per folder: an exclusive lock on a run folder, and output folders published whole.

``with runlock.hold(workdir):`` is what every command that writes into a run takes
(``launch.train`` for its whole run: steps, checkpoints, the best-checkpoint keeper, the fitted
statistics, the final evaluation; ``launch.evaluate`` while it updates the run's own
``thresholds.json``). A second writer is refused at once with :class:`FolderBusyError`, whose
message names the holder (process id, host, command, since when) and what to do.

How. The lock is ``flock(2)`` on a lock file (:data:`LOCK_FILE` inside the run folder, or
``.<name>.wdam.lock`` beside an output folder that does not exist yet). The kernel releases it
when its process dies, however it dies (SIGKILL, a crash; on NFS the server's lease, after power
loss), so a killed holder never blocks a re-run: the lock file it left still holds its record,
which is how such a stale lock is recognised, and the new holder says in the log that it took it
over. A clean release deletes the file (while still holding the lock; a process that opened the
deleted file finds, after locking it, that the path is gone or is another file, and starts
again), so nothing is left behind. Within one process the lock is re-entrant (the final
evaluation of ``launch.train`` runs inside the training's hold). Multi-host runs
(:mod:`wdam_jax.distributed`): the lock belongs to the job, process 0 takes it for all, and every
process learns whether it got it, so a refused job stops on every host at once.

:func:`publish` is how a command writes a whole output folder (``launch.predict --out``,
``launch.export --out``, ``eval/step_<n>/``, ``launch.convert_weights --out``): into a temporary
sibling, renamed into place once complete (a previous output it replaces is swapped out in the
same moment and deleted), under the lock of that output, so that a reader never sees a mixture
of two outputs, a killed command leaves the previous one as it was, and two commands aimed at
one output are refused. A folder holding files the command did not write is refused untouched.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import os
import pathlib
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from absl import logging

from wdam_jax import distributed
from wdam_jax.errors import UserError

LOCK_FILE = ".wdam.lock"
STAGING_PREFIX = ".wdam-staging-"


class FolderBusyError(UserError):
    """Another live process writes the folder; ``holder`` describes it."""

    def __init__(self, message: str, *, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder


class OutputFolderError(UserError, FileExistsError):
    """An output folder that holds what this command did not write (or a file in its place)."""


_held: dict[str, list] = {}  # lock path -> [fd, depth], the locks this process holds


def _command() -> str:
    """This process's command line as typed (``python -m launch.train --workdir=...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        program = f"python -m {spec.name.removesuffix('.__main__')}"
    else:
        program = pathlib.Path(sys.argv[0]).name
    return " ".join([program, *sys.argv[1:]])[:1000]


def _record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": _command(),
        "since": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def _describe(record: dict[str, Any] | None) -> str:
    """The holder, for messages. The record is information only (the kernel's lock decides), so
    a record lost with a power cut costs nothing but this description."""
    if not record:
        return "a process that is starting (no record yet)"
    return (
        f"process {record.get('pid')} on {record.get('host')} (`{record.get('command')}`, since "
        f"{record.get('since')})"
    )


def _read(fd: int) -> dict[str, Any] | None:
    text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"pid": "?", "host": "?", "command": text[:200], "since": "?"}


def lock_path(folder: str | os.PathLike, *, beside: bool = False) -> pathlib.Path:
    """The lock file of ``folder``: inside it, or (``beside``) next to it."""
    folder = pathlib.Path(folder).absolute()
    if beside:  # the parent's real path: one lock whatever the spelling (symlinks, "..")
        return folder.parent.resolve() / f".{folder.name}.wdam.lock"
    return folder.resolve() / LOCK_FILE


def holder(folder: str | os.PathLike, *, beside: bool = False) -> dict[str, Any] | None:
    """The record of the live process holding ``folder``'s lock, or None when it is free."""
    path = lock_path(folder, beside=beside)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            return _read(fd) or {}
        return None
    finally:
        os.close(fd)


# A file system that cannot lock (some network or FUSE mounts): the command runs unlocked, as
# before this module, with a warning, rather than not at all.
_CANNOT_LOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _acquire(path: pathlib.Path, *, wait: bool, what: str, fix: str) -> int | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            record = _read(fd)
            os.close(fd)
            if e.errno in _CANNOT_LOCK:
                logging.warning("%s: this file system cannot lock (%s); nothing stops a second "
                                "writer.", path, e)  # fmt: skip
                return None
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            subject = what[:1].upper() + what[1:]
            raise FolderBusyError(
                f"{subject} is being written by {_describe(record)}. {fix} (Lock: {path}; it "
                "is released when that process ends, however it ends.)",
                holder=_describe(record),
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # released (and deleted) by its holder between our open and our lock
            os.close(fd)
            continue
        stale = _read(fd)
        if stale:
            logging.warning(
                "Took over the lock of %s left by %s, which is no longer running (killed or "
                "crashed): nothing to delete by hand.",
                what,
                _describe(stale),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_record()) + "\n").encode(), 0)  # no fsync: see _describe
        return fd


def _release(path: pathlib.Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        path.unlink(missing_ok=True)  # while locked: see the module docstring
    finally:
        os.close(fd)


@contextlib.contextmanager
def _local(path: pathlib.Path, *, wait: bool, what: str, fix: str) -> Iterator[None]:
    key = str(path)
    if key in _held:  # re-entrant within this process
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = _acquire(path, wait=wait, what=what, fix=fix)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        _release(path, fd)


@contextlib.contextmanager
def hold(
    folder: str | os.PathLike,
    *,
    beside: bool = False,
    wait: bool = False,
    what: str | None = None,
    fix: str | None = None,
) -> Iterator[None]:
    """Holds the exclusive lock of ``folder`` (created) while the body runs.

    Args:
      folder: a run folder (the lock file inside it), or with ``beside`` an output folder that
        may not exist yet (the lock file next to it).
      beside: lock file next to ``folder``.
      wait: wait for a live holder instead of refusing (for writes of milliseconds, such as an
        experiment's tables).
      what: how the message names the folder (default: ``the run folder <folder>``).
      fix: what the message tells the user to do.

    Raises:
      FolderBusyError: another live process holds it (or, in a multi-host job, process 0 could
        not take it).
    """
    folder = pathlib.Path(folder).absolute()
    what = what or f"the run folder {folder}"
    fix = fix or (
        "Wait for it to finish (re-running the same command then resumes or re-evaluates), stop "
        "it, or use another --workdir."
    )
    (folder.parent if beside else folder).mkdir(parents=True, exist_ok=True)
    path = lock_path(folder, beside=beside)
    with distributed.on_primary(lambda: _local(path, wait=wait, what=what, fix=fix)):
        yield


# --------------------------------------------------------------------------------------------
# Output folders.


def written_by(marker: str, names: set[str]) -> Callable[[pathlib.Path], bool]:
    """``owns`` for :func:`publish`: a folder holding ``marker`` and nothing but ``names`` (what
    the command writes) is a previous output; anything else in it is someone else's."""

    def owns(folder: pathlib.Path) -> bool:
        return (folder / marker).is_file() and {p.name for p in folder.iterdir()} <= names

    return owns


def check_output(
    out: str | os.PathLike,
    *,
    owns: Callable[[pathlib.Path], bool],
    flag: str = "--out",
    overwrite: bool = True,
    kind: str = "output",
    suggest: str = "new",
) -> pathlib.Path:
    """Refuses an output folder that :func:`publish` must not replace (nothing is touched).

    Args:
      out: the folder to be written.
      owns: whether an existing non-empty folder holds a previous output of this command.
      flag: how the message names the folder's flag.
      overwrite: whether a previous output may be replaced; if not, it is refused too.
      kind: what the output is, for the messages.
      suggest: the name of a new folder inside ``out`` the message suggests.

    Returns:
      ``out`` as an absolute path.

    Raises:
      OutputFolderError: ``out`` is a file, a non-empty folder this command did not write, or
        (without ``overwrite``) a previous output.
    """
    out = pathlib.Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out} is a file; name a new folder for the {kind} ({flag}).")
    if out.is_dir() and any(out.iterdir()):
        if not owns(out):
            raise OutputFolderError(
                f"{out} holds files that are not a previous {kind}; nothing was written or "
                f"deleted. Name a new folder for the {kind}, e.g. {flag}={out / suggest}."
            )
        if not overwrite:
            raise OutputFolderError(
                f"{out} already holds a {kind}; nothing was written or deleted. Name a new "
                f"folder ({flag}=...), or pass --overwrite to replace it whole."
            )
    return out


@contextlib.contextmanager
def publish(
    out: str | os.PathLike,
    *,
    owns: Callable[[pathlib.Path], bool],
    flag: str = "--out",
    overwrite: bool = True,
    kind: str = "output",
    suggest: str = "new",
) -> Iterator[pathlib.Path]:
    """Yields an empty staging folder to write ``out``'s files into; when the body returns, it
    becomes ``out`` in one rename (a previous output there is swapped out and deleted). If the
    body raises, ``out`` is left as it was and the staging folder is deleted.

    Held under ``out``'s lock (:func:`hold` with ``beside``): a second command aimed at the same
    folder is refused while the first writes. Arguments as :func:`check_output`.

    Raises:
      OutputFolderError: see :func:`check_output`.
      FolderBusyError: another live process writes ``out``.
    """
    checks = dict(owns=owns, flag=flag, overwrite=overwrite, kind=kind, suggest=suggest)
    out = check_output(out, **checks)
    fix = f"Wait for it to finish, stop it, or name another folder ({flag}=...)."
    out.parent.mkdir(parents=True, exist_ok=True)
    what = f"the {kind} folder {out}"
    with _local(lock_path(out, beside=True), wait=False, what=what, fix=fix):
        check_output(out, **checks)  # again, now that no other process can write it
        prefix = f"{STAGING_PREFIX}{out.name}."
        for left in out.parent.glob(f"{glob.escape(prefix)}*"):  # by a killed publisher of out
            if "." not in left.name[len(prefix) :]:
                shutil.rmtree(left, ignore_errors=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        try:
            written, previous = staging / "new", staging / "previous"
            written.mkdir()
            yield written
            if out.is_dir() and any(out.iterdir()):
                out.rename(previous)  # checked above: a previous output of this command
            elif out.is_dir():
                out.rmdir()
            try:
                written.rename(out)
            except OSError:
                if previous.is_dir():
                    previous.rename(out)
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
