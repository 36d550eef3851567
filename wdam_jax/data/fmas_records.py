"""Reader of the FMAS TFRecord shards (the schema is in docs/design.md).


Each record is a ``tf.train.Example`` with ``image/encoded`` (PNG, RGB), ``mask/encoded`` (PNG,
single channel, 255 = anomalous), ``image/source`` (path relative to the dataset root),
``image/category``, ``fmas/prompt``, ``fmas/negative_prompt``, ``fmas/seed``, ``fmas/cfg``,
``fmas/strength``, ``fmas/lpips`` and ``fmas/tau``. Every field is required: a shard missing one
fails loudly instead of yielding defaults.

Images are decoded and resized by the same PIL code as the dataset readers
(:func:`wdam_jax.data.datasets.resize_image`), so synthetic anomalies and real images go through
one resampling kernel and a classifier cannot tell them apart by resampling artefacts.
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from wdam_jax.data.datasets import DatasetError, resize_image, resize_mask
from wdam_jax.data.tf_setup import import_tensorflow

STRING_FIELDS = (
    "image/encoded",
    "mask/encoded",
    "image/source",
    "image/category",
    "fmas/prompt",
    "fmas/negative_prompt",
)
INT_FIELDS = ("fmas/seed",)
FLOAT_FIELDS = ("fmas/cfg", "fmas/strength", "fmas/lpips", "fmas/tau")


def _feature_spec():
    tf = import_tensorflow()
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in STRING_FIELDS}
    spec.update({k: tf.io.FixedLenFeature([], tf.int64) for k in INT_FIELDS})
    spec.update({k: tf.io.FixedLenFeature([], tf.float32) for k in FLOAT_FIELDS})
    return spec


def resolve_files(file_pattern_or_paths: str | os.PathLike | Sequence[str | os.PathLike]):
    """Expands a glob pattern or a list of paths into a sorted list of existing files."""
    if isinstance(file_pattern_or_paths, str | os.PathLike):
        pattern = os.fspath(file_pattern_or_paths)
        files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    else:
        files = [os.fspath(p) for p in file_pattern_or_paths]
    if not files:
        raise DatasetError(
            f"No FMAS TFRecord shard matches {file_pattern_or_paths!r}; run "
            "python -m launch.synthesize first or fix data.fmas_records."
        )
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DatasetError(
            f"FMAS TFRecord shard(s) {missing} not found; run python -m launch.synthesize or fix "
            "data.fmas_records."
        )
    return files


def _decode(image_png: bytes, mask_png: bytes, source: bytes, image_size: int, crop_size):
    with Image.open(io.BytesIO(image_png)) as img:
        rgb = np.asarray(img.convert("RGB"))
    with Image.open(io.BytesIO(mask_png)) as m:
        mask = np.asarray(m.convert("L")) > 127
    if mask.shape != rgb.shape[:2]:
        raise DatasetError(
            f"FMAS record for {source.decode()}: mask {mask.shape} and image {rgb.shape[:2]} "
            "differ in size; regenerate the shard."
        )
    return (
        resize_image(rgb, image_size=image_size, crop_size=crop_size),
        resize_mask(mask, image_size=image_size, crop_size=crop_size).astype(np.float32),
    )


def read_fmas_records(
    file_pattern_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_size: int,
    crop_size: int | None = None,
):
    """A ``tf.data.Dataset`` over FMAS records, in file order.

    Args:
      file_pattern_or_paths: a glob (``.../fmas-*.tfrecord``), one path, or a list of paths.
      image_size: resize target (as the dataset readers).
      crop_size: optional centre crop after the resize.

    Returns:
      Dataset of dicts: ``image`` float32 [S, S, 3] in [0, 1], ``mask`` float32 [S, S] in {0, 1},
      ``source``, ``category``, ``prompt``, ``negative_prompt`` (tf.string), ``seed`` int64,
      ``cfg``, ``strength``, ``lpips``, ``tau`` float32.
    """
    tf = import_tensorflow()
    files = resolve_files(file_pattern_or_paths)
    side = crop_size if crop_size is not None else image_size
    spec = _feature_spec()

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        image, mask = tf.numpy_function(
            lambda i, m, s: _decode(i, m, s, image_size, crop_size),
            [ex["image/encoded"], ex["mask/encoded"], ex["image/source"]],
            [tf.float32, tf.float32],
            stateful=False,
        )
        image.set_shape([side, side, 3])
        mask.set_shape([side, side])
        return {
            "image": image,
            "mask": mask,
            "source": ex["image/source"],
            "category": ex["image/category"],
            "prompt": ex["fmas/prompt"],
            "negative_prompt": ex["fmas/negative_prompt"],
            "seed": ex["fmas/seed"],
            "cfg": ex["fmas/cfg"],
            "strength": ex["fmas/strength"],
            "lpips": ex["fmas/lpips"],
            "tau": ex["fmas/tau"],
        }

    ds = tf.data.TFRecordDataset(files)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def load_fmas_arrays(
    file_pattern_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    image_size: int,
    crop_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All FMAS records as numpy arrays (for small sets held in memory during training).

    Returns:
      (images [N, S, S, 3] float32, masks [N, S, S] bool, sources: N relative source paths).
    """
    images, masks, sources = [], [], []
    ds = read_fmas_records(file_pattern_or_paths, image_size=image_size, crop_size=crop_size)
    for ex in ds.as_numpy_iterator():
        images.append(ex["image"])
        masks.append(ex["mask"] > 0.5)
        sources.append(ex["source"].decode())
    if not images:
        raise DatasetError(f"FMAS shards {file_pattern_or_paths!r} hold no records.")
    return np.stack(images), np.stack(masks), sources
