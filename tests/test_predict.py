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

from wdam_jax import evaluate, export, predict, thresholds
from wdam_jax import runs as run_store
from wdam_jax.data import datasets, sources
from wdam_jax.errors import MissingFileError
from wdam_jax.methods import registry

METHODS = tuple(sorted(registry.METHODS))  # every registered method


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
    """Test images of the demo copied into one folder, one saved at another size and aspect
    ratio, one tiny, plus a truncated PNG and a text file."""
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
    tiny = folder / "6_tiny.png"
    Image.open(picks[2]).resize((24, 24)).save(tiny)  # upscaled to the model's input
    return [*copies, big, tiny]


@pytest.mark.parametrize("name", METHODS)
def test_evaluation_stores_thresholds_from_the_holdout(name, runs):
    workdir = runs[name]
    run = run_store.restore(workdir)
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
def test_evaluation_reports_every_defect_type_and_the_held_out_images(name, runs):
    from sklearn.metrics import roc_auc_score

    workdir = runs[name]
    eval_dir = max((workdir / "eval").glob("step_*"), key=lambda p: int(p.name[5:]))
    saved = np.load(eval_dir / "scores.npz")
    kinds = np.array([pathlib.Path(p).parent.name for p in saved["paths"]])
    labels, scores = saved["labels"], saved["image_scores"]
    types = sorted(set(kinds[labels == 1]))
    by_defect = json.loads((eval_dir / "metrics.json").read_text())["by_defect_type"]["washer"]
    assert sorted(by_defect) == types and len(types) == 5
    table = (eval_dir / "metrics.md").read_text()
    for kind in types:  # each type's images against every normal one, by scikit-learn
        keep = (labels == 0) | (kinds == kind)
        expected = roc_auc_score(labels[keep], scores[keep])
        assert by_defect[kind]["i_auroc"] == pytest.approx(expected, abs=1e-9)
        assert f"| washer: {kind} | {100 * expected:.1f} |" in table
    assert (eval_dir / "heatmaps.png").is_file()
    summary = json.loads((workdir / run_store.DATA_SUMMARY).read_text())
    n_train = summary["images"]["train"]["good"]
    held = len(sources.holdout_indices(n_train, fraction=0.2, seed=0))
    assert summary["held_out"]["threshold"] == held > 0
    assert summary["held_out"]["left_for_training"] == n_train - held


@pytest.mark.parametrize("name", METHODS)
def test_predict_writes_rows_overlays_and_reports_bad_files(name, runs, tmp_path):
    workdir = runs[name]
    run = run_store.restore(workdir)
    images = _new_images(run.config, tmp_path / "new")
    rows = predict.predict(workdir, tmp_path / "new", tmp_path / "out", batch_size=2)
    out = tmp_path / "out"
    with (out / predict.CSV_FILE).open() as f:
        csv_rows = list(csv.DictReader(f))
    document = json.loads((out / predict.JSON_FILE).read_text())
    assert len(csv_rows) == len(rows) == len(document["predictions"]) == 6
    by_name = {pathlib.Path(r["path"]).name: r for r in csv_rows}
    bad = "4_corrupt.png"
    assert by_name[bad]["status"] == "error" and "Cannot read image" in by_name[bad]["error"]
    assert by_name[bad]["score"] == "" and by_name[bad]["overlay"] == ""
    # A file without an image suffix is skipped and listed, as training does.
    assert "5_notes.txt" not in by_name
    assert [pathlib.Path(s["path"]).name for s in document["skipped"]] == ["5_notes.txt"]
    # Width x height everywhere, as data_summary.json; the training warnings, for the inputs.
    size = run.config.data.image_size
    assert by_name["3_big.png"]["original_size"] == "200x150"
    assert f"resized from 200x150 to {size}x{size}" in by_name["3_big.png"]["note"]
    assert "aspect ratio changed" in by_name["3_big.png"]["note"]
    assert "upscaled" in by_name["6_tiny.png"]["note"]
    warnings = document["input_warnings"]
    assert any("not square" in w and "3_big.png (200x150)" in w for w in warnings), warnings
    assert any(f"smaller than {size}x{size}" in w and "6_tiny.png (24x24)" in w for w in warnings)
    assert any("5_notes.txt" in w and "skipped" in w for w in warnings), warnings
    # Scores equal the method's own on the same preprocessing (independent of the chunking).
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
    assert document["counts"]["errors"] == 1 and document["counts"]["files"] == 6
    assert document["counts"]["skipped"] == 1


def test_manual_threshold_and_glob(runs, tmp_path):
    workdir = runs["cutpaste"]
    run = run_store.restore(workdir)
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
    predict.predict(
        workdir,
        tmp_path / "new",
        tmp_path / "out",
        threshold=1.0,
        pixel_threshold=1.0,
        overwrite=True,
    )
    assert not any("TEST SPLIT" in w or "its rule" in w for w in warned)


def test_predict_without_stored_thresholds_says_how_to_get_them(runs, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(runs["patchcore"], workdir)
    (workdir / thresholds.THRESHOLDS_FILE).unlink()
    for report in (workdir / "eval").glob(f"step_*/{thresholds.THRESHOLDS_FILE}"):
        report.unlink()  # the evaluation report's copy, read when the run's is missing
    (tmp_path / "new").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "new" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"launch\.evaluate"):
        predict.predict(workdir, tmp_path / "new", tmp_path / "out")
    rows = predict.predict(workdir, tmp_path / "new", tmp_path / "out", threshold=1e9)
    assert rows[0]["decision"] == "normal" and rows[0]["threshold_rule"] == "manual"


# ---------------------------------------------------------------------------- export

