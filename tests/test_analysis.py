"""The paper's analyses as commands (Table 10, Fig. 2, Figs. 6/7) on tiny runs.

Most runs here are PatchCore runs (no gradient steps, so no train-step compile): a randomly
initialised tiny member with WDAM in layer1 is a run with WDAM like any other. One tiny
CutPaste + WDAM run checks the stage gate and the method-agnostic path through another method.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_contract import tiny_config

from wdam_jax import batch_norm, train
from wdam_jax import runs as run_store
from wdam_jax.analysis import compare, subband_figure, subband_weights
from wdam_jax.data import sources
from wdam_jax.errors import UserError
from wdam_jax.methods.cutpaste import set_wdam_gate

REPO = pathlib.Path(__file__).resolve().parents[1]


def _patchcore(root, workdir, *, wdam_layers=(), category="washer"):
    config = tiny_config("patchcore", root)
    config.members.plain.wdam_layers = wdam_layers
    config.data.category = category
    train.train(config, workdir)
    return config


@pytest.fixture(scope="module")
def runs(demo_data_root, tmp_path_factory):
    """Tiny PatchCore runs: with a WDAM member, without WDAM, another category (with WDAM), another
    crop."""
    base = tmp_path_factory.mktemp("analysis_runs")
    _patchcore(demo_data_root, base / "wdam", wdam_layers=(1,))
    _patchcore(demo_data_root, base / "plain")
    _patchcore(demo_data_root, base / "grass", wdam_layers=(1,), category="grass")
    # The same run recorded with a centre crop: compare refuses it from the config alone.
    shutil.copytree(base / "plain", base / "cropped")
    recorded = json.loads((base / "cropped" / "config.json").read_text())
    recorded["data"]["crop_size"] = 24
    (base / "cropped" / "config.json").write_text(json.dumps(recorded))
    return base


def _direct_weights(run, images):
    """Each WDAM's weights from an eager forward of the restored model (its SubbandWeights
    variable), with no callback, jit, batching or scoring function involved."""
    run.model.member("plain")(jnp.asarray(images), train=False)
    return {p: np.asarray(m.subband_weights.get_value()) for p, m in
            subband_weights.wdam_modules(run.model).items()}  # fmt: skip


def test_weights_table_equals_a_direct_computation(runs, tmp_path):
    (result,) = subband_weights.analyse([runs / "wdam"])
    run = run_store.restore(runs / "wdam")
    split = sources.load_split(run.config.data, split="test")
    direct = _direct_weights(run, split.images)
    assert list(result.weights) == list(direct) == ["member_plain.layer1.0.wdam"]
    weights = result.weights["member_plain.layer1.0.wdam"]
    # 30 test images in batches of 8: the padded last batch's rows are dropped.
    assert weights.shape == (len(split), 4)
    np.testing.assert_allclose(weights, direct["member_plain.layer1.0.wdam"], atol=1e-6)
    assert weights.std(axis=0).max() > 1e-4  # the images are told apart: a real check
    # The written table is numpy's mean / std over the normal and the anomalous images.
    doc = json.loads((runs / "wdam" / "analysis" / "subband_weights.json").read_text())
    module = doc["modules"]["member_plain.layer1.0.wdam"]
    good = split.labels == 0
    assert module["normal"]["n"] == int(good.sum()) == 10
    assert module["anomalous"]["n"] == int((~good).sum()) == 20
    for group, keep in (("normal", good), ("anomalous", ~good)):
        mean = [module[group]["mean"][b] for b in ("LL", "LH", "HL", "HH")]
        std = [module[group]["std"][b] for b in ("LL", "LH", "HL", "HH")]
        np.testing.assert_allclose(mean, direct["member_plain.layer1.0.wdam"][keep].mean(0), 1e-5)
        np.testing.assert_allclose(std, direct["member_plain.layer1.0.wdam"][keep].std(0), 1e-4)
    saved = np.load(runs / "wdam" / "analysis" / "subband_weights.npz")
    np.testing.assert_array_equal(saved["labels"], split.labels)
    np.testing.assert_allclose(saved["weights"][0], weights)
    for kind in ("md", "csv", "png"):
        assert (runs / "wdam" / "analysis" / f"subband_weights.{kind}").stat().st_size > 0
    # The run's image scores come from the same forward: equal to the method's score.
    scores = run.method.score(run.model, run.fitted, split.images, step=run.step)
    np.testing.assert_allclose(result.image_scores, scores.image_scores, rtol=1e-4)


def test_a_run_without_wdam_is_a_user_error(runs, tmp_path):
    with pytest.raises(UserError, match="has no WDAM module"):
        subband_weights.analyse([runs / "plain"], out=tmp_path)
    assert not list(tmp_path.iterdir())
    # Through the command: one message, exit code 2.
    done = subprocess.run(
        [sys.executable, "-m", "launch.wdam_weights", f"--workdir={runs / 'plain'}"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "has no WDAM module" in done.stderr


def test_table10_over_several_runs(runs, tmp_path):
    results = subband_weights.analyse([runs / "wdam", runs / "grass"], out=tmp_path)
    assert [r.category for r in results] == ["washer", "grass"]
    doc = json.loads((tmp_path / "table10.json").read_text())
    assert list(doc["means_all_images"]) == ["washer", "grass"]
    for result, column in zip(results, ("washer", "grass"), strict=True):
        own = json.loads((runs / column.replace("washer", "wdam") / "analysis" /
                          "subband_weights.json").read_text())  # fmt: skip
        (module,) = own["modules"].values()
        for band in ("LL", "LH", "HL", "HH"):
            assert doc["means_all_images"][column][band] == [module["all"]["mean"][band]]
            assert module["all"]["mean"][band] == pytest.approx(
                result.weights[next(iter(result.weights))][
                    :, "LL LH HL HH".split().index(band)
                ].mean()
            )
    table = (tmp_path / "table10.md").read_text()
    assert "| LL |" in table and "washer" in table and "grass" in table
    assert (tmp_path / "table10.csv").read_text().count("\n") == 1 + 2 * 3 * 4


def test_cutpaste_gate_and_final_weights(demo_data_root, tmp_path):
    config = tiny_config("cutpaste", demo_data_root)  # the contract test's run: cached compiles
    assert tuple(config.model.wdam_layers) == (1,)
    train.train(config, tmp_path / "cp")
    # At step 2 WDAM has not entered (it does after step 3): its weights would do nothing.
    with pytest.raises(UserError, match="switched off"):
        subband_weights.run_weights(tmp_path / "cp", step=2)
    result = subband_weights.run_weights(tmp_path / "cp")
    run = run_store.restore(tmp_path / "cp")
    split = sources.load_split(run.config.data, split="test")
    set_wdam_gate(run.model, True)
    scoring = batch_norm.apply_batch_stats(run.model, run.fitted)  # as CutPaste scores
    scoring(jnp.asarray(split.images), train=False)
    direct = {p: np.asarray(m.subband_weights.get_value())
              for p, m in subband_weights.wdam_modules(scoring).items()}  # fmt: skip
    assert list(result.weights) == list(direct) == ["backbone.layer1.0.wdam.wdam"]
    np.testing.assert_allclose(result.weights["backbone.layer1.0.wdam.wdam"],
                               direct["backbone.layer1.0.wdam.wdam"], atol=1e-6)  # fmt: skip


def test_compare_shares_one_colour_scale(runs, tmp_path, monkeypatch):
    drawn = {}
    original = compare.draw
    monkeypatch.setattr(compare, "draw", lambda *a, **k: drawn.setdefault("fig", original(*a, **k)))
    paths = compare.compare(
        [runs / "plain", runs / "wdam"], out=tmp_path, num_images=4, normalize="none"
    )
    doc = json.loads(paths["json"].read_text())
    assert [r["label"] for r in doc["runs"]] == ["patchcore (plain)", "patchcore (wdam)"]
    assert len(doc["images"]) == 4 and doc["labels"].count(1) == 3
    heatmaps = [ax.images[-1] for ax in drawn["fig"].axes[:-1] if len(ax.images) == 2]
    assert len(heatmaps) == 2 * 4
    clims = {im.get_clim() for im in heatmaps}
    assert clims == {(doc["colour_scale"]["vmin"], doc["colour_scale"]["vmax"])}
    # The scale spans every map shown, of both runs (raw values: the runs' maps differ).
    values = np.concatenate([np.asarray(im.get_array()).ravel() for im in heatmaps])
    assert np.isclose(values.min(), doc["colour_scale"]["vmin"])
    assert np.isclose(values.max(), doc["colour_scale"]["vmax"])
    # Each run's image scores are its evaluation's.
    for run_doc in doc["runs"]:
        run = run_store.restore(run_doc["workdir"])
        split = sources.load_split(run.config.data, split="test")
        full = run.method.score(run.model, run.fitted, split.images, step=run.step)
        index = [split.paths.index(p) for p in doc["images"]]
        np.testing.assert_allclose(run_doc["image_scores"], full.image_scores[index], rtol=1e-5)
    assert Image.open(paths["png"]).size[0] > 400


def test_compare_refuses_other_test_sets(runs, tmp_path):
    with pytest.raises(UserError, match="do not share a test set"):
        compare.compare([runs / "wdam", runs / "grass"], out=tmp_path)
    with pytest.raises(UserError, match="crop their test images differently"):
        compare.compare([runs / "wdam", runs / "cropped"], out=tmp_path)
    with pytest.raises(UserError, match="two or more runs"):
        compare.compare([runs / "wdam"], out=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source", ["cutpaste", "scar", "perlin"])
def test_subband_figure_shows_the_haar_bands_of_both_images(demo_data_root, tmp_path, source):
    config = tiny_config("draem", demo_data_root)
    paths = subband_figure.write_figures(config, out=tmp_path, source=source, count=2)
    assert [p.name for p in paths] == [f"subbands_{source}_0.png", f"subbands_{source}_1.png"]
    train_images = sources.load_split(config.data, split="train").images
    anomalous, masks = subband_figure.synthesize(config, train_images[:2], source=source, seed=0)
    assert masks.any(axis=(1, 2)).all()  # each example has a synthetic anomaly
    # The sub-bands drawn are the orthonormal Haar of the luminance (checked against the 2 x 2
    # block formulas); the anomaly changes them in the blocks its mask touches and nowhere else.
    image = train_images[0]
    bands = subband_figure.subbands(image)
    blocks = (image @ subband_figure.LUMA).reshape(16, 2, 16, 2)
    a, b, c, d = blocks[:, 0, :, 0], blocks[:, 0, :, 1], blocks[:, 1, :, 0], blocks[:, 1, :, 1]
    np.testing.assert_allclose(bands[0], (a + b + c + d) / 2, atol=1e-6)
    np.testing.assert_allclose(np.abs(bands[3]), np.abs(a - b - c + d) / 2, atol=1e-6)
    diff = np.abs(subband_figure.subbands(anomalous[0]) - bands).max(axis=0)
    touched = masks[0].reshape(16, 2, 16, 2).any(axis=(1, 3))
    assert diff[touched].max() > 1e-3 and diff[~touched].max() < 1e-6
    fig = subband_figure.draw(image, anomalous[0], masks[0].astype(np.float32), title="t")
    assert len(fig.axes) == 3 * 6
