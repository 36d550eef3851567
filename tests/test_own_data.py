"""Bring your own images: a user's MVTec-layout folder with the usual surprises, commands run from
another directory, every input problem reported at once, nothing stale reused."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from wdam_jax import checkpoints, evaluate, runs, train
from wdam_jax.data import datasets, sources
from wdam_jax.data import summary as data_summary
from wdam_jax.methods import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.depths=(1,1,1,1)",
    "--config.model.base_width=8",
    "--config.model.head_dims=(16,)",
    "--config.data.image_size=32",
    "--config.train.batch_size=2",
    "--config.train.stage1_steps=2",
    "--config.train.stage2_steps=1",
    "--config.train.stage3_steps=2",
    "--config.score.eval_batch_size=8",
]


@pytest.fixture
def user_folder(demo_data_root, tmp_path) -> pathlib.Path:
    """``<root>/widget`` in the MVTec layout from the demo washer, plus a grayscale image, an
    RGBA image, a non-square image and a text file among the training images."""
    source = sources.dataset_root(
        _data(dataset="demo", root=str(demo_data_root), category="washer")
    )
    root = tmp_path / "my_images"
    shutil.copytree(source / "washer", root / "widget")
    good = root / "widget" / "train" / "good"
    for extra in sorted(good.iterdir())[12:]:
        extra.unlink()  # 12 training images are enough
    rgb = lambda name: Image.open(good / name).convert("RGB")
    rgb("000.png").convert("L").save(good / "000.png")
    rgb("001.png").convert("RGBA").save(good / "001.png")
    rgb("002.png").resize((48, 32)).save(good / "002.png")
    (good / "notes.txt").write_text("taken on line 3")
    return root


def _data(**fields):
    import ml_collections

    base = {"dataset": "mvtec", "root": "", "category": "", "image_size": 32, "crop_size": 0}
    return ml_collections.ConfigDict({**base, **fields})


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_custom_config_trains_and_evaluates_from_another_directory(user_folder, tmp_path):
    workdir = tmp_path / "run"
    out = _run(
        [
            "launch.train",
            "--config=configs/cutpaste_wdam.py:custom",  # resolved against the package
            f"--workdir={workdir}",
            f"--config.data.root={user_folder}",
            "--config.data.category=widget",
            *TINY,
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train: 12 images (good 12)" in out.stdout
    for warning in ("grayscale", "RGBA", "not square", "notes.txt"):
        assert warning in out.stderr, warning
    summary = json.loads((workdir / "data_summary.json").read_text())
    assert summary["modes"] == {"RGB": 40, "L": 1, "RGBA": 1}  # 12 train + 30 test images
    assert [i["path"] for i in summary["ignored"]] == ["train/good/notes.txt"]
    outdir = workdir / "eval" / "step_5"
    assert (outdir / "heatmaps.png").is_file() and (outdir / "metrics.md").is_file()
    assert "cutpaste+wdam1" in out.stdout  # the run's real name labels the results


def test_every_input_problem_is_listed_at_once(user_folder, tmp_path):
    workdir = tmp_path / "run"
    out = _run(
        [
            "launch.train",
            "--config=configs/cutpaste_wdam.py",  # the paper config: weights, FMAS and FM needed
            f"--workdir={workdir}",
            f"--config.data.root={user_folder}",
            "--config.data.category=widget",
            "--config.data.image_size=0",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "4 problem(s)" in out.stderr
    for field in (
        "config.data.image_size=0",
        "config.model.pretrained=",
        "config.data.fmas_records=",
        "--config.augment.foreground_mask=False",
    ):
        assert field in out.stderr, field
    assert not workdir.exists()  # nothing written


def test_unknown_and_mistyped_overrides_are_one_readable_message(tmp_path):
    out = _run(
        [
            "launch.train",
            "--config=configs/cutpaste.py:demo",
            f"--workdir={tmp_path / 'run'}",
            "--config.train.stage1_step=40",
            "--config.train.batch_size=abc",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "\\n" not in out.stderr
    assert "Did you mean train.stage1_steps?" in out.stderr
    assert "--config.train.batch_size=abc: expected int" in out.stderr
    missing = _run(["launch.train", "--config=configs/nope.py", "--workdir=w"], cwd=tmp_path)
    assert missing.returncode == 2 and "Known configs:" in missing.stderr


def test_summary_warns_on_what_the_loader_converts(tmp_path):
    base = tmp_path / "root" / "cat"
    good, bad, gt = base / "train/good", base / "test/dent", base / "ground_truth/dent"
    for d in (good, bad, gt, base / "test/good"):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels()).save(good / "a.png")
    Image.fromarray(pixels()).save(good / "b.jpg")
    shutil.copy(good / "a.png", base / "test/good/a_copy.png")
    Image.fromarray((rng.integers(0, 65535, (16, 16))).astype(np.uint16)).save(good / "c.png")
    Image.fromarray(pixels()).save(bad / "000.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(gt / "000_mask.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(gt / "007_mask.png")  # no image 007
    summary = data_summary.summarize(_data(root=str(tmp_path / "root"), category="cat"))
    text = " ".join(summary["warnings"])
    assert summary["masks_without_image"] == ["ground_truth/dent/007_mask.png"]
    assert "16-bit grey: scaled to 8 bits" in text
    assert "Mixed image formats" in text
    assert "defect mask(s) are empty" in text
    assert "byte-identical" in text
    assert summary["images"] == {"test": {"dent": 1, "good": 1}, "train": {"good": 3}}


def test_huge_and_non_finite_images_are_clear_errors(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: a "bomb"
    with pytest.raises(datasets.DatasetError, match=r"big\.png.*too large to decode safely"):
        datasets.read_rgb(tmp_path / "big.png")
    monkeypatch.undo()
    Image.fromarray(np.array([[0.5, np.nan]], np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(datasets.DatasetError, match=r"nan\.tif.*NaN or infinite"):
        datasets.read_rgb(tmp_path / "nan.tif")


def test_undecodable_fmas_record_names_its_source():
    from wdam_jax.data import fmas_records

    with pytest.raises(datasets.DatasetError, match=r"FMAS record for a/train/good/0\.png"):
        fmas_records._decode(b"not a png", b"", b"a/train/good/0.png", 8, None)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgb = datasets.read_rgb(tmp_path / "g.png")
    np.testing.assert_array_equal(rgb[..., 0], [[0, 100, 255]])
    assert rgb.shape == (1, 3, 3)


def test_stale_patchcore_bank_is_refitted(demo_data_root, tmp_path):
    from test_contract import tiny_config

    data = tmp_path / "data"
    shutil.copytree(sources.dataset_root(tiny_config("patchcore", demo_data_root).data), data)
    config = tiny_config("patchcore", demo_data_root)
    config.data.dataset = "mvtec"
    config.data.root = str(data)
    train.train(config, tmp_path / "run")
    first = runs.restore(tmp_path / "run")
    # Replace one training image: the bank no longer describes the training set.
    image = data / "washer" / "train" / "good" / "000.png"
    Image.fromarray(255 - np.asarray(Image.open(image).convert("RGB"))).save(image)
    assert runs.stale(registry.get_method(config), first.fitted)
    train.train(config, tmp_path / "run")
    second = runs.restore(tmp_path / "run")
    assert not runs.stale(second.method, second.fitted)
    assert not np.array_equal(first.fitted["plain.bank"], second.fitted["plain.bank"])
    # The same command again reuses it (nothing changed).
    train.train(config, tmp_path / "run")
    third = runs.restore(tmp_path / "run")
    np.testing.assert_array_equal(third.fitted["plain.bank"], second.fitted["plain.bank"])
    assert evaluate.evaluate(None, tmp_path / "run")["washer"]


def test_resume_with_another_image_size_is_refused(demo_data_root, tmp_path):
    from test_contract import tiny_config

    config = tiny_config("cutpaste", demo_data_root)
    train.train(config, tmp_path / "run", stop_at=1)
    saved = (tmp_path / "run" / checkpoints.CONFIG_FILE).read_text()
    config.data.image_size = 48
    with pytest.raises(checkpoints.ConfigMismatchError, match=r"data\.image_size: 32 -> 48"):
        train.train(config, tmp_path / "run")
    assert (tmp_path / "run" / checkpoints.CONFIG_FILE).read_text() == saved


def test_summary_counts_held_out_images_and_warns_on_upscaling(user_folder):
    data = _data(
        root=str(user_folder), category="widget", image_size=40, holdout_fraction=0.25,
        holdout_seed=0,
    )  # fmt: skip
    summary = data_summary.summarize(data)
    held = len(sources.load_split(data, split="holdout"))  # what the runs hold out
    assert held == 3 and summary["images"]["train"] == {"good": 12}
    assert summary["held_out"]["threshold"] == held
    assert summary["held_out"]["left_for_training"] == 12 - held
    assert len(sources.load_split(data, split="train")) == 12 - held
    text = data_summary.format_summary(summary)
    assert "train: 12 images (good 12); 3 held out for the decision threshold, 9 left" in text
    # 002.png is 48 x 32 (width x height): not square, and smaller than 40 in height.
    warnings = " ".join(summary["warnings"])
    assert "not square (e.g. train/good/002.png (48x32))" in warnings
    assert "1 image(s) are smaller than 40x40 (e.g. train/good/002.png (48x32))" in warnings
    no_holdout = data_summary.summarize(_data(root=str(user_folder), category="widget"))
    assert no_holdout["held_out"]["threshold"] == 0
    assert "held out" not in data_summary.format_summary(no_holdout)


def test_log_names_the_network_that_is_built(caplog):
    from configs import cutpaste, patchcore
    from wdam_jax.methods import cutpaste as cutpaste_method
    from wdam_jax.methods import patchcore_method
    from wdam_jax.models import wide_resnet

    assert wide_resnet.network_name((3, 4, 6, 3), 64) == "WideResNet50-2"
    assert wide_resnet.network_name((1, 1, 1, 1), 32) == "reduced WideResNet (1,1,1,1)/32"
    model = cutpaste.get_config("demo").model
    model.base_width, model.head_dims = 8, (16,)
    with caplog.at_level("WARNING"):
        cutpaste_method.create_model(model, seed=0)
    assert "training a reduced WideResNet (1,1,1,1)/8 FROM SCRATCH" in caplog.text
    member = patchcore.get_config("custom").members.plain
    member.depths, member.base_width = (1, 1, 1, 1), 8
    caplog.clear()
    with caplog.at_level("WARNING"):
        patchcore_method.load_member("plain", member, "widget")
    assert "RANDOMLY INITIALISED reduced WideResNet (1,1,1,1)/8" in caplog.text
    assert "WideResNet50-2" not in caplog.text.split("download")[0]


def test_patchcore_custom_runs_from_another_directory_without_weights(user_folder, tmp_path):
    workdir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.train",
            "--config=configs/patchcore.py:custom",  # resolved against the package
            f"--workdir={workdir}",
            f"--config.data.root={user_folder}",
            "--config.data.category=widget",
            "--config.data.image_size=32",
            "--config.members.plain.depths=(1,1,1,1)",
            "--config.members.plain.base_width=8",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's code, from anywhere
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RANDOMLY INITIALISED reduced WideResNet (1,1,1,1)/8: no ImageNet weights" in out.stderr
    assert "fixed random filters" in out.stderr and "--config.members.plain.weights" in out.stderr
    assert "2 held out for the decision threshold, 10 left for training" in out.stdout
    assert (workdir / "thresholds.json").is_file()  # decisions from the held-out images
    table = (workdir / "eval" / "step_0" / "metrics.md").read_text()
    assert "| widget |" in table and "| widget: crack |" in table  # per defect type too


def test_patchcore_custom_uses_imagenet_weights_where_given(tmp_path, monkeypatch, caplog):
    from configs import patchcore
    from wdam_jax.methods import patchcore_method
    from wdam_jax.models import wide_resnet

    config = patchcore.get_config("custom")
    config.data.root, config.data.category = str(tmp_path), "widget"
    config.members.plain.weights = str(tmp_path / "wrn50_2_imagenet")
    problems = registry.method_class("patchcore")(config).check_inputs()
    assert any("members.plain.weights" in p and "no converted weights" in p for p in problems)
    loaded = []
    monkeypatch.setattr(
        wide_resnet, "load_pretrained", lambda path, **kw: loaded.append(path) or "the weights"
    )
    with caplog.at_level("WARNING"):
        model = patchcore_method.load_member("plain", config.members.plain, "widget")
    assert model == "the weights" and loaded == [config.members.plain.weights]
    assert "RANDOMLY" not in caplog.text


def test_draem_custom_reads_a_folder_and_holds_out_threshold_images(user_folder):
    from configs import draem

    config = draem.get_config("custom")
    assert (config.data.dataset, config.data.root, config.data.category) == ("mvtec", "", "")
    assert config.data.anomaly_source_dir == "procedural"  # no DTD needed
    config.data.root, config.data.category = str(user_folder), "widget"
    config.data.image_size = 32
    method = registry.method_class("draem")(config)
    assert method.check_inputs() == []
    held = sources.load_split(config.data, split="holdout")
    # 12 training images: 2 held out for the threshold, the other 10 split into training and
    # validation; none of the held-out ones in either.
    data = method.data
    assert len(held) == 2 and len(data.images) + len(data.val_images) == 10
    train_rows = {im.tobytes() for im in (*data.images, *data.val_images)}
    assert not any(im.tobytes() in train_rows for im in held.images)
