"""``model.onnx`` from ``launch.export`` scores as the trained run does, for every method.

CutPaste + WDAM, DRAEM + WDAM, PatchCore and the PatchCore ensemble with a WDAM member are
trained tiny on the demo data, evaluated (thresholds from a held-out normal split) and exported.
A fresh process that can import only onnxruntime, numpy and what they need
(``test_predict.FRESH_PROCESS``: no jax, no onnx, no repository) runs ``metadata.json``'s ONNX
loading instructions; its scores and maps must equal what ``launch.evaluate`` stored and what
``launch.predict`` writes, with identical decisions at the stored threshold, at batch sizes the
export never saw (it saw none: the batch is symbolic). CutPaste and DRAEM without WDAM are
checked on their untrained networks. Then the artefact's failure modes: another run's file, a
truncated file, wrong inputs, a primitive the converter does not know.
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest
from test_contract import TINY_NET, tiny_config
from test_predict import _load_in_fresh_process

from configs import patchcore as patchcore_configs
from wdam_jax import evaluate, export, onnx_export, onnx_scorer, predict, runs, thresholds
from wdam_jax.data import sources
from wdam_jax.methods import registry

RTOL = 1e-4


def _without_wdam(config):
    if config.method == "cutpaste":
        config.model.wdam_layers = ()
    else:
        config.model.wdam_blocks = ()
    return config


def _with_wdam_member(config):
    config.members.wdam = patchcore_configs.member("run", wdam_layers=(1,))
    config.members.wdam.update(TINY_NET, allow_random_init=True, seed=1)
    return config


# Trained, evaluated and exported end to end (the tiny CutPaste and DRAEM have WDAM)...
VARIANTS = {
    "cutpaste_wdam": ("cutpaste", lambda c: c),
    "draem_wdam": ("draem", lambda c: c),
    "patchcore": ("patchcore", lambda c: c),
    "patchcore_wdam": ("patchcore", _with_wdam_member),
}
# ... and, for the graph without WDAM, the network initialised and fitted only (training them too
# would double the file's time for no primitive the runs above do not already convert).
UNTRAINED = {"cutpaste": _without_wdam, "draem": _without_wdam}


@pytest.fixture(scope="module")
def exports(demo_data_root, tmp_path_factory):
    """``{variant: (workdir, export folder)}``: trained, evaluated, exported without the
    SavedModel (``test_predict`` covers it)."""
    out = {}
    for name, (method, change) in VARIANTS.items():
        config = change(tiny_config(method, demo_data_root))
        config.data.holdout_fraction = 0.2
        config.score.threshold_fpr = 0.1
        config.score.num_figures = 0
        workdir = tmp_path_factory.mktemp(f"{name}_run")
        evaluate.train_and_evaluate(config, workdir)
        folder = tmp_path_factory.mktemp(f"{name}_export") / "export"
        export.export(workdir, folder, saved_model=False)
        out[name] = workdir, folder
    return out


def _predict_inputs(run, tmp_path):
    """Three test images as files, through ``launch.predict`` and its preprocessing."""
    test = sources.dataset_root(run.config.data) / run.config.data.category / "test"
    folder = tmp_path / "files"
    folder.mkdir()
    for kind in ("good", "crack", "scratch"):
        shutil.copy(sorted((test / kind).glob("*.png"))[0], folder / f"{kind}.png")
    size, crop = run.config.data.image_size, run.config.data.get("crop_size", 0) or None
    assert crop is None  # the tiny runs: predict's host crop and the graph's are then both none
    images = [
        predict.preprocess(p, image_size=size, crop_size=crop)[0] for p in sorted(folder.iterdir())
    ]
    return folder, np.stack(images)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_onnx_scores_equal_evaluate_and_predict_in_a_fresh_process(name, exports, tmp_path):
    workdir, folder = exports[name]
    meta = json.loads((folder / export.METADATA_FILE).read_text())
    assert meta["onnx"]["inputs"]["images"]["shape"][0] == onnx_export.BATCH
    assert meta["onnx"]["opset"] == onnx_export.OPSET and meta["loading"]["onnx"]["packages"]
    assert (folder / export.SCORER_FILE).read_bytes() == pathlib.Path(
        onnx_scorer.__file__
    ).read_bytes()
    run = runs.restore(workdir)
    test = sources.load_split(run.config.data, split="test")
    files, predicted_images = _predict_inputs(run, tmp_path)
    batches = {"two": test.images[:2], "seven": test.images[2:9], "files": predicted_images}
    shutil.copytree(folder, tmp_path / "export")  # FRESH_PROCESS reads tmp_path/export
    np.savez(tmp_path / "inputs.npz", **batches)
    result = _load_in_fresh_process(tmp_path, "onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["repository_modules"] == [], report
    assert not {"wdam-jax", "jax", "flax", "onnx"} & set(report["allowed"]), report["allowed"]
    outputs = np.load(tmp_path / "outputs_onnx.npz")

    stored = np.load(max((workdir / "eval").glob("step_*")) / "scores.npz")
    threshold = meta["thresholds"]["image"]["threshold"]
    stored_thresholds = json.loads((workdir / thresholds.THRESHOLDS_FILE).read_text())
    assert threshold == stored_thresholds["image"]["threshold"]
    onnx_scores = np.concatenate([outputs["two_scores"], outputs["seven_scores"]])
    evaluated = stored["image_scores"][:9]  # launch.evaluate's, in the test split's order
    np.testing.assert_allclose(
        onnx_scores, evaluated, rtol=RTOL, atol=RTOL * np.abs(evaluated).max()
    )
    _assert_same_decisions(onnx_scores, evaluated, threshold)
    for key, images in batches.items():
        expected = run.method.score(run.model, run.fitted, images, step=run.step)
        maps = outputs[f"{key}_maps"]
        assert maps.shape == expected.maps.shape
        atol = RTOL * np.abs(expected.maps).max()
        np.testing.assert_allclose(maps, expected.maps, rtol=RTOL, atol=atol)
        np.testing.assert_allclose(outputs[f"{key}_scores"], expected.image_scores, rtol=RTOL)

    rows = predict.predict(workdir, files, tmp_path / "predicted", batch_size=2, overlays=False)
    by_name = {pathlib.Path(r["path"]).name: r for r in rows}
    names = sorted(p.name for p in files.iterdir())
    scores = np.array([by_name[n]["score"] for n in names])
    np.testing.assert_allclose(outputs["files_scores"], scores, rtol=RTOL)
    decisions = np.array([by_name[n]["decision"] == "anomalous" for n in names])
    np.testing.assert_array_equal(scores >= threshold, decisions)
    _assert_same_decisions(outputs["files_scores"], scores, threshold)


def _assert_same_decisions(onnx_scores, expected, threshold):
    """Identical ``score >= threshold`` decisions. A score equal to the threshold within float
    rounding decides by the rounding; the only such scores here are a tiny DRAEM's, which scores
    every image alike (its threshold is that score), and they are counted, not compared."""
    tie = np.abs(expected - threshold) <= RTOL * max(abs(threshold), 1e-12)
    if tie.any():
        assert np.ptp(expected) <= RTOL * abs(threshold), (expected, threshold)
    np.testing.assert_array_equal((onnx_scores >= threshold)[~tie], (expected >= threshold)[~tie])


@pytest.mark.parametrize("method", sorted(UNTRAINED))
def test_onnx_of_an_untrained_network_without_wdam_equals_its_scores(method, demo_data_root):
    config = UNTRAINED[method](tiny_config(method, demo_data_root))
    run_method = registry.get_method(config)
    model = run_method.create_model()
    fitted = run_method.fit(model, run_method.train_images(), step=0) or {}
    fn, size = export.inference_function(runs.Restored(run_method, model, 0, fitted))
    session = onnxruntime.InferenceSession(
        onnx_export.to_onnx(fn, (1, size, size, 3)).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    images = sources.load_split(config.data, split="test").images[:3]
    scores, maps = session.run(None, {"images": images})
    expected = run_method.score(model, fitted, images, step=0)
    np.testing.assert_allclose(scores, expected.image_scores, rtol=RTOL)
    np.testing.assert_allclose(maps, expected.maps, rtol=RTOL, atol=RTOL * np.abs(maps).max())


@pytest.fixture
def copied(exports, tmp_path):
    """A copy of the PatchCore export to damage, and the CutPaste one's folder."""
    folder = tmp_path / "export"
    shutil.copytree(exports["patchcore"][1], folder)
    return folder, exports["cutpaste_wdam"][1]


