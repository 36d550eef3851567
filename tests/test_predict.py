"""Prediction on new images from a trained, evaluated run (tiny CutPaste and PatchCore on the demo
data, with a held-out normal split): stored thresholds, CSV/JSON/overlays, unreadable and
wrongly sized files, manual thresholds."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from test_contract import tiny_config

from wdam_jax import evaluate, export, predict, thresholds, train
from wdam_jax.data import datasets, sources

METHODS = ("cutpaste", "patchcore", "draem")


@pytest.fixture(scope="module")
def runs(demo_data_root, tmp_path_factory):
    """``{name: workdir}``: each method trained and evaluated with 20% of its training images
    held out."""
    out = {}
    for name in METHODS:
        config = tiny_config(name, demo_data_root)
        config.data.holdout_fraction = 0.2
        config.score.threshold_fpr = 0.1
        workdir = tmp_path_factory.mktemp(f"{name}_run")
        evaluate.train_and_evaluate(config, workdir)
        out[name] = workdir
    return out


def _new_images(config, folder: pathlib.Path) -> list[pathlib.Path]:
    """Test images of the demo copied into one folder, one saved at another size, plus a
    truncated PNG and a text file."""
    test = sources.dataset_root(config.data) / config.data.category / "test"
    picks = [sorted((test / d).glob("*.png"))[0] for d in ("good", "crack", "scratch")]
    folder.mkdir()
    copies = []
    for i, p in enumerate(picks):
        target = folder / f"{i}_{p.parent.name}.png"
        shutil.copy(p, target)
        copies.append(target)
    big = folder / "3_big.png"
    Image.open(picks[1]).resize((200, 150)).save(big)  # wrong size and aspect ratio
    corrupt = folder / "4_corrupt.png"
    corrupt.write_bytes(picks[0].read_bytes()[:60])
    (folder / "5_notes.txt").write_text("not an image")
    return [*copies, big]


@pytest.mark.parametrize("name", METHODS)
def test_evaluation_stores_thresholds_from_the_holdout(name, runs):
    workdir = runs[name]
    run = train.restore(workdir)
    stored = json.loads((workdir / thresholds.THRESHOLDS_FILE).read_text())
    eval_copy = workdir / "eval" / f"step_{run.step}" / thresholds.THRESHOLDS_FILE
    assert json.loads(eval_copy.read_text()) == stored and stored["step"] == run.step
    assert stored["image"]["rule"] == "normal_fpr" and "holdout" in stored["image"]["source"]
    assert {"normal_fpr", "f1_max"} <= set(stored["candidates"]["image"])
    holdout = sources.load_split(run.config.data, split="holdout")
    normal = run.method.score(run.model, run.fitted, holdout.images, step=run.step)
    assert stored["image"]["threshold"] == pytest.approx(
        np.quantile(normal.image_scores, 0.9), rel=1e-5
    )
    if np.ptp(normal.image_scores) > 0:  # a tiny DRAEM after 2 steps scores every image alike
        assert stored["image"]["threshold"] > normal.image_scores.min()
    report = json.loads((workdir / "eval" / f"step_{run.step}" / "metrics.json").read_text())
    assert {"i_f1_max", "i_aupr", "p_f1_max", "p_aupr"} <= set(report["washer"])


@pytest.mark.parametrize("name", METHODS)
def test_predict_writes_rows_overlays_and_reports_bad_files(name, runs, tmp_path):
    workdir = runs[name]
    run = train.restore(workdir)
    images = _new_images(run.config, tmp_path / "new")
    rows = predict.predict(workdir, tmp_path / "new", tmp_path / "out", batch_size=2)
    out = tmp_path / "out"
    with (out / predict.CSV_FILE).open() as f:
        csv_rows = list(csv.DictReader(f))
    document = json.loads((out / predict.JSON_FILE).read_text())
    assert len(csv_rows) == len(rows) == len(document["predictions"]) == 6
    by_name = {pathlib.Path(r["path"]).name: r for r in csv_rows}
    for bad in ("4_corrupt.png", "5_notes.txt"):
        assert by_name[bad]["status"] == "error" and "Cannot read image" in by_name[bad]["error"]
        assert by_name[bad]["score"] == "" and by_name[bad]["overlay"] == ""
    assert "resized from 150x200" in by_name["3_big.png"]["note"]
    # Scores equal the method's own on the same preprocessing (independent of the chunking).
    size = run.config.data.image_size
    batch = np.stack([datasets.resize_image(datasets.read_rgb(p), image_size=size) for p in images])
    expected = run.method.score(run.model, run.fitted, batch, step=run.step)
    stored = thresholds.read(workdir, step=run.step)["image"]
    for p, score in zip(images, expected.image_scores, strict=True):
        row = by_name[p.name]
        assert row["status"] == "ok" and float(row["score"]) == pytest.approx(score, rel=1e-5)
        assert row["decision"] == ("anomalous" if score >= stored.value else "normal")
        assert float(row["normalised_score"]) == pytest.approx(stored.normalise(score), abs=1e-6)
        assert row["threshold_rule"] == "normal_fpr"
        overlay = Image.open(out / row["overlay"])
        assert overlay.size[0] == 3 * max(predict.OVERLAY_MIN_SIDE, size)
    assert document["threshold"]["rule"] == "normal_fpr"
    assert document["counts"]["errors"] == 2 and document["counts"]["files"] == 6


def test_manual_threshold_and_glob(runs, tmp_path):
    workdir = runs["cutpaste"]
    run = train.restore(workdir)
    _new_images(run.config, tmp_path / "new")
    rows = predict.predict(
        workdir, str(tmp_path / "new" / "[0-2]_*.png"), tmp_path / "out", threshold=-1.0,
        overlays=False,
    )  # fmt: skip
    assert len(rows) == 3 and all(r["decision"] == "anomalous" for r in rows)
    assert all(r["threshold_rule"] == "manual" and r["threshold"] == -1.0 for r in rows)
    assert all(r["normalised_score"] > 0.5 for r in rows)
    assert not any((tmp_path / "out" / predict.OVERLAY_DIR).iterdir())


def test_predict_warns_on_a_test_split_or_unsupported_threshold(runs, tmp_path, monkeypatch):
    workdir = tmp_path / "copy"
    shutil.copytree(runs["patchcore"], workdir)
    path = workdir / thresholds.THRESHOLDS_FILE
    document = json.loads(path.read_text())
    image = document["image"]
    assert image["source"].startswith("holdout split")
    assert image["rule_supported"] == (image["num_images"] * 0.1 >= 1)  # the fixture's FPR 0.1
    source = "test split, normal images (the run has no holdout split)"
    document["image"] = {
        **image,
        "rule_supported": False,
        "unsupported_because": "too few",
        "source": source,
    }
    path.write_text(json.dumps(document))
    warned = []
    monkeypatch.setattr(
        thresholds.logging, "warning", lambda msg, *args: warned.append(msg % args if args else msg)
    )
    (tmp_path / "new").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "new" / "a.png")
    predict.predict(workdir, tmp_path / "new", tmp_path / "out", overlays=False)
    assert any("TEST SPLIT" in w and "--config.data.holdout_fraction" in w for w in warned)
    assert any("does not hold its rule: too few" in w for w in warned)
    warned.clear()
    predict.predict(workdir, tmp_path / "new", tmp_path / "out", threshold=1.0, pixel_threshold=1.0)
    assert not any("TEST SPLIT" in w or "its rule" in w for w in warned)


def test_predict_without_stored_thresholds_says_how_to_get_them(runs, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(runs["patchcore"], workdir)
    (workdir / thresholds.THRESHOLDS_FILE).unlink()
    (tmp_path / "new").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "new" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"launch\.evaluate"):
        predict.predict(workdir, tmp_path / "new", tmp_path / "out")
    rows = predict.predict(workdir, tmp_path / "new", tmp_path / "out", threshold=1e9)
    assert rows[0]["decision"] == "normal" and rows[0]["threshold_rule"] == "manual"


# ---------------------------------------------------------------------------- export

FRESH_PROCESS = """
import json, sys
import numpy as np
import jax
import tensorflow as tf

