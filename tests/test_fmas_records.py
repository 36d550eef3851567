"""FMAS TFRecord reader (a shard written here with tf.train.Example) and the tf.data pipelines."""

import io

import numpy as np
import pytest
from PIL import Image

from wdam_jax.data import datasets, fmas_records, pipeline
from wdam_jax.data.tf_setup import import_tensorflow

tf = import_tensorflow()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _example(image, mask, source, *, seed=7, drop=None):
    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def f(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[v]))

    feats = {
        "image/encoded": b(_png(image)),
        "mask/encoded": b(_png(mask)),
        "image/source": b(source.encode()),
        "image/category": b(b"bottle"),
        "fmas/prompt": b(b"a crack on the bottle"),
        "fmas/negative_prompt": b(b"blurry"),
        "fmas/seed": tf.train.Feature(int64_list=tf.train.Int64List(value=[seed])),
        "fmas/cfg": f(7.5),
        "fmas/strength": f(0.7),
        "fmas/lpips": f(0.21),
        "fmas/tau": f(0.2),
    }
    if drop:
        del feats[drop]
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    images, masks, sources = [], [], []
    paths = []
    for shard in range(2):
        path = tmp_path / f"fmas-{shard:05d}-of-00002.tfrecord"
        with tf.io.TFRecordWriter(str(path)) as w:
            for i in range(3):
                img = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
                m = np.zeros((30, 30), np.uint8)
                m[5 + i : 15 + i, 8:20] = 255
                src = f"bottle/train/good/{shard}{i:02d}.png"
                w.write(_example(img, m, src, seed=10 * shard + i))
                images.append(img)
                masks.append(m > 0)
                sources.append(src)
        paths.append(path)
    return tmp_path, paths, images, masks, sources


def test_read_records_all_fields(shards):
    tmp, _, images, masks, sources = shards
    ds = fmas_records.read_fmas_records(str(tmp / "fmas-*.tfrecord"), image_size=20)
    exs = list(ds.as_numpy_iterator())
    assert len(exs) == 6
    ex = exs[4]
    assert ex["image"].shape == (20, 20, 3) and ex["image"].dtype == np.float32
    assert ex["mask"].shape == (20, 20) and set(np.unique(ex["mask"])) <= {0.0, 1.0}
    # Same resampling as the dataset readers.
    np.testing.assert_array_equal(ex["image"], datasets.resize_image(images[4], image_size=20))
    np.testing.assert_array_equal(ex["mask"] > 0.5, datasets.resize_mask(masks[4], image_size=20))
    assert ex["source"].decode() == sources[4] and ex["category"] == b"bottle"
    assert ex["prompt"] == b"a crack on the bottle" and ex["negative_prompt"] == b"blurry"
    assert ex["seed"] == 11
    for k, v in dict(cfg=7.5, strength=0.7, lpips=0.21, tau=0.2).items():
        assert ex[k] == pytest.approx(v)


def test_load_arrays_with_crop_and_path_list(shards):
    _, paths, _, masks, sources = shards
    imgs, ms, srcs = fmas_records.load_fmas_arrays(paths, image_size=20, crop_size=16)
    assert imgs.shape == (6, 16, 16, 3) and ms.shape == (6, 16, 16) and ms.dtype == bool
    assert srcs == sources
    for got, m in zip(ms, masks, strict=True):
        np.testing.assert_array_equal(got, datasets.resize_mask(m, image_size=20, crop_size=16))


def test_missing_files_and_fields_are_reported(shards, tmp_path):
    with pytest.raises(datasets.DatasetError, match="No FMAS TFRecord shard matches"):
        fmas_records.read_fmas_records(str(tmp_path / "nothing-*.tfrecord"), image_size=8)
    with pytest.raises(datasets.DatasetError, match="not found"):
        fmas_records.read_fmas_records([tmp_path / "absent.tfrecord"], image_size=8)
    bad = tmp_path / "bad.tfrecord"
    with tf.io.TFRecordWriter(str(bad)) as w:
        img = np.zeros((8, 8, 3), np.uint8)
        w.write(_example(img, np.zeros((8, 8), np.uint8), "x.png", drop="fmas/tau"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="fmas/tau"):
        fmas_records.load_fmas_arrays(bad, image_size=8)
    odd = tmp_path / "odd.tfrecord"
    with tf.io.TFRecordWriter(str(odd)) as w:
        w.write(_example(np.zeros((8, 8, 3), np.uint8), np.zeros((6, 8), np.uint8), "y.png"))
    with pytest.raises(tf.errors.OpError, match=r"y\.png: mask .* differ in size"):
        fmas_records.load_fmas_arrays(odd, image_size=8)


def test_tensorflow_sees_no_gpu():
    assert tf.config.get_visible_devices("GPU") == []


# ---------------------------------------------------------------------------- batching


def test_batch_indices_are_deterministic_and_cover_each_epoch():
    a = [pipeline.batch_indices(s, num_examples=10, batch_size=5, seed=3) for s in range(6)]
    b = [pipeline.batch_indices(s, num_examples=10, batch_size=5, seed=3) for s in range(6)]
    c = [pipeline.batch_indices(s, num_examples=10, batch_size=5, seed=4) for s in range(6)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    for e in range(3):  # every epoch is a permutation
        assert sorted(np.concatenate(a[2 * e : 2 * e + 2]).tolist()) == list(range(10))
    # A batch that crosses an epoch boundary takes the end of one permutation, then the next's.
    crossing = pipeline.batch_indices(1, num_examples=10, batch_size=7, seed=0)
    first = np.random.default_rng([0, 0]).permutation(10)
    second = np.random.default_rng([0, 1]).permutation(10)
    np.testing.assert_array_equal(crossing, np.concatenate([first[7:], second[:4]]))


def test_map_batches_pads_once_and_drops_the_padding():
    images = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    shapes = []

    def fn(x):
        shapes.append(x.shape)
        return x.sum(axis=1), x * 2

    sums, doubled = pipeline.map_batches(fn, images, batch_size=3)
    assert shapes == [(3, 2)] * 3  # every call sees the full batch size (one compile)
    np.testing.assert_array_equal(sums, images.sum(axis=1))
    np.testing.assert_array_equal(doubled, images * 2)
    with pytest.raises(ValueError, match="no images"):
        pipeline.map_batches(fn, images[:0], batch_size=3)
