"""Checkpoint size (issue 17, item 5): every training config keeps one checkpoint, and
``train.save_final_params_only`` saves the final model without the optimiser state; such a run
evaluates and predicts exactly as the full checkpoint, and refuses to be trained further."""

import shutil

import jax
import numpy as np
import pytest
from test_contract import tiny_config
from test_train import ToyMethod, toy_config

from configs import (
    cutpaste,
    cutpaste_fm,
    cutpaste_fmas,
    cutpaste_wdam,
    draem,
    draem_wdam,
    patchcore,
    patchcore_wdam,
    wdam_layers,
)
from wdam_jax import checkpoints, evaluate, predict, train
from wdam_jax.data import sources
from wdam_jax.methods import registry

TRAINING_CONFIGS = [
    (module, arg)
    for module in (cutpaste, cutpaste_fm, cutpaste_fmas, cutpaste_wdam, draem, draem_wdam)
    for arg in (None, "demo")
] + [(wdam_layers, f"{n}{suffix}") for n in wdam_layers.LAYERS for suffix in ("", ",demo")]


@pytest.mark.parametrize(
    "module,arg", TRAINING_CONFIGS, ids=[f"{m.__name__}:{a}" for m, a in TRAINING_CONFIGS]
)
def test_training_configs_keep_one_full_checkpoint_by_default(module, arg):
    config = module.get_config(arg)
    assert config.train.keep_checkpoints == 1
    assert config.train.save_final_params_only is False


@pytest.mark.parametrize("module", [patchcore, patchcore_wdam])
def test_patchcore_configs_keep_one_checkpoint(module):
    for arg in (None, "demo"):
        assert module.get_config(arg).train.keep_checkpoints == 1


def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["params"]))]


def test_params_only_run_evaluates_and_predicts_as_the_full_one(demo_data_root, tmp_path):
    config = tiny_config("cutpaste", demo_data_root)
    config.train.keep_checkpoints = 1
    # One run to the step before the last, then finished twice: with and without the option.
    train.train(config, tmp_path / "full", stop_at=registry.get_method(config).total_steps - 1)
    shutil.copytree(tmp_path / "full", tmp_path / "small")
    _, full_state = train.train(config, tmp_path / "full")
    config.train.save_final_params_only = True
    _, small_state = train.train(config, tmp_path / "small")
    for a, b in zip(_params(full_state), _params(small_state), strict=True):
        np.testing.assert_array_equal(a, b)
    step = int(full_state["step"])
    full_dir, small_dir = (tmp_path / r / checkpoints.CHECKPOINT_DIR for r in ("full", "small"))
    assert sorted(p.name for p in small_dir.iterdir()) == [str(step)]  # one kept
    assert checkpoints.OPT_STATE in checkpoints._saved_keys(full_dir / str(step))
    assert checkpoints.OPT_STATE not in checkpoints._saved_keys(small_dir / str(step))
    assert _size(small_dir) < 0.8 * _size(full_dir)

    full, small = (
        evaluate.evaluate(None, tmp_path / "full"),
        evaluate.evaluate(None, tmp_path / "small"),
    )
    assert small == full and full[config.data.category]
    scores = [
        np.load(tmp_path / r / "eval" / f"step_{step}" / "scores.npz")["image_scores"]
        for r in ("full", "small")
    ]
    np.testing.assert_array_equal(*scores)

    images = sources.dataset_root(config.data) / config.data.category / "test" / "*" / "00[01].png"
    rows = [
        predict.predict(tmp_path / r, str(images), tmp_path / f"predict_{r}", overlays=False)
        for r in ("full", "small")
    ]
    assert len(rows[1]) > 2 and {r["status"] for r in rows[1]} == {"ok"}
    fields = ("path", "score", "decision", "threshold")
    assert [[r[k] for k in fields] for r in rows[0]] == [[r[k] for k in fields] for r in rows[1]]


def test_a_params_only_run_is_finished_and_cannot_be_trained_further(tmp_path):
    config = toy_config(steps=4)
    config.train.save_final_params_only = True
    train.train(config, tmp_path, method=ToyMethod(config))
    # The same command again: nothing to train, the run restores as it is.
    _, state = train.train(config, tmp_path, method=ToyMethod(config))
    assert int(state["step"]) == 4 and checkpoints.OPT_STATE not in state
    longer = toy_config(steps=6)
    longer.train.save_final_params_only = True
    with pytest.raises(checkpoints.CheckpointError, match="final parameters only") as err:
        train.train(longer, tmp_path, method=ToyMethod(longer), allow_config_change=True)
    assert "new --workdir" in str(err.value) and "launch.evaluate" in str(err.value)