out = {}
data = np.load("inputs.npz")
with open("export/model.stablehlo", "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
serving = tf.saved_model.load("export/saved_model").signatures["serving_default"]
for name in data.files:
    scores, maps = exported.call(data[name])
    out[f"jax_{name}_scores"], out[f"jax_{name}_maps"] = np.asarray(scores), np.asarray(maps)
    result = serving(images=tf.constant(data[name]))
    out[f"tf_{name}_scores"] = result["image_scores"].numpy()
    out[f"tf_{name}_maps"] = result["maps"].numpy()
np.savez("outputs.npz", **out)
meta = json.load(open("export/metadata.json"))
print(json.dumps({"wdam_jax_imported": any(m.startswith("wdam_jax") for m in sys.modules),
                  "batch": meta["input"]["shape"][0]}))
"""


def _test_images(run, n):
    return sources.load_split(run.config.data, split="test").images[:n]


@pytest.mark.parametrize("name", METHODS)
def test_inference_fn_equals_score(name, runs):
    run = train.restore(runs[name])
    images = _test_images(run, 5)
    expected = run.method.score(run.model, run.fitted, images, step=run.step)
    fn = jax.jit(run.method.inference_fn(run.model, run.fitted, step=run.step))
    scores, maps = fn(images)
    np.testing.assert_allclose(scores, expected.image_scores, rtol=1e-5)
    np.testing.assert_allclose(maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(maps).max())


def test_patchcore_inference_fn_equals_score_with_anomalib_scoring(runs):
    """The export path follows ``patchcore.scoring`` too (the run above scores "official")."""
    run = train.restore(runs["patchcore"])
    assert run.config.patchcore.scoring == "official"
    run.method.config.patchcore.scoring = "anomalib"
    images = _test_images(run, 3)
    expected = run.method.score(run.model, run.fitted, images, step=run.step)
    official = train.restore(runs["patchcore"])
    official = official.method.score(official.model, official.fitted, images, step=run.step)
    assert not np.allclose(expected.image_scores, official.image_scores)
    scores, maps = jax.jit(run.method.inference_fn(run.model, run.fitted, step=run.step))(images)
    np.testing.assert_allclose(scores, expected.image_scores, rtol=1e-5)
    np.testing.assert_allclose(maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(maps).max())


@pytest.mark.parametrize("name", METHODS)
def test_exported_artefacts_reproduce_scores_in_a_fresh_process(name, runs, tmp_path):
    workdir = runs[name]
    paths = export.export(workdir, tmp_path / "export")
    meta = json.loads(paths["metadata"].read_text())
    stored = json.loads((workdir / thresholds.THRESHOLDS_FILE).read_text())
    assert meta["thresholds"]["image"] == stored["image"] and meta["input"]["shape"][0] == "b"
    run = train.restore(workdir)
    images = _test_images(run, 5)
    batches = {"three": images[:3], "five": images}  # one artefact, two batch sizes
    np.savez(tmp_path / "inputs.npz", **batches)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"wdam_jax_imported": False, "batch": "b"}
    outputs = np.load(tmp_path / "outputs.npz")
    for key, batch in batches.items():
        expected = run.method.score(run.model, run.fitted, batch, step=run.step)
        for runtime in ("jax", "tf"):
            scores, maps = outputs[f"{runtime}_{key}_scores"], outputs[f"{runtime}_{key}_maps"]
            assert maps.shape == expected.maps.shape
            np.testing.assert_allclose(scores, expected.image_scores, rtol=1e-5)
            atol = 1e-5 * np.abs(expected.maps).max()
            np.testing.assert_allclose(maps, expected.maps, rtol=1e-5, atol=atol)
