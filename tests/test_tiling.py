"""Tiling (issue 28): the grid, cutting and stitching against hand-computed and numpy
references, the messages of bad tiling inputs, and one tiny tiled run per method whose maps come
back at the original resolution."""

import math
import pathlib

import ml_collections
import numpy as np
import pytest
from test_contract import tiny_config

from wdam_jax import evaluate, export, predict, runs, train
from wdam_jax.data import datasets, sources, summary, tiling
from wdam_jax.errors import ConfigError
from wdam_jax.methods import registry


@pytest.mark.parametrize(
    "length,size,stride,expected",
    [
        (128, 64, 64, [0, 64]),
        (128, 64, 48, [0, 48, 64]),  # the last tile aligned to the border
        (100, 32, 32, [0, 32, 64, 68]),
        (64, 64, 16, [0]),
        (10, 3, 1, list(range(8))),
    ],
)
def test_origins_by_hand(length, size, stride, expected):
    assert tiling.origins(length, size=size, stride=stride).tolist() == expected


@pytest.mark.parametrize("shape,size,stride", [((100, 70), 32, 20), ((64, 64), 16, 16)])
def test_grid_covers_every_pixel_inside_the_image(shape, size, stride):
    corners = tiling.grid(*shape, size=size, stride=stride)
    count = np.zeros(shape, int)
    for top, left in corners:
        assert 0 <= top <= shape[0] - size and 0 <= left <= shape[1] - size
        count[top : top + size, left : left + size] += 1
    assert count.min() >= 1
    rows = math.ceil((shape[0] - size) / stride) + 1
    cols = math.ceil((shape[1] - size) / stride) + 1
    assert len(corners) == rows * cols


def _cut_map(amap, corners, size):
    return tiling.cut(amap[..., None], corners, size=size, input_size=size)[..., 0]


def test_stitching_is_the_mean_of_the_covering_tiles():
    shape, size, stride = (40, 30), 16, 10
    corners = tiling.grid(*shape, size=size, stride=stride)
    # Tile k's map is the constant k: the stitched value is the mean of the covering tiles' k.
    maps = np.arange(len(corners), dtype=np.float32)[:, None, None] * np.ones((1, size, size))
    ref = np.zeros(shape)
    for y in range(shape[0]):
        for x in range(shape[1]):
            covering = [
                k for k, (t, c) in enumerate(corners) if t <= y < t + size and c <= x < c + size
            ]
            ref[y, x] = np.mean(covering)
    stitched = tiling.stitch(maps, corners, size=size, shape=shape)
    np.testing.assert_allclose(stitched, ref, rtol=1e-6)


def test_constant_maps_stitch_to_constants_and_a_hot_pixel_stays_put():
    shape, size, stride = (50, 37), 16, 7
    corners = tiling.grid(*shape, size=size, stride=stride)
    const = tiling.stitch(np.full((len(corners), size, size), 2.5), corners, size=size, shape=shape)
    np.testing.assert_allclose(const, 2.5)
    hot = np.zeros(shape, np.float32)
    hot[33, 29] = 1.0
    stitched = tiling.stitch(_cut_map(hot, corners, size), corners, size=size, shape=shape)
    np.testing.assert_array_equal(stitched, hot)  # every covering tile saw the same pixel
    # Tile maps at the network's resolution (input_size != tile_size) come back resized.
    small = tiling.stitch(np.ones((len(corners), 8, 8)), corners, size=size, shape=shape)
    np.testing.assert_allclose(small, 1.0, rtol=1e-6)


def test_image_score_from_the_map_or_the_tiles():
    stitched = np.array([[0.0, 3.0], [1.0, 2.0]])
    assert tiling.image_score(stitched, np.array([5.0, 1.0]), how="map_max") == 3.0
    assert tiling.image_score(stitched, np.array([5.0, 1.0]), how="tile_max") == 5.0


def _data(**fields):
    base = {"dataset": "demo", "root": "x", "category": "washer", "image_size": 32}
    return ml_collections.ConfigDict({**base, "crop_size": 0, **fields})


def test_bad_tiling_inputs_name_the_field_that_fixes_them():
    with pytest.raises(ConfigError, match=r"data\.tile_size=256 is larger than the image"):
        tiling.origins(128, size=256, stride=256)
    (stride0,) = tiling.problems(_data(tile_size=64, tile_stride=0))
    assert "config.data.tile_stride=0" in stride0
    (wide,) = tiling.problems(_data(tile_size=64, tile_stride=65))
    assert "config.data.tile_stride=65 is larger than config.data.tile_size=64" in wide
    (score,) = tiling.problems(_data(tile_size=64, tile_stride=32, tile_image_score="mean"))
    assert "config.data.tile_image_score='mean'" in score
    assert any("crop_size" in p for p in sources.check(_data(tile_size=8, tile_stride=8,
                                                             crop_size=24)))  # fmt: skip
    assert tiling.problems(_data(tile_size=0)) == [] and tiling.from_config(_data()) is None
    examples = [
        (np.zeros((64, 64, 3), np.uint8), None, "good", "a.png"),
        (np.zeros((64, 80, 3), np.uint8), None, "good", "b.png"),
    ]
    with pytest.raises(datasets.DatasetError, match=r"b\.png is 80x64 .*config\.data\.tile_size"):
        datasets.split_from_arrays(examples, root="", image_size=None, crop_size=None)


