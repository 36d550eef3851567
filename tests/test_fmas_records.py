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


# ---------------------------------------------------------------------------- pipelines


@pytest.fixture
def arrays():
    n = 10
    return {
        "image": np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2),
        "label": np.arange(n, dtype=np.int32),
    }


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_are_deterministic_and_cover_each_epoch(arrays):
    a = _take(pipeline.numpy_batches(arrays, 5, seed=3), 6)
    b = _take(pipeline.numpy_batches(arrays, 5, seed=3), 6)
    c = _take(pipeline.numpy_batches(arrays, 5, seed=4), 6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])
    assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a, c, strict=True))
    for e in range(3):  # every epoch is a permutation
        labels = np.concatenate([a[2 * e]["label"], a[2 * e + 1]["label"]])
        assert sorted(labels.tolist()) == list(range(10))
    assert a[0]["image"].shape == (5, 2, 2) and a[0]["label"].dtype == np.int32
    np.testing.assert_array_equal(a[0]["image"], arrays["image"][a[0]["label"]])


def test_resume_from_step_gives_the_same_batches(arrays):
    full = _take(pipeline.numpy_batches(arrays, 4, seed=0), 7)
    resumed = _take(pipeline.numpy_batches(arrays, 4, seed=0, start_step=4), 3)
    for x, y in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(x["label"], y["label"])


def test_one_epoch_in_order(arrays):
    batches = list(
        pipeline.numpy_batches(arrays, 4, seed=0, shuffle=False, repeat=False, drop_remainder=False)
    )
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = list(pipeline.numpy_batches(arrays, 4, seed=0, shuffle=False, repeat=False))
    assert len(dropped) == 2


def test_map_fn_is_seeded_per_example_and_parallel_safe(arrays):
    def add_noise(rng, ex):
        return {
            "image": ex["image"] + rng.random(ex["image"].shape).astype(np.float32),
            **{"label": ex["label"]},
        }

    serial = _take(
        pipeline.numpy_batches(arrays, 4, seed=1, map_fn=add_noise, num_parallel_calls=1), 5
    )
    parallel = _take(
        pipeline.numpy_batches(arrays, 4, seed=1, map_fn=add_noise, num_parallel_calls=4), 5
    )
    for x, y in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
    noise = serial[0]["image"] - arrays["image"][serial[0]["label"]]
    assert noise.min() >= 0 and noise.max() < 1 and noise.std() > 0
    direct = pipeline.make_batch(arrays, 3, batch_size=4, seed=1, map_fn=add_noise)
    np.testing.assert_array_equal(direct["image"], serial[3]["image"])
