"""Dataset readers (MVTec AD, VisA, folder, foreground masks) and the TFDS builders."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from wdam_jax.data import datasets
from wdam_jax.data.datasets import DatasetError

SIZE = 40  # original resolution of the fixture images


def _save(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_mvtec(root: pathlib.Path, category: str, *, gray: bool = False, seed: int = 0):
    """A tiny MVTec-layout category: 3 train, 2 good test, 2 'crack' test images with masks."""
    rng = np.random.default_rng(seed)
    shape = (SIZE, SIZE) if gray else (SIZE, SIZE, 3)

    def img():
        return rng.integers(0, 256, shape, dtype=np.uint8)

    for i in range(3):
        _save(root / category / "train" / "good" / f"{i:03d}.png", img())
    for i in range(2):
        _save(root / category / "test" / "good" / f"{i:03d}.png", img())
    masks = {}
    for i in range(2):
        _save(root / category / "test" / "crack" / f"{i:03d}.png", img())
        m = np.zeros((SIZE, SIZE), np.uint8)
        m[4 + 10 * i : 14 + 10 * i, 8:30] = 255
        _save(root / category / "ground_truth" / "crack" / f"{i:03d}_mask.png", m)
        masks[i] = m > 0
    return masks


@pytest.fixture
def mvtec_root(tmp_path):
    root = tmp_path / "mvtec"
    _write_mvtec(root, "bottle")
    _write_mvtec(root, "grid", gray=True, seed=1)
    return root


# ---------------------------------------------------------------------------- MVTec AD


def test_mvtec_train_split(mvtec_root):
    split = datasets.load_mvtec(mvtec_root, "bottle", split="train", image_size=20)
    assert split.images.shape == (3, 20, 20, 3) and split.images.dtype == np.float32
    assert split.masks.shape == (3, 20, 20) and split.masks.dtype == bool and not split.masks.any()
    assert split.labels.tolist() == [0, 0, 0] and split.labels.dtype == np.int32
    assert split.paths == [f"bottle/train/good/{i:03d}.png" for i in range(3)]
    assert pathlib.Path(split.root) == mvtec_root and len(split) == 3
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    # Bilinear (antialiased) resize of the file, by PIL.
    with Image.open(mvtec_root / "bottle/train/good/000.png") as im:
        expected = np.asarray(im.resize((20, 20), Image.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(split.images[0], expected)


def test_mvtec_test_split_masks_and_labels(mvtec_root):
    split = datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=20)
    assert split.defect_types == ["crack", "crack", "good", "good"]
    assert split.labels.tolist() == [1, 1, 0, 0]
    assert not split.masks[2:].any()  # good test images: all-zero masks
    # The fixture's mask 0 covers rows 4:14, cols 8:30 of 40 -> rows 2:7, cols 4:15 at 20.
    expected = np.zeros((20, 20), bool)
    expected[2:7, 4:15] = True
    np.testing.assert_array_equal(split.masks[0], expected)
    assert [m.shape for m in split.original_masks] == [(SIZE, SIZE)] * 4
    assert split.original_masks[0][4:14, 8:30].all() and split.original_masks[0].sum() == 220
    assert not split.original_masks[3].any()


def test_mvtec_grayscale_becomes_three_channels(mvtec_root):
    split = datasets.load_mvtec(mvtec_root, "grid", split="train", image_size=16)
    assert split.images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(split.images[..., 0], split.images[..., 2])


def test_mvtec_centre_crop_applies_to_image_mask_and_original_mask(mvtec_root):
    full = datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=20)
    crop = datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=20, crop_size=10)
    assert crop.images.shape == (4, 10, 10, 3) and crop.masks.shape == (4, 10, 10)
    np.testing.assert_array_equal(crop.images, full.images[:, 5:15, 5:15])
    np.testing.assert_array_equal(crop.masks, full.masks[:, 5:15, 5:15])
    # The crop box (5:15 of 20) maps back to 10:30 of the 40-pixel original.
    for c, f in zip(crop.original_masks, full.original_masks, strict=True):
        np.testing.assert_array_equal(c, f[10:30, 10:30])


def test_missing_category_is_named(mvtec_root):
    with pytest.raises(DatasetError, match=r"'cable' not found.*bottle.*grid"):
        datasets.load_mvtec(mvtec_root, "cable", split="train", image_size=16)
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load_mvtec(mvtec_root / "nowhere", "bottle", split="train", image_size=16)


def test_image_without_mask_is_named(mvtec_root):
    (mvtec_root / "bottle/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/001\.png has no mask.*001_mask\.png"):
        datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=16)


def test_unreadable_file_is_named(mvtec_root):
    bad = mvtec_root / "bottle/train/good/001.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"Cannot read image .*001\.png"):
        datasets.load_mvtec(mvtec_root, "bottle", split="train", image_size=16)
    (mvtec_root / "bottle/ground_truth/crack/000_mask.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=r"Cannot read mask .*000_mask\.png"):
        datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=16)


def test_mask_of_other_size_is_named(mvtec_root):
    _save(mvtec_root / "bottle/ground_truth/crack/000_mask.png", np.zeros((30, 40), np.uint8))
    with pytest.raises(DatasetError, match=r"000_mask\.png is 40x30 but its image .*000\.png"):
        datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=16)


def test_empty_or_missing_split_folder_is_named(mvtec_root):
    for p in (mvtec_root / "bottle/test/good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"test/good holds no images"):
        datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=16)
    with pytest.raises(ValueError, match="split"):
        datasets.load_mvtec(mvtec_root, "bottle", split="val", image_size=16)


# ---------------------------------------------------------------------------- VisA


def test_visa_layout_jpg_images_and_label_value_masks(tmp_path):
    root = tmp_path / "visa"
    rng = np.random.default_rng(0)
    for i in range(2):
        _save(root / f"candle/train/good/{i:04d}.JPG", rng.integers(0, 256, (24, 32, 3), np.uint8))
    for d in ("good", "bad"):
        _save(root / f"candle/test/{d}/0100.JPG", rng.integers(0, 256, (24, 32, 3), np.uint8))
    mask = np.zeros((24, 32), np.uint8)
    mask[5:9, 10:20] = 1  # VisA stores small label values, not 255
    _save(root / "candle/ground_truth/bad/0100.png", mask)
    train = datasets.load_visa(root, "candle", split="train", image_size=16)
    test = datasets.load_visa(root, "candle", split="test", image_size=16)
    assert train.images.shape == (2, 16, 16, 3) and train.labels.tolist() == [0, 0]
    assert test.defect_types == ["bad", "good"] and test.labels.tolist() == [1, 0]
    np.testing.assert_array_equal(test.original_masks[0], mask > 0)
    assert test.masks[0].any() and not test.masks[1].any()
    with pytest.raises(DatasetError, match=r"VisA category 'pcb1' not found"):
        datasets.load_visa(root, "pcb1", split="train", image_size=16)


# ---------------------------------------------------------------------------- folder layout


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        _save(tmp_path / "normal" / f"n{i}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    for i in range(2):
        _save(tmp_path / "bad" / f"b{i}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        m = np.zeros((20, 20), np.uint8)
        m[2:6, 2:6] = 255
        _save(tmp_path / "masks" / f"b{i}_mask.png", m)
    return tmp_path


def test_folder_train_and_test_are_disjoint(folder):
    kw = dict(abnormal_dir=folder / "bad", mask_dir=folder / "masks", image_size=8)
    train = datasets.load_folder(folder / "normal", split="train", **kw)
    test = datasets.load_folder(folder / "normal", split="test", **kw)
    assert len(train) == 8 and train.labels.tolist() == [0] * 8
    assert len(test) == 4 and test.labels.tolist() == [0, 0, 1, 1]
    assert not set(train.paths) & set(test.paths)
    assert test.masks[2:].any(axis=(1, 2)).all() and test.has_pixel_labels
    # Deterministic hold-out.
    again = datasets.load_folder(folder / "normal", split="test", **kw)
    assert again.paths == test.paths


def test_folder_abnormal_without_mask_is_named(folder):
    (folder / "masks" / "b1_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"b1\.png has no mask"):
        datasets.load_folder(
            folder / "normal",
            abnormal_dir=folder / "bad",
            mask_dir=folder / "masks",
            split="test",
            image_size=8,
        )
    # Without mask_dir the split is usable for image metrics only, and says so.
    test = datasets.load_folder(
        folder / "normal", abnormal_dir=folder / "bad", split="test", image_size=8
    )
    assert not test.has_pixel_labels and test.labels.sum() == 2


def test_folder_missing_dir_is_named(folder):
    with pytest.raises(DatasetError, match=r"nothere does not exist"):
        datasets.load_folder(folder / "nothere", split="train", image_size=8)


# ---------------------------------------------------------------------------- foreground masks


def test_foreground_masks_follow_split_geometry(mvtec_root, tmp_path):
    split = datasets.load_mvtec(mvtec_root, "bottle", split="train", image_size=20, crop_size=10)
    fg_root = tmp_path / "fg"
    fgs = []
    for i, rel in enumerate(split.paths):
        m = np.zeros((SIZE, SIZE), np.uint8)
        m[10 + i :, 10:] = 255
        _save(datasets.foreground_mask_path(fg_root, rel), m)
        fgs.append(m > 0)
    assert datasets.foreground_mask_path(fg_root, "bottle/train/good/000.png") == (
        fg_root / "bottle/train/good/000.png"
    )
    loaded = datasets.load_foreground_masks(fg_root, split, image_size=20, crop_size=10)
    assert loaded.shape == (3, 10, 10) and loaded.dtype == bool
    for got, m in zip(loaded, fgs, strict=True):
        np.testing.assert_array_equal(got, datasets.resize_mask(m, image_size=20, crop_size=10))
    (fg_root / "bottle/train/good/002.png").unlink()
    with pytest.raises(DatasetError, match=r"Foreground mask .*002\.png .* is missing"):
        datasets.load_foreground_masks(fg_root, split.paths, image_size=20)


# ---------------------------------------------------------------------------- TFDS


def test_tfds_builder_builds_and_reads_back(mvtec_root, tmp_path):
    import tensorflow_datasets as tfds

    from wdam_jax.data import tfds_builder

    data_dir = tmp_path / "tfds"
    builder = tfds_builder.build_dataset(
        "mvtec_ad/bottle", manual_dir=mvtec_root, data_dir=data_dir
    )
    assert builder.info.splits["train"].num_examples == 3
    train = list(builder.as_dataset(split="train").as_numpy_iterator())
    assert sorted(ex["path"].decode() for ex in train) == [
        f"bottle/train/good/{i:03d}.png" for i in range(3)
    ]
    test = tfds.load("mvtec_ad/bottle", split="test", data_dir=data_dir, download=False)
    by_path = {ex["path"].decode(): ex for ex in test.as_numpy_iterator()}
    ref = datasets.load_mvtec(mvtec_root, "bottle", split="test", image_size=SIZE)
    assert sorted(by_path) == sorted(ref.paths)
    for i, rel in enumerate(ref.paths):
        ex = by_path[rel]
        with Image.open(mvtec_root / rel) as im:
            np.testing.assert_array_equal(ex["image"], np.asarray(im.convert("RGB")))
        np.testing.assert_array_equal(ex["mask"][..., 0] > 0, ref.original_masks[i])
        assert ex["label"] == ref.labels[i] and ex["defect_type"].decode() == ref.defect_types[i]
    assert "mvtec.com" in tfds_builder.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert "prepare_data.py" in tfds_builder.Visa.MANUAL_DOWNLOAD_INSTRUCTIONS


def test_tfds_source_equals_the_folder_reader(mvtec_root, tmp_path):
    import ml_collections

    from wdam_jax.data import sources

    data = ml_collections.ConfigDict(
        {"dataset": "tfds", "root": str(tmp_path / "tfds"), "category": "bottle",
         "image_size": SIZE, "crop_size": 0, "tfds_name": "mvtec_ad", "tfds_manual_dir": ""}
    )  # fmt: skip
    with pytest.raises(DatasetError, match=r"not prepared .*tfds_manual_dir"):
        sources.load_split(data, split="test")
    data.tfds_manual_dir = str(mvtec_root)  # built on first use
    for split in ("train", "test"):
        got = sources.load_split(data, split=split)
        ref = datasets.load_mvtec(mvtec_root, "bottle", split=split, image_size=SIZE)
        order = np.argsort(got.paths)
        ref_order = np.argsort(ref.paths)
        assert [got.paths[i] for i in order] == [ref.paths[i] for i in ref_order]
        np.testing.assert_array_equal(got.images[order], ref.images[ref_order])
        np.testing.assert_array_equal(got.masks[order], ref.masks[ref_order])
        np.testing.assert_array_equal(got.labels[order], ref.labels[ref_order])
        for i, j in zip(order, ref_order, strict=True):
            np.testing.assert_array_equal(got.original_masks[i], ref.original_masks[j])


def test_tfds_builder_reports_bad_data(mvtec_root, tmp_path):
    from wdam_jax.data import tfds_builder

    (mvtec_root / "grid/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/000\.png has no mask"):
        tfds_builder.build_dataset("mvtec_ad/grid", manual_dir=mvtec_root, data_dir=tmp_path)
    with pytest.raises(ValueError, match="mvtec_ad/<category>"):
        tfds_builder.build_dataset("mvtec", manual_dir=mvtec_root, data_dir=tmp_path)
