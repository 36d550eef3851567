"""FMAS output: ``tf.train.Example`` TFRecord shards (schema: docs/design.md), written resumably.

Schema (one record per source image):

  ``image/encoded``          PNG bytes, RGB
  ``mask/encoded``           PNG bytes, single channel, 255 = anomalous
  ``image/source``           source path relative to the dataset root
  ``image/category``         class name
  ``fmas/prompt``, ``fmas/negative_prompt``   text
  ``fmas/prompt_source``     where the prompts came from: ``library:<material>``, ``llm``, ...
  ``fmas/seed``              int64
  ``fmas/cfg``, ``fmas/strength``, ``fmas/lpips``, ``fmas/tau``   float

Resumability: records are buffered and written ``records_per_file`` at a time, each file under a
temporary name and renamed when complete, so a file named ``*.tfrecord`` is always whole. On a
(re)start the sources already present in the output folder's ``*.tfrecord`` files are skipped, so
an interrupted run, re-run, finishes the rest with no duplicate and no lost record (at most
``records_per_file - 1`` finished images are redone).

Records are framed and encoded by :mod:`synthesis.tfrecord`, without TensorFlow: this stage loads
PyTorch, and TensorFlow loaded before it crashes the process (issue 13).

Two workers given the same ``--shard_index`` would write the same file names: each worker holds
an exclusive lock on ``.fmas-<i>-of-<n>.lock`` in the output folder (:func:`shard_lock`; released
by the kernel when the process dies, so a killed worker's re-run is never blocked), and the
second is refused with a message naming the first's process id. Workers of two splits of one
folder (``--num_shards=1`` beside ``--num_shards=2``) would synthesise the same images: each
holds a shared lock on ``.fmas-split-<n>.lock``, and a worker finding another split's held is
refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from synthesis import tfrecord
from synthesis.files import atomic_write

T = TypeVar("T")

RECORD_GLOB = "fmas-*.tfrecord"


class ShardBusyError(RuntimeError):
    """Another live worker holds the same shard of the same output folder."""


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of uint8 ``[H, W, 3]`` (RGB) or ``[H, W]`` (single channel)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def make_example(
    *,
    image: np.ndarray,
    mask: np.ndarray,
    source: str,
    category: str,
    prompt: str,
    negative_prompt: str,
    prompt_source: str,
    seed: int,
    cfg: float,
    strength: float,
    lpips: float,
    tau: float,
) -> bytes:
    """Serialises one FMAS sample as a ``tf.train.Example``.

    Args:
      image: uint8 ``[H, W, 3]``, the selected anomalous image ``Î_A`` (eq. 3).
      mask: bool ``[H, W]``, ``M`` (eq. 1); stored as 255 = anomalous.
      source: the normal image's path relative to the dataset root.
      category, prompt, negative_prompt: text fields.
      prompt_source: which prompt source produced them (``prompts.PromptPair.source``).
      seed, cfg, strength: the sampling parameters of the selected candidate.
      lpips: its LPIPS distance to the normal image; tau: the selector's reference (eq. 3).

    Returns:
      The serialised Example.
    """
    return tfrecord.encode_example(
        {
            "image/encoded": encode_png(image),
            "mask/encoded": encode_png(np.where(mask, 255, 0).astype(np.uint8)),
            "image/source": source.encode(),
            "image/category": category.encode(),
            "fmas/prompt": prompt.encode(),
            "fmas/negative_prompt": negative_prompt.encode(),
            "fmas/prompt_source": prompt_source.encode(),
            "fmas/seed": int(seed),
            "fmas/cfg": float(cfg),
            "fmas/strength": float(strength),
            "fmas/lpips": float(lpips),
            "fmas/tau": float(tau),
        }
    )


def split_work(items: Sequence[T], *, shard_index: int, num_shards: int) -> list[T]:
    """The items of one worker: every ``num_shards``-th from ``shard_index`` (disjoint cover).

    ``items`` must be in a deterministic order (the pipeline sorts them).
    """
    _check_shard(shard_index, num_shards)
    return list(items[shard_index::num_shards])


def _check_shard(shard_index: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"--shard_index={shard_index} must be in [0, --num_shards={num_shards}) "
            "and --num_shards >= 1."
        )


@contextlib.contextmanager
def shard_lock(
    output_dir: str | os.PathLike, *, shard_index: int, num_shards: int
) -> Iterator[Path]:
    """Holds the exclusive lock of one shard of ``output_dir`` (created) while the body runs.

    Raises:
      ShardBusyError: another process holds it (the message names its process id), or a live
        worker writes the folder with another ``num_shards``.
    """
    _check_shard(shard_index, num_shards)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _split_lock(output_dir, num_shards):
        with _shard_lock(output_dir, shard_index, num_shards) as path:
            yield path


@contextlib.contextmanager
def _split_lock(output_dir: Path, num_shards: int) -> Iterator[None]:
    """A shared lock on the folder's split into ``num_shards``: workers of one split share the
    folder; a worker of another split (``--num_shards=1`` beside ``--num_shards=2``: their
    shards overlap, so both would synthesise the same images) is refused."""
    path = output_dir / f".fmas-split-{num_shards:05d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        for other in sorted(output_dir.glob(".fmas-split-*.lock")):
            if other != path and _held(other):
                split = int(other.name.removeprefix(".fmas-split-").removesuffix(".lock"))
                raise ShardBusyError(
                    f"Another FMAS worker is writing {output_dir} split into {split} shards; this "
                    f"one has --num_shards={num_shards}, so both would synthesise the same "
                    f"images. Give every worker of a folder the same --num_shards (here "
                    f"--num_shards={split} and its own --shard_index), or wait for it to finish."
                )
        yield
    finally:
        os.close(fd)  # releases the lock


def _held(path: Path) -> bool:
    """Whether a live process holds a lock on ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        return True
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def _shard_lock(output_dir: Path, shard_index: int, num_shards: int) -> Iterator[Path]:
    path = output_dir / f".fmas-{shard_index:05d}-of-{num_shards:05d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ShardBusyError(
                f"Another FMAS worker (process {holder}) is writing shard {shard_index} of "
                f"{num_shards} into {output_dir}. Give each worker its own --shard_index, or wait "
                "for that one to finish (re-running the same command then resumes)."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def record_files(output_dir: str | os.PathLike) -> list[Path]:
    """The complete record files in ``output_dir`` (sorted)."""
    return sorted(Path(output_dir).glob(RECORD_GLOB))