def _tiled(name, root):
    config = tiny_config(name, root)
    config.data.image_size = 32  # the network's input: each tile resized to it
    if name == "patchcore":  # overlapping tiles, a last tile aligned to the border
        config.data.tile_size, config.data.tile_stride = 48, 40
        config.patchcore.fit_max_patches = 2000
    else:  # fewer tiles: a few training steps
        config.data.tile_size = config.data.tile_stride = 64
        config.train.batch_size = 8
        config.train.eval_every = 0
        if name == "draem":
            config.data.val_fraction = 0.0  # no validation (eval_every=0)
    return config


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_tiled_run_maps_at_the_original_resolution(name, demo_data_root, tmp_path):
    config = _tiled(name, demo_data_root)
    train_split = sources.load_split(config.data, split="train")
    corners = tiling.grid(128, 128, size=config.data.tile_size, stride=config.data.tile_stride)
    held = round(config.data.holdout_fraction * 30) if config.data.holdout_fraction else 0
    assert train_split.images.shape == ((30 - max(held, 2 * bool(held))) * len(corners), 32, 32, 3)
    train.train(config, tmp_path)
    results = evaluate.evaluate(None, tmp_path)
    assert all(np.isfinite(v) for v in results["washer"].values())
    run = runs.restore(tmp_path)
    test = sources.load_split(run.config.data, split="test")
    assert test.images.shape[1:3] == (128, 128)  # whole images at the original resolution
    scores = run.method.score_images(run.model, run.fitted, test.images[-2:], step=run.step)
    assert scores.maps.shape == (2, 128, 128)
    # "map_max": the image score is the stitched map's maximum.
    np.testing.assert_allclose(scores.image_scores, scores.maps.max(axis=(1, 2)), rtol=1e-6)


def test_tiled_prediction_export_metadata_and_data_summary(demo_data_root, tmp_path):
    config = _tiled("patchcore", demo_data_root)
    train.train(config, tmp_path / "run")
    evaluate.evaluate(None, tmp_path / "run")  # stores the thresholds prediction uses
    images = tmp_path / "new"
    images.mkdir()
    test = sources.load_split(config.data, split="test")
    for k in (0, len(test) - 1):
        (images / f"{k}.png").write_bytes((pathlib.Path(test.root) / test.paths[k]).read_bytes())
    rows = predict.predict(tmp_path / "run", images, tmp_path / "out", save_maps=True)
    run = runs.restore(tmp_path / "run")
    for row in rows:
        amap = np.load(tmp_path / "out" / row["map"])
        assert amap.shape == (128, 128) and row["status"] == "ok"  # the original resolution
        k = int(pathlib.Path(row["path"]).stem)
        ref = run.method.score_images(run.model, run.fitted, test.images[k : k + 1], step=0)
        np.testing.assert_allclose(amap, ref.maps[0], rtol=1e-5, atol=1e-6)
    assert predict.shrink(np.zeros((2048, 1000, 3))).shape == (1024, 500, 3)
    meta = export.metadata(run, tmp_path / "run", config.data.image_size, saved_model=False)
    assert meta["tiling"]["tile_size"] == 48 and meta["tiling"]["tile_stride"] == 40
    assert "mean over the tiles" in meta["tiling"]["stitching"]
    tiles = summary.summarize(config.data)["tiling"]
    assert tiles["tiles_per_image"] == {"128x128": 9} and tiles["training_tiles"] == 9 * 30


def test_high_resolution_demo_defects_are_small_with_exact_masks():
    """``fabric_2k``'s generator on a small canvas (the 2048 px category is made only when a
    config names it): each defect changes exactly its mask's pixels, a few dozen pixels across."""
    from wdam_jax.data import demo

    rng = np.random.default_rng(0)
    image = demo._fabric_image(rng, 256)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    for kind in demo.LARGE_DEFECT_TYPES:
        mask, style = demo._small_defect(rng, (256, 256), kind)
        bad = demo._paint(rng, image, mask, style)
        np.testing.assert_array_equal(np.any(bad != image, axis=-1), mask)
        ys, xs = np.nonzero(mask)
        assert 10 <= max(np.ptp(ys), np.ptp(xs)) <= 64
    assert "fabric_2k" not in demo.DEMO_CATEGORIES  # not in the default demo data
