"""CutPaste method: Gaussian density vs scikit-learn / numpy, batches, FM, the WDAM gate, the
stage schedule and data errors."""

import jax
import numpy as np
import optax
import pytest
import sklearn.covariance
from flax import nnx
from jax import numpy as jnp

from configs import cutpaste as cutpaste_config
from configs import cutpaste_wdam as cutpaste_wdam_config
from wdam_jax import batch_norm
from wdam_jax.components import gaussian as gaussian_lib
from wdam_jax.data import pipeline, sources
from wdam_jax.data.datasets import DatasetError
from wdam_jax.errors import ConfigError
from wdam_jax.methods import cutpaste
from wdam_jax.models.wide_resnet import Bottleneck


def _correlated(rng, n, d):
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)


@pytest.mark.parametrize("n,d", [(40, 6), (12, 30)])
def test_gaussian_matches_sklearn_ledoit_wolf(n, d):
    x = _correlated(np.random.default_rng(n), n, d)
    reference = sklearn.covariance.LedoitWolf().fit(x)
    centred = x - x.mean(0)
    assert gaussian_lib.ledoit_wolf_shrinkage(centred) == pytest.approx(
        sklearn.covariance.ledoit_wolf_shrinkage(centred), rel=1e-10
    )
    gaussian = gaussian_lib.fit_gaussian(x)
    np.testing.assert_allclose(gaussian.mean, reference.location_, rtol=1e-12)
    np.testing.assert_allclose(gaussian.precision, reference.precision_, rtol=1e-6, atol=1e-9)
    queries = _correlated(np.random.default_rng(1), 7, d)
    # sklearn's mahalanobis() returns squared distances.
    np.testing.assert_allclose(
        gaussian.mahalanobis(queries) ** 2, reference.mahalanobis(queries), rtol=1e-6
    )


def test_per_location_gaussian_pools_the_covariance():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(10, 3, 2, 5)) + np.arange(6).reshape(1, 3, 2, 1)
    gaussian = gaussian_lib.fit_gaussian(maps, location_axes=(1, 2))
    np.testing.assert_allclose(gaussian.mean, maps.mean(0))
    pooled = (maps - maps.mean(0)).reshape(-1, 5)
    lw = sklearn.covariance.LedoitWolf(assume_centered=True).fit(pooled)
    np.testing.assert_allclose(gaussian.precision, lw.precision_, rtol=1e-6)
    # Independent numpy Mahalanobis at one location.
    q = rng.normal(size=(4, 3, 2, 5))
    diff = q[:, 1, 0] - maps.mean(0)[1, 0]
    expected = np.sqrt(np.einsum("ni,ij,nj->n", diff, lw.precision_, diff))
    np.testing.assert_allclose(gaussian.mahalanobis(q)[:, 1, 0], expected, rtol=1e-6)


def test_normal_data_scores_low_and_outliers_high():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    gaussian = gaussian_lib.fit_gaussian(x)
    assert gaussian.mahalanobis(np.zeros((1, 4)))[0] < 0.5
    assert gaussian.mahalanobis(np.full((1, 4), 6.0))[0] > 8


def test_smooth_maps_upsamples_and_keeps_constants():
    maps = np.full((2, 3, 3), 5.0, np.float32)
    out = cutpaste.smooth_maps(maps, size=12, sigma=1.0)
    assert out.shape == (2, 12, 12)
    np.testing.assert_allclose(out, 5.0, rtol=1e-6)


def _train_data(fg: bool, n: int = 5, size: int = 32):
    rng = np.random.default_rng(0)
    images = rng.random((n, size, size, 3), dtype=np.float32)
    foreground = None
    if fg:
        foreground = np.zeros((n, size, size), bool)
        foreground[:, 8:24, 10:22] = True
    return cutpaste.TrainData(images=images, foreground=foreground, fmas=images[:2] * 0.5)


def _augment_config():
    config = cutpaste_config.get_config("demo").augment
    config.scar_width, config.scar_length = (2.0, 4.0), (4.0, 8.0)
    return config


