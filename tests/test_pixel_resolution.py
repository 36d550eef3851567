"""Pixel metrics at the original and at the model's resolution, from one scoring of a run."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from test_contract import tiny_config

from wdam_jax import evaluate, runs
from wdam_jax.analysis import pixel_resolution
from wdam_jax.data import sources


def test_both_resolutions_of_one_run(demo_data_root, tmp_path):
    config = tiny_config("patchcore", demo_data_root)  # 32 px maps of 128 px demo images
    config.score.num_figures = 0
    reported = evaluate.train_and_evaluate(config, tmp_path)[config.data.category]
    got = pixel_resolution.compare_resolutions(tmp_path)
    assert got["model_size"] == [32, 32]
    # "original" is what evaluation reports (the MVTec AD protocol).
    assert got["original"] == pytest.approx({k: reported[k] for k in ("p_auroc", "pro")})
    # "model": the maps as scored against the masks at the model's size, checked with sklearn.
    run = runs.restore(tmp_path)
    split = sources.load_split(run.config.data, split="test")
    maps = run.method.score(run.model, run.fitted, split.images, step=run.step).maps
    masks = np.asarray(split.masks, bool)
    assert masks.shape[1:] == (32, 32) and split.original_masks[0].shape == (128, 128)
    assert got["model"]["p_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert got["delta"]["pro"] == pytest.approx(got["original"]["pro"] - got["model"]["pro"])
