"""Atomic writes for the synthesis side (a copy of ``wdam_jax.checkpoints.atomic_write_text``'s
idea: ``synthesis`` never imports ``wdam_jax``).

Every file a later command reads (records, manifests, the foreground-mask cache, the prompt cache)
is written to an unpredictable temporary name in the destination folder, flushed, and renamed over
the destination, so a reader sees the old file or the new one, never a truncated one, and two
writers never share a temporary file. Names that go into such paths are checked first.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Calls ``write(fh)`` on a temporary file beside ``path``, then renames it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def check_category(name: str, *, field: str) -> str:
    """``name`` if it is one plain folder name (it goes into cache paths), else a ValueError
    naming the config ``field``: no separator, not ``.``/``..``, not empty, no NUL."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in ("/", "\\", "\0"))
        or name != name.strip()
    ):
        raise ValueError(
            f"Category name {name!r} (config field {field}) must be one plain folder name, e.g. "
            "'bottle': no path separators, no '..', no surrounding spaces."
        )
    return name