@pytest.mark.parametrize("source", ["cutpaste", "fmas"])
def test_batch_is_three_way_and_a_pure_function_of_step(source):
    data = _train_data(fg=False)
    kw = dict(batch_size=3, seed=4, source=source, augment_config=_augment_config())
    batch = cutpaste.make_batch(data, 7, **kw)
    assert batch["image"].shape == (9, 32, 32, 3) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1, 1, 2, 2, 2])
    idx = pipeline.batch_indices(7, num_examples=5, batch_size=3, seed=4)
    np.testing.assert_array_equal(batch["image"][:3], data.images[idx])
    if source == "fmas":
        assert all(any(np.array_equal(a, f) for f in data.fmas) for a in batch["image"][3:6])
    again = cutpaste.make_batch(data, 7, **kw)
    np.testing.assert_array_equal(batch["image"], again["image"])
    other = cutpaste.make_batch(data, 8, **kw)
    assert not np.array_equal(batch["image"], other["image"])


@pytest.mark.parametrize("confine_cutpaste", [False, True])
def test_foreground_mask_confines_the_scar_and_optionally_cutpaste(confine_cutpaste):
    data = _train_data(fg=True)
    config = _augment_config()
    config.fm_confines_cutpaste = confine_cutpaste
    outside = []
    for step in range(6):
        batch = cutpaste.make_batch(
            data, step, batch_size=3, seed=0, source="cutpaste", augment_config=config
        )
        normals = batch["image"][:3]
        idx = pipeline.batch_indices(step, num_examples=5, batch_size=3, seed=0)
        for view in (batch["image"][3:6], batch["image"][6:]):
            assert np.any(view != normals, axis=-1).any()
        scar_changed = np.any(batch["image"][6:] != normals, axis=-1)
        assert not (scar_changed & ~data.foreground[idx]).any()  # the paper's FM: scars
        patch_changed = np.any(batch["image"][3:6] != normals, axis=-1)
        outside.append((patch_changed & ~data.foreground[idx]).any())
    # The paper's reading leaves CutPaste patches anywhere (6 x 3 patches: some land outside
    # the 16 x 12 foreground of a 32 x 32 image); the wider reading keeps them inside.
    assert any(outside) != confine_cutpaste


def test_gate_off_is_the_plain_bottleneck_and_on_adds_wdam():
    rngs = nnx.Rngs(0)
    block = Bottleneck(64, 16, stride=1, wdam=True, wdam_reduction=16, dtype=None, rngs=rngs)
    x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 64), np.float32))
    with_wdam = block(x, train=False)
    block.wdam = cutpaste.GatedWDAM(block.wdam)
    cutpaste.set_wdam_gate(block, False)
    gated_off = block(x, train=False)
    inner = block.wdam
    block.wdam = None
    plain = block(x, train=False)
    np.testing.assert_allclose(gated_off, plain, rtol=1e-6, atol=1e-6)
    block.wdam = inner
    cutpaste.set_wdam_gate(block, True)
    np.testing.assert_allclose(block(x, train=False), with_wdam, rtol=1e-6, atol=1e-6)
    assert not np.allclose(with_wdam, plain)


def test_stage_schedule_sgd_then_adam_then_lower_adam():
    config = cutpaste_config.get_config()  # the paper's rates: 0.03 SGD, Adam 0.01 then 0.001
    config.train.stage_epochs = ()
    config.train.stage1_steps, config.train.stage2_steps, config.train.stage3_steps = 3, 2, 2
    config.train.weight_decay = 0.0
    method = cutpaste.CutPaste(config)
    assert method.total_steps == 7 and method.wdam_start == 5
    assert [method.anomaly_source(s) for s in (0, 2, 3, 6)] == ["cutpaste"] * 4
    config.data.anomaly_source = "fmas"
    assert [cutpaste.CutPaste(config).anomaly_source(s) for s in (2, 3)] == ["cutpaste", "fmas"]
    tx = method.optimizer()
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    grads = {"w": jnp.asarray([2.0, -1.0])}
    steps = []
    for _ in range(7):
        updates, state = tx.update(grads, state, params)
        steps.append(np.asarray(updates["w"]))
    # Stage 1: SGD, momentum 0.9, cosine from 0.03 over 3 steps (lr_k = 0.015 (1 + cos(pi k/3))).
    lrs = [0.015 * (1 + np.cos(np.pi * k / 3)) for k in range(3)]
    trace = np.zeros(2)
    for k in range(3):
        trace = np.asarray(grads["w"]) + 0.9 * trace
        np.testing.assert_allclose(steps[k], -lrs[k] * trace, rtol=1e-5)
    # Stage 2: fresh Adam at 0.01 (constant gradients: each update is -lr * sign(g)).
    for k in (3, 4):
        np.testing.assert_allclose(steps[k], -0.01 * np.sign(grads["w"]), rtol=1e-4)
    # Stage 3: the same Adam at 0.001.
    for k in (5, 6):
        np.testing.assert_allclose(steps[k], -0.001 * np.sign(grads["w"]), rtol=1e-4)


