"""FMAS output: ``tf.train.Example`` TFRecord shards (schema: docs/design.md), written resumably.

Schema (one record per source image):

  ``image/encoded``          PNG bytes, RGB
  ``mask/encoded``           PNG bytes, single channel, 255 = anomalous
  ``image/source``           source path relative to the dataset root
  ``image/category``         class name
  ``fmas/prompt``, ``fmas/negative_prompt``   text
  ``fmas/seed``              int64
  ``fmas/cfg``, ``fmas/strength``, ``fmas/lpips``, ``fmas/tau``   float

Resumability: records are buffered and written ``records_per_file`` at a time, each file under a
temporary name and renamed when complete, so a file named ``*.tfrecord`` is always whole. On a
(re)start the sources already present in the output folder's ``*.tfrecord`` files are skipped, so
an interrupted run, re-run, finishes the rest with no duplicate and no lost record (at most
``records_per_file - 1`` finished images are redone).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")

RECORD_GLOB = "fmas-*.tfrecord"


def _tf():
    """Imports TensorFlow for record I/O only, with every GPU hidden from it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


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
      seed, cfg, strength: the sampling parameters of the selected candidate.
      lpips: its LPIPS distance to the normal image; tau: the selector's reference (eq. 3).

    Returns:
      The serialised Example.
    """
    tf = _tf()
    feature = tf.train.Feature
    b = lambda v: feature(bytes_list=tf.train.BytesList(value=[v]))
    f = lambda v: feature(float_list=tf.train.FloatList(value=[float(v)]))
    features = {
        "image/encoded": b(encode_png(image)),
        "mask/encoded": b(encode_png(np.where(mask, 255, 0).astype(np.uint8))),
        "image/source": b(source.encode()),
        "image/category": b(category.encode()),
        "fmas/prompt": b(prompt.encode()),
        "fmas/negative_prompt": b(negative_prompt.encode()),
        "fmas/seed": feature(int64_list=tf.train.Int64List(value=[int(seed)])),
        "fmas/cfg": f(cfg),
        "fmas/strength": f(strength),
        "fmas/lpips": f(lpips),
        "fmas/tau": f(tau),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def split_work(items: Sequence[T], *, shard_index: int, num_shards: int) -> list[T]:
    """The items of one worker: every ``num_shards``-th from ``shard_index`` (disjoint cover).

    ``items`` must be in a deterministic order (the pipeline sorts them).
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(
            f"--shard_index={shard_index} must be in [0, --num_shards={num_shards}) "
            "and --num_shards >= 1."
        )
    return list(items[shard_index::num_shards])


def record_files(output_dir: str | os.PathLike) -> list[Path]:
    """The complete record files in ``output_dir`` (sorted)."""
    return sorted(Path(output_dir).glob(RECORD_GLOB))


def completed_sources(output_dir: str | os.PathLike) -> list[str]:
    """``image/source`` of every record in the complete files of ``output_dir`` (any worker)."""
    files = record_files(output_dir)
    if not files:
        return []
    tf = _tf()
    spec = {"image/source": tf.io.FixedLenFeature([], tf.string)}
    dataset = tf.data.TFRecordDataset([os.fspath(p) for p in files])
    return [tf.io.parse_single_example(r, spec)["image/source"].numpy().decode() for r in dataset]


class ShardedRecordWriter:
    """Writes records ``records_per_file`` at a time into atomically renamed files.

    File names: ``fmas-<shard_index>-of-<num_shards>-<chunk>.tfrecord``; a restarted worker
    continues the chunk numbering after its existing files.

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
        for stale in self.output_dir.glob(self.prefix + "*.tmp"):
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
        tf = _tf()
        final = self.output_dir / f"{self.prefix}{self._next_chunk:05d}.tfrecord"
        tmp = final.with_name(final.name + ".tmp")
        with tf.io.TFRecordWriter(os.fspath(tmp)) as writer:
            for record in self._buffer:
                writer.write(record)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self.files_written.append(final.name)
        self.records_written += len(self._buffer)
        self._next_chunk += 1
        self._buffer = []

    def __enter__(self) -> ShardedRecordWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        # Finished records are kept on an error too: they are whole and the restart skips them.
        self.flush()