def completed_sources(output_dir: str | os.PathLike) -> list[str]:
    """``image/source`` of every record in the complete files of ``output_dir`` (any worker)."""
    sources = []
    for path in record_files(output_dir):
        for record in tfrecord.read_records(path):
            try:
                [source] = tfrecord.parse_example(record, names=["image/source"])["image/source"]
            except (KeyError, ValueError) as e:
                raise tfrecord.RecordError(
                    f"{path} holds a record without one image/source ({e}); it was not written "
                    "by FMAS. Move it out of the output folder."
                ) from None
            sources.append(source.decode())
    return sources


class ShardedRecordWriter:
    """Writes records ``records_per_file`` at a time into atomically renamed files.

    File names: ``fmas-<shard_index>-of-<num_shards>-<chunk>.tfrecord``; a restarted worker
    continues the chunk numbering after its existing files. The caller holds the shard's
    :func:`shard_lock` (the pipeline does), so the stale temporary files removed here are never
    another live worker's.

    Args:
      output_dir: destination folder (created).
      shard_index, num_shards: this worker (names only).
      records_per_file: records per file (>= 1).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        shard_index: int,
        num_shards: int,
        records_per_file: int,
    ) -> None:
        if records_per_file < 1:
            raise ValueError(f"output.records_per_file={records_per_file} must be >= 1.")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"fmas-{shard_index:05d}-of-{num_shards:05d}-"
        self.records_per_file = records_per_file
        for pattern in (f".{self.prefix}*.tmp", f"{self.prefix}*.tmp"):
            for stale in self.output_dir.glob(pattern):
                stale.unlink()  # an interrupted write of this worker; its records are redone
        existing = sorted(self.output_dir.glob(self.prefix + "*.tfrecord"))
        self._next_chunk = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in existing), default=-1)
        self._buffer: list[bytes] = []
        self.files_written: list[str] = []
        self.records_written = 0

    def add(self, serialized: bytes) -> None:
        """Queues one record; writes a file when ``records_per_file`` are queued."""
        self._buffer.append(serialized)
        if len(self._buffer) >= self.records_per_file:
            self.flush()

    def flush(self) -> None:
        """Writes the queued records (if any) as one complete file."""
        if not self._buffer:
            return
        final = self.output_dir / f"{self.prefix}{self._next_chunk:05d}.tfrecord"
        atomic_write(final, lambda fh: fh.writelines(map(tfrecord.frame, self._buffer)))
        self.files_written.append(final.name)
        self.records_written += len(self._buffer)
        self._next_chunk += 1
        self._buffer = []

    def __enter__(self) -> ShardedRecordWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        # Finished records are kept on an error too: they are whole and the restart skips them.
        self.flush()