def test_wdam_parameters_do_not_change_before_wdam_enters():
    # With weight decay > 0 and zero gradients (the gate is 0 before stage 3), the old optimiser
    # shrank WDAM's weights by Adam's lr per step (0.40 -> 0.005 in 100 steps).
    config = cutpaste_wdam_config.get_config()  # Adam 0.01, then 0.001 when WDAM enters
    config.train.stage_epochs = ()
    config.train.stage1_steps, config.train.stage2_steps, config.train.stage3_steps = 3, 4, 3
    config.train.weight_decay = 3e-5
    method = cutpaste.CutPaste(config)
    tx = method.optimizer()
    params = {
        "backbone": {"layer1": {"wdam": {"kernel": jnp.full(3, 0.4)}}, "conv": jnp.full(3, 0.4)},
    }
    assert cutpaste.wdam_labels(params) == {
        "backbone": {"layer1": {"wdam": {"kernel": "wdam"}}, "conv": "network"}
    }
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)
    history = []
    for _ in range(method.total_steps):
        updates, state = tx.update(zero, state, params)
        params = optax.apply_updates(params, updates)
        history.append(jax.tree.map(np.asarray, params))
    wdam = [h["backbone"]["layer1"]["wdam"]["kernel"] for h in history]
    conv = [h["backbone"]["conv"] for h in history]
    for k in range(method.wdam_start):  # stages 1-2: WDAM untouched, the rest decays
        np.testing.assert_array_equal(wdam[k], np.full(3, 0.4, np.float32))
    assert conv[method.wdam_start - 1][0] < 0.4
    # Stage 3: WDAM trains, with a fresh Adam at stage3_lr: its first step is -lr * sign(g).
    np.testing.assert_allclose(wdam[method.wdam_start], 0.4 - 0.001, rtol=1e-5)


def test_wdam_needs_stage_three():
    config = cutpaste_config.get_config("demo")
    config.model.wdam_layers = (1,)
    config.train.stage3_steps = 0
    with pytest.raises(ValueError, match="stage3_steps"):
        cutpaste.CutPaste(config)


def _epoch_config(root, epochs):
    config = cutpaste_wdam_config.get_config()
    config.data.dataset, config.data.root, config.data.category = "demo", str(root), "washer"
    config.data.anomaly_source, config.augment.foreground_mask = "cutpaste", False
    config.model.pretrained = ""
    config.train.batch_size = 7
    config.train.stage_epochs = epochs
    return config


def test_stage_lengths_in_epochs_follow_the_training_set(demo_data_root):
    config = _epoch_config(demo_data_root, (2.0, 1.0, 0.5))
    method = cutpaste.CutPaste(config)
    size = len(sources.load_split(config.data, split="train").images)
    assert method.check_inputs() == []
    # ceil(epochs * images / batch) per stage, written into the config the run saves.
    expected = [int(np.ceil(e * size / 7)) for e in (2.0, 1.0, 0.5)]
    t = config.train
    assert [t.stage1_steps, t.stage2_steps, t.stage3_steps] == expected and t.epoch_size == size
    assert method.total_steps == sum(expected)
    assert method.wdam_start == expected[0] + expected[1]
    # The saved (resolved) config rebuilds the same schedule without reading the data again.
    config.data.root = "/nowhere"
    assert cutpaste.CutPaste(config).total_steps == sum(expected)
    # A holdout leaves fewer training images, so fewer steps per epoch.
    held = _epoch_config(demo_data_root, (2.0, 1.0, 0.5))
    held.data.holdout_fraction = 0.5
    assert cutpaste.CutPaste(held).total_steps < sum(expected)