def test_a_model_from_another_run_is_refused(copied):
    folder, other = copied
    onnx_scorer.OnnxScorer(folder)  # intact: loads
    shutil.copy(other / export.ONNX_FILE, folder / export.ONNX_FILE)
    with pytest.raises(onnx_scorer.OnnxArtefactError, match=r"another run.*copy the whole folder"):
        onnx_scorer.OnnxScorer(folder)
    # Even with metadata.json's size and digest edited to match it, the run id tells.
    meta_path = folder / export.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    other_meta = json.loads((other / export.METADATA_FILE).read_text())["onnx"]
    meta["onnx"].update(bytes=other_meta["bytes"], sha256=other_meta["sha256"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(onnx_scorer.OnnxArtefactError, match=r"holds run .*cutpaste.* describes"):
        onnx_scorer.OnnxScorer(folder)


def test_a_truncated_or_damaged_model_is_refused(copied):
    folder, _ = copied
    path = folder / export.ONNX_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(onnx_scorer.OnnxArtefactError, match=r"is truncated: \d+ of \d+ bytes"):
        onnx_scorer.OnnxScorer(folder)
    path.write_bytes(data[:100] + bytes(len(data) - 100))  # full size, contents zeroed
    with pytest.raises(onnx_scorer.OnnxArtefactError, match=r"SHA-256 differs"):
        onnx_scorer.OnnxScorer(folder)
    path.unlink()
    with pytest.raises(onnx_scorer.OnnxArtefactError, match=r"is missing"):
        onnx_scorer.OnnxScorer(folder)


def test_inputs_of_the_wrong_size_or_range_are_refused(copied):
    folder, _ = copied
    scorer = onnx_scorer.OnnxScorer(folder)
    s = scorer.image_size
    good = np.full((2, s, s, 3), 0.5, np.float32)
    assert scorer(good)[0].shape == (2,) and scorer(good[0])[1].shape == (1, s, s)
    cases = {
        r"shape \(2, 16, 16, 3\); the model takes \[B, 32, 32, 3\].*resize to 32x32":
            good[:, :16, :16],
        r"channels first": good.transpose(0, 3, 1, 2),
        r"range up to 255 \(uint8\).*divide by 255": (good * 510).astype(np.uint8),
        r"range up to 127\.5 \(float32\).*divide by 255": good * 255,
        r"down to -2.*not mean/std normalised": good - 2.5,
        r"NaN": np.where(np.arange(s)[:, None, None] == 3, np.nan, good),
    }  # fmt: skip
    for pattern, images in cases.items():
        with pytest.raises(onnx_scorer.OnnxArtefactError, match=pattern):
            scorer(images)
    assert scorer.decide(np.array([-1e9, 1e9])).tolist() == [False, True]


def test_the_converter_names_a_primitive_it_cannot_write():
    with pytest.raises(onnx_export.UnsupportedPrimitiveError, match=r"'cumsum'.*onnx_export\.py"):
        onnx_export.to_onnx(lambda x: (jnp.cumsum(x, axis=1),), (1, 4), output_names=("y",))


def test_sort_and_gathered_payloads_equal_jax():
    """A stable sort with ties, its payload (argsort) reordered alike, at two batch sizes."""

    def fn(x):
        keys = jnp.round(x * 4) / 4  # ties
        return jnp.sort(keys, axis=1), jnp.argsort(keys, axis=1, stable=True).astype(jnp.float32)

    model = onnx_export.to_onnx(fn, (1, 9), output_names=("values", "order"))
    session = onnxruntime.InferenceSession(model.SerializeToString())
    for batch in (1, 5):
        x = np.random.default_rng(batch).uniform(size=(batch, 9)).astype(np.float32)
        for got, want in zip(session.run(None, {"images": x}), fn(x), strict=True):
            np.testing.assert_array_equal(got, np.asarray(want))