# Runs the loading instructions of metadata.json for one artefact in a process that can import
# only the standard library and the packages the instructions name, with what pip would install
# with them (their requirements, transitively): a fresh venv with just those packages.
FRESH_PROCESS = """
import importlib.abc, importlib.metadata as md, json, os, re, sys, sysconfig

artefact, without = sys.argv[1], set(sys.argv[2:])
loading = json.load(open("export/metadata.json"))["loading"][artefact]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
modules_of = md.packages_distributions()
installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
todo = [re.match(r"[A-Za-z0-9._-]+", p).group() for p in loading["packages"]]
allowed = set()
while todo:
    name = norm(todo.pop())
    dists = [installed[name]] if name in installed else [
        installed[norm(d)] for d in modules_of.get(name.replace("-", "_"), [])
    ]
    for dist in dists:
        dist_name = norm(dist.metadata["Name"])
        if dist_name in allowed or dist_name in without:
            continue
        allowed.add(dist_name)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group())
modules = {m for m, ds in modules_of.items() if any(norm(d) in allowed for d in ds)}
stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}


class OnlyThesePackages(importlib.abc.MetaPathFinder):
    # A top-level module is importable if it is the standard library's or an allowed package's.
    def find_spec(self, name, path=None, target=None):
        if "." in name or name in modules:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, None)
            if spec is not None:
                break
        else:
            return None
        if spec.origin in ("built-in", "frozen"):
            return None
        where = os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations)))
        if "site-packages" not in where and any(where.startswith(s + os.sep) for s in stdlib):
            return None
        raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)


sys.meta_path.insert(0, OnlyThesePackages())
import numpy as np

data, out = np.load("inputs.npz"), {}
os.chdir("export")  # the instructions run in the export folder
for key in data.files:
    scope = {"images": data[key]}
    exec(loading["python"], scope)
    out[f"{key}_scores"] = np.asarray(scope["image_scores"])
    out[f"{key}_maps"] = np.asarray(scope["maps"])
np.savez(f"../outputs_{artefact}.npz", **out)
repo = [m for m in sys.modules if m.partition(".")[0] in ("wdam_jax", "launch", "configs")]
print(json.dumps({"repository_modules": repo, "allowed": sorted(allowed)}))
"""


def _load_in_fresh_process(folder: pathlib.Path, artefact: str, *without: str):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-I", "-c", FRESH_PROCESS, artefact, *without], cwd=folder, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _test_images(run, n):
    return sources.load_split(run.config.data, split="test").images[:n]


@pytest.mark.parametrize("name", METHODS)
def test_inference_fn_equals_score(name, runs):
    run = run_store.restore(runs[name])
    images = _test_images(run, 5)
    expected = run.method.score(run.model, run.fitted, images, step=run.step)
    fn = jax.jit(run.method.inference_fn(run.model, run.fitted, step=run.step))
    scores, maps = fn(images)
    np.testing.assert_allclose(scores, expected.image_scores, rtol=1e-5)
    np.testing.assert_allclose(maps, expected.maps, rtol=1e-5, atol=1e-5 * np.abs(maps).max())


def test_patchcore_inference_fn_equals_score_with_anomalib_scoring(runs):
    """The export path follows ``patchcore.scoring`` too (the run above scores "official")."""
    run = run_store.restore(runs["patchcore"])
    assert run.config.patchcore.scoring == "official"
    run.method.config.patchcore.scoring = "anomalib"
    images = _test_images(run, 3)
    expected = run.method.score(run.model, run.fitted, images, step=run.step)
    official = run_store.restore(runs["patchcore"])
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
    run = run_store.restore(workdir)
    images = _test_images(run, 5)
    batches = {"three": images[:3], "five": images}  # one artefact, two batch sizes
    np.savez(tmp_path / "inputs.npz", **batches)
    for artefact in ("stablehlo", "saved_model"):
        result = _load_in_fresh_process(tmp_path, artefact)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["repository_modules"] == [], report
        assert not {"wdam-jax", "flax", "torch"} & set(report["allowed"]), report["allowed"]
        outputs = np.load(tmp_path / f"outputs_{artefact}.npz")
        for key, batch in batches.items():
            expected = run.method.score(run.model, run.fitted, batch, step=run.step)
            scores, maps = outputs[f"{key}_scores"], outputs[f"{key}_maps"]
            assert maps.shape == expected.maps.shape
            np.testing.assert_allclose(scores, expected.image_scores, rtol=1e-5)
            atol = 1e-5 * np.abs(expected.maps).max()
            np.testing.assert_allclose(maps, expected.maps, rtol=1e-5, atol=atol)
    if name == "patchcore":  # the instructions need every package they name: jax alone fails
        result = _load_in_fresh_process(tmp_path, "stablehlo", "flatbuffers")
        assert result.returncode != 0
        assert "install 'flatbuffers'" in result.stderr.strip().splitlines()[-1], result.stderr


def test_export_refuses_a_run_without_thresholds_unless_asked(runs, tmp_path):
    workdir = tmp_path / "never_evaluated"
    shutil.copytree(runs["patchcore"], workdir)
    # The run's copy and the evaluation reports' own (which thresholds.stored falls back to).
    for path in [workdir / thresholds.THRESHOLDS_FILE, *workdir.glob("eval/*/thresholds.json")]:
        path.unlink()
    with pytest.raises(MissingFileError, match=r"--allow_no_thresholds.*Nothing was written"):
        export.export(workdir, tmp_path / "refused", saved_model=False)
    assert not (tmp_path / "refused").exists()
    paths = export.export(workdir, tmp_path / "raw", saved_model=False, allow_no_thresholds=True)
    meta = json.loads(paths["metadata"].read_text())
    assert meta["thresholds"] is None and set(meta["loading"]) == {"stablehlo", "onnx"}
    assert meta["loading"]["stablehlo"]["packages"][1].startswith("flatbuffers")