def test_stage_lengths_in_epochs_and_steps_are_one_or_the_other(demo_data_root):
    config = _epoch_config(demo_data_root, (2.0, 1.0, 0.5))
    config.train.stage1_steps = 10
    with pytest.raises(ValueError, match=r"stage_epochs=\(\)"):
        cutpaste.CutPaste(config)
    config = _epoch_config(demo_data_root, (2.0, 1.0, 0.0))  # WDAM without a stage 3
    with pytest.raises(ValueError, match="stage 3"):
        cutpaste.CutPaste(config).resolve_schedule()


def test_missing_dataset_says_how_to_get_it(tmp_path):
    config = cutpaste_config.get_config()
    config.data.root = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"(?s)MVTec AD.*mvtec\.com.*VisA.*:demo"):
        sources.load_split(config.data, split="train")


def test_fm_without_foreground_root_is_a_clear_error(tmp_path):
    config = cutpaste_config.get_config("demo")
    config.data.root = str(tmp_path / "demo")
    config.augment.foreground_mask = True
    config.data.foreground_root = ""
    with pytest.raises(ValueError, match="foreground_root"):
        cutpaste.load_train_data(config)


def test_perlin_validation_set_is_normals_then_their_anomalies():
    from wdam_jax.data import anomaly_sources

    images = np.random.default_rng(3).random((4, 32, 32, 3), dtype=np.float32)
    val, masks = anomaly_sources.perlin_validation_set(images, seed=0)
    assert val.shape == (8, 32, 32, 3) and masks.shape == (8, 32, 32) and masks.dtype == bool
    np.testing.assert_array_equal(val[:4], images)
    assert not masks[:4].any() and masks[4:].any(axis=(1, 2)).all()
    changed = np.any(val[4:] != images, axis=-1)
    assert not (changed & ~masks[4:]).any()  # only the masked pixels change
    again, _ = anomaly_sources.perlin_validation_set(images, seed=0)
    np.testing.assert_array_equal(again, val)  # a pure function of (images, seed)


def test_cutpaste_epochs_are_256_updates_whatever_the_training_set(demo_data_root):
    config = _epoch_config(demo_data_root, (2.0, 1.0, 0.5))
    config.train.epoch_unit = "cutpaste"
    method = cutpaste.CutPaste(config)
    assert method.check_inputs() == []
    t = config.train
    assert [t.stage1_steps, t.stage2_steps, t.stage3_steps] == [512, 256, 128]
    wrong = _epoch_config(demo_data_root, (2.0, 1.0, 0.5))
    wrong.train.epoch_unit = "updates"
    with pytest.raises(ConfigError, match="epoch_unit"):
        cutpaste.CutPaste(wrong).check_inputs()


def test_fit_stores_precise_batch_stats_and_score_uses_them(demo_data_root):
    config = _epoch_config(demo_data_root, ())
    config.model.update({"depths": (1, 1, 1, 1), "base_width": 8, "head_dims": (16,)})
    config.train.stage1_steps, config.train.stage2_steps, config.train.stage3_steps = 1, 1, 1
    config.score.bn_batches = 2
    config.data.image_size, config.train.batch_size = 32, 2
    method = cutpaste.CutPaste(config)
    model = method.create_model()
    images = method.train_images()[:4]
    fitted = method.fit(model, images, step=0)
    stats = [k for k in fitted if k.startswith(batch_norm.PREFIX)]
    assert stats and any(k.endswith("backbone.bn1.var") for k in stats)
    # At initialisation the running statistics are 0 / 1: the re-estimated ones differ ...
    assert not np.allclose(fitted[batch_norm.PREFIX + "backbone.bn1.var"], 1.0)
    with_stats = method.score(model, fitted, images, step=0).image_scores
    without = {k: v for k, v in fitted.items() if k not in stats}
    assert not np.allclose(method.score(model, without, images, step=0).image_scores, with_stats)
    # ... and the model itself keeps its own.
    np.testing.assert_array_equal(np.asarray(model.backbone.bn1.var.get_value()), 1.0)
