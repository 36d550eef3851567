"""Every registered method honours the contract of ``wdam_jax.methods.base`` end to end.

Parametrised over the registry (as anomalib tests every registered model): on a tiny member of
its network family and the demo data, each method trains a few steps, is interrupted and resumed
(the final parameters equal an uninterrupted run's bit for bit), checkpoints its fitted
statistics, evaluates through the shared ``launch.evaluate`` path and writes the report, and
scores the same from a restored run as in process. A method added to the registry without a
tiny config here fails ``test_every_registered_method_has_a_tiny_config``.
"""

import importlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from wdam_jax import evaluate, runs, train
from wdam_jax.data import sources
from wdam_jax.methods import registry
from wdam_jax.methods.base import ImageScores, Method

TINY_NET = {"depths": (1, 1, 1, 1), "base_width": 8}


def _tiny_cutpaste(config):
    config.model.update(TINY_NET)
    config.model.wdam_layers = (1,)
    config.model.head_dims = (16,)
    config.train.batch_size = 2
    config.train.stage_epochs = ()
    config.train.stage1_steps, config.train.stage2_steps, config.train.stage3_steps = 2, 1, 2
    config.augment.foreground_mask = False
    return config


def _tiny_patchcore(config):
    for member in config.members.values():
        member.update(TINY_NET)
    return config


def _tiny_draem(config):
    config.model.recon_width = config.model.disc_width = 2
    config.train.batch_size = 2
    config.train.epochs = 1
    config.train.eval_every = 2
    return config


TINY = {
    "cutpaste": ("configs.cutpaste", _tiny_cutpaste),
    "patchcore": ("configs.patchcore", _tiny_patchcore),
    "draem": ("configs.draem_wdam", _tiny_draem),
}


def tiny_config(name: str, root: pathlib.Path):
    module, shrink = TINY[name]
    config = shrink(importlib.import_module(module).get_config("demo"))
    config.data.root = str(root)
    config.data.image_size = 32
    config.train.checkpoint_every = 2
    config.train.keep_checkpoints = 3
    config.score.eval_batch_size = 8
    return config


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["params"]))]


def test_every_registered_method_has_a_tiny_config():
    assert set(TINY) == set(registry.METHODS)
    for name in registry.METHODS:
        cls = registry.method_class(name)
        assert issubclass(cls, Method) and cls.name == name


@pytest.mark.parametrize("name", sorted(registry.METHODS))
def test_method_trains_resumes_checkpoints_and_evaluates(name, demo_data_root, tmp_path):
    config = tiny_config(name, demo_data_root)
    total = registry.get_method(config).total_steps
    _, full = train.train(config, tmp_path / "full")
    if total:
        # Interrupted after step 1 (a checkpoint every 2 steps: the one at 1 is the stop's), then
        # the same call again; the newest checkpoint is also dropped to resume from further back.
        train.train(config, tmp_path / "resumed", stop_at=total - 1)
        _, resumed = train.train(config, tmp_path / "resumed")
        assert int(resumed["step"]) == int(full["step"]) == total
        for a, b in zip(_leaves(full), _leaves(resumed), strict=True):
            np.testing.assert_array_equal(a, b)
    results = evaluate.evaluate(None, tmp_path / "full")
    row = results[config.data.category]
    assert {"i_auroc", "p_auroc", "pro"} <= set(row) and all(0 <= v <= 1 for v in row.values())
    outdir = tmp_path / "full" / "eval" / f"step_{total}"
    written = {p.name for p in outdir.iterdir()}
    assert {"metrics.json", "metrics.csv", "metrics.md", "heatmaps.png", "scores.csv"} <= written
    assert json.loads((outdir / "metrics.json").read_text())
    # The restored run scores exactly as the run in process, from the checkpointed statistics.
    run = runs.restore(tmp_path / "full")
    if type(run.method).fit is not Method.fit:  # fit is optional (DRAEM's model alone scores)
        assert run.fitted, f"{name} checkpointed no fitted statistics"
    test = sources.load_split(config.data, split="test")
    scores = run.method.score(run.model, run.fitted, test.images[:3], step=run.step)
    assert isinstance(scores, ImageScores)
    assert scores.maps.shape == (3, *test.images.shape[1:3])
    again = runs.restore(tmp_path / "full").method.score(
        run.model, run.fitted, test.images[:3], step=run.step
    )
    np.testing.assert_allclose(scores.image_scores, again.image_scores, rtol=1e-6)
    saved = np.load(outdir / "scores.npz")
    np.testing.assert_allclose(saved["image_scores"][:3], scores.image_scores, rtol=1e-5)
    # Figures are optional: num_figures=0 evaluates without drawing (a harmless config change).
    (outdir / "heatmaps.png").unlink()
    config.score.num_figures = 0
    assert evaluate.evaluate(config, tmp_path / "full")
    assert not (outdir / "heatmaps.png").exists()


def _to_visa(mvtec_category: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The VisA 1cls layout (``test/{good,bad}``, ``ground_truth/bad/<stem>.png`` with label 1,
    ``.JPG`` images) built from a demo category."""
    for path in sorted(mvtec_category.rglob("*.png")):
        split, kind = path.relative_to(mvtec_category).parts[:2]
        image = Image.open(path)
        if split == "ground_truth":  # <defect>/<id>_mask.png -> bad/<defect>_<id>.png, label 1
            target = out / split / "bad" / f"{kind}_{path.stem.removesuffix('_mask')}.png"
            image = Image.fromarray((np.asarray(image) > 0).astype(np.uint8))
        elif kind == "good":
            target = out / split / kind / f"{path.stem}.JPG"
        else:  # test/<defect>/<id>.png -> test/bad/<defect>_<id>.JPG
            target = out / split / "bad" / f"{kind}_{path.stem}.JPG"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".JPG":
            image.convert("RGB").save(target, format="JPEG", quality=95)
        else:
            image.save(target)
    return out


def test_patchcore_runs_on_a_visa_layout(demo_data_root, tmp_path):
    dataset = sources.dataset_root(tiny_config("patchcore", demo_data_root).data)
    visa_root = tmp_path / "visa"
    _to_visa(dataset / "washer", visa_root / "washer")
    assert (visa_root / "washer" / "test" / "bad").is_dir()
    config = tiny_config("patchcore", demo_data_root)
    config.data.dataset = "visa"
    config.data.root = str(visa_root)
    results = evaluate.train_and_evaluate(config, tmp_path / "run")
    test = sources.load_split(config.data, split="test")
    assert set(test.defect_types) == {"good", "bad"} and test.labels.sum() > 0
    assert test.masks.any()  # label-1 masks are read as anomalous pixels
    assert 0 <= results["washer"]["p_auroc"] <= 1
    shutil.rmtree(tmp_path / "run")
