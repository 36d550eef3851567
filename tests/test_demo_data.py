"""The built-in demo data: layout, determinism, idempotence and exact defect masks."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from wdam_jax.data import datasets, demo

SIZE = 48  # small for speed; the default is 128


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, demo.ensure_demo_data(root, seed=0, image_size=SIZE)


def _files(base: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_layout_and_loader(demo_root):
    root, dataset = demo_root
    assert dataset == root / "mvtec_demo"
    assert len(demo.DEMO_CATEGORIES) >= 2
    assert set(demo.TEXTURE_CATEGORIES) <= {"brick", "grass", "gravel"}
    assert demo.OBJECT_CATEGORIES
    for category in demo.DEMO_CATEGORIES:
        train = datasets.load_mvtec(dataset, category, split="train", image_size=SIZE)
        test = datasets.load_mvtec(dataset, category, split="test", image_size=SIZE)
        assert len(train) == demo.NUM_TRAIN
        assert len(test) == demo.NUM_TEST_GOOD + demo.NUM_TEST_PER_DEFECT * len(demo.DEFECT_TYPES)
        assert set(test.defect_types) == {"good", *demo.DEFECT_TYPES}
        assert all(m.any() for m, lab in zip(test.masks, test.labels, strict=True) if lab)
        fg = datasets.load_foreground_masks(root / "foreground_masks", train, image_size=SIZE)
        if category in demo.TEXTURE_CATEGORIES:
            assert fg.all()
        else:
            assert 0.1 < fg.mean() < 0.7  # an object on a background
        # Foreground masks are single-channel 0/255 PNGs.
        with Image.open(root / "foreground_masks" / category / "train/good/000.png") as im:
            assert im.mode == "L" and set(np.unique(np.asarray(im))) <= {0, 255}


def test_same_seed_identical_bytes_other_seed_differs(demo_root, tmp_path):
    root, dataset = demo_root
    again = demo.ensure_demo_data(tmp_path / "a", seed=0, image_size=SIZE)
    assert _files(again) == _files(dataset)
    assert _files(tmp_path / "a/foreground_masks") == _files(root / "foreground_masks")
    other = demo.ensure_demo_data(tmp_path / "b", seed=1, image_size=SIZE)
    a, b = _files(dataset), _files(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) > 0.9 * len(a)


def test_idempotent_and_rejects_other_settings(demo_root):
    root, dataset = demo_root
    marker = dataset / "brick/train/good/000.png"
    before = marker.stat().st_mtime_ns
    assert demo.ensure_demo_data(root, seed=0, image_size=SIZE) == dataset
    assert marker.stat().st_mtime_ns == before  # nothing rewritten
    with pytest.raises(datasets.DatasetError, match="generated with"):
        demo.ensure_demo_data(root, seed=3, image_size=SIZE)
    assert not list(root.glob(".demo_tmp_*"))


@pytest.mark.parametrize("category", demo.DEMO_CATEGORIES)
def test_masks_exactly_where_the_defects_are(category):
    for k, kind in enumerate(demo.DEFECT_TYPES):
        for i in range(3):
            rng = np.random.default_rng([11, k, i])
            clean, fg = demo.make_clean_image(rng, category, image_size=64)
            bad, mask = demo.add_defect(rng, clean, fg, kind)
            changed = np.any(bad != clean, axis=-1)
            np.testing.assert_array_equal(changed, mask, err_msg=f"{category}/{kind}/{i}")
            assert mask.sum() >= 4 and not (mask & ~fg).any()
            # Visible: the mean change inside the mask is large.
            diff = np.abs(bad.astype(int) - clean.astype(int))[mask].mean()
            assert diff > 20, (category, kind, diff)


def test_written_defects_match_their_masks(demo_root):
    # Regenerate the clean image behind two written test images from the generator's per-image
    # seed, then check the file differs from it exactly on the written mask.
    _, dataset = demo_root
    for category in demo.DEMO_CATEGORIES:
        cat_id = demo.DEMO_CATEGORIES.index(category)
        for k, kind in enumerate(demo.DEFECT_TYPES):
            rng = np.random.default_rng([0, cat_id, 2, k, 1])
            clean, _ = demo.make_clean_image(rng, category, image_size=SIZE)
            with Image.open(dataset / category / "test" / kind / "001.png") as im:
                written = np.asarray(im)
            with Image.open(dataset / category / "ground_truth" / kind / "001_mask.png") as im:
                mask = np.asarray(im) == 255
            np.testing.assert_array_equal(np.any(written != clean, axis=-1), mask)


def test_anomaly_sources_offline():
    sources = demo.skimage_anomaly_sources(32)
    assert sources.shape == (6, 32, 32, 3) and sources.dtype == np.float32
    assert 0.0 <= sources.min() and sources.max() <= 1.0 and sources.std() > 0.05
