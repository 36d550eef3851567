"""DRAEM and DRAEM+WDAM: network, losses, scores, batches, validation (wdam_jax/methods/draem.py).

References are independent: the official layer list (parameter counts), torch's align-corners
upsampling, scikit-image's SSIM, scipy filters, numpy formulas and PIL's image operations.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage
import skimage.metrics
import sklearn.metrics
import torch
from flax import nnx
from PIL import Image, ImageEnhance, ImageOps

from configs import draem as draem_config
from configs import draem_wdam as draem_wdam_config
from wdam_jax.data import anomaly_sources, augment, demo
from wdam_jax.methods import draem as draem_method
from wdam_jax.methods.registry import get_method
from wdam_jax.models import draem as draem_model

# --------------------------------------------------------------------------------------------
# Network


def _forward(model: nnx.Module, x, *, shapes_only: bool = False):
    """``model(x, train=False)`` as one compiled program (eager NNX compiles op by op), or only
    its output shapes."""
    graphdef, state = nnx.split(model)
    fn = lambda state, x: nnx.merge(graphdef, state, copy=True)(x, train=False)
    return jax.eval_shape(fn, state, x) if shapes_only else jax.jit(fn)(state, x)


def _num_params(module: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _conv(cin, cout):  # Conv2d(3x3, bias=True)
    return 9 * cin * cout + cout


def _conv_bn(cin, cout):  # Conv2d + BatchNorm2d (weight + bias)
    return _conv(cin, cout) + 2 * cout


def _wdam(c, r=16):  # Linear(4C, 4C/r) + Linear(4C/r, 4)
    h = max(1, 4 * c // r)
    return 4 * c * h + h + 4 * h + 4


def _official_reconstructive(w):
    """The layer list of DRAEM's ReconstructiveSubNetwork (model_unet.py)."""
    # EncoderReconstructive: block1..5 = two conv-BN each; widths w, 2w, 4w, 8w, 8w.
    enc = [(3, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w)]
    enc += [(4 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w), (8 * w, 8 * w)]
    # DecoderReconstructive: up1 (8w->8w), db1 (8w->8w->4w), up2 (4w), db2 (4w->4w->2w),
    # up3 (2w), db3 (2w->2w->w), up4 (w), db4 (w->w->w), then fin_out conv (w->3, no BN).
    dec = [(8 * w, 8 * w), (8 * w, 8 * w), (8 * w, 4 * w), (4 * w, 4 * w), (4 * w, 4 * w)]
    dec += [(4 * w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, w), (w, w), (w, w), (w, w)]
    return sum(_conv_bn(a, b) for a, b in enc + dec) + _conv(w, 3)


def _official_discriminative(w, cin=6, cout=2):
    """The layer list of DRAEM's DiscriminativeSubNetwork (model_unet.py)."""
    # EncoderDiscriminative: block1..6 = two conv-BN each; widths w, 2w, 4w, 8w, 8w, 8w.
    widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
    enc = []
    for a, b in zip([cin, *widths[:-1]], widths, strict=True):
        enc += [(a, b), (b, b)]
    # DecoderDiscriminative: up_b (8w->8w), db_b (16w->8w->8w), up1 (8w->4w), db1 (12w->4w->4w),
    # up2 (4w->2w), db2 (6w->2w->2w), up3 (2w->w), db3 (3w->w->w), up4 (w->w), db4 (2w->w->w),
    # then fin_out conv (w->2, no BN).
    dec = [(8 * w, 8 * w), (16 * w, 8 * w), (8 * w, 8 * w), (8 * w, 4 * w), (12 * w, 4 * w)]
    dec += [(4 * w, 4 * w), (4 * w, 2 * w), (6 * w, 2 * w), (2 * w, 2 * w), (2 * w, w)]
    dec += [(3 * w, w), (w, w), (w, w), (2 * w, w), (w, w)]
    return sum(_conv_bn(a, b) for a, b in enc + dec) + _conv(w, cout)


@pytest.mark.parametrize("wdam_blocks", [(), (1, 2, 3)])
def test_parameter_counts_equal_the_official_architecture(wdam_blocks):
    model = nnx.eval_shape(lambda: draem_model.Draem(wdam_blocks=wdam_blocks, rngs=nnx.Rngs(0)))
    w = draem_model.RECON_WIDTH
    wdam = sum(_wdam(c) for i, c in enumerate((w, 2 * w, 4 * w), 1) if i in wdam_blocks)
    assert _num_params(model.reconstructive) == _official_reconstructive(w) + wdam
    assert _num_params(model.discriminative) == _official_discriminative(draem_model.DISC_WIDTH)


@pytest.mark.parametrize("size", [32, 33, 40, 45])
def test_output_shapes_at_odd_and_even_sizes(size):
    model = draem_model.Draem(recon_width=2, disc_width=2, wdam_blocks=(1, 2, 3), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (2, size, size, 3))
    out = _forward(model, x, shapes_only=size != 45)
    assert out["reconstruction"].shape == (2, size, size, 3)
    assert out["logits"].shape == (2, size, size, 2)
    assert out["anomaly"].shape == (2, size, size)
    if size == 45:  # one odd size run for real
        assert np.all(np.isfinite(np.asarray(out["anomaly"])))


@pytest.mark.parametrize(("n_in", "n_out"), [(4, 8), (5, 10), (7, 15), (1, 2)])
def test_upsampling_is_torchs_bilinear_align_corners(n_in, n_out):
    x = np.random.default_rng(0).normal(size=(2, n_in, n_in + 1, 3)).astype(np.float32)
    ours = draem_model.upsample_bilinear(jnp.asarray(x), (n_out, n_out + 2))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(n_out, n_out + 2), mode="bilinear",
        align_corners=True,
    ).permute(0, 2, 3, 1)  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)


def _force_wdam(model: nnx.Module, weight: float) -> None:
    """Every WDAM's sub-band weights -> ``weight`` (0 or 1) for any input (sigmoid saturated)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, draem_model.WDAM):
            fc2 = node.fc2
            fc2.kernel.set_value(jnp.zeros_like(fc2.kernel.get_value()))
            fc2.bias.set_value(jnp.full_like(fc2.bias.get_value(), 50.0 if weight else -50.0))


def test_wdam_weights_zero_give_the_plain_network_and_one_doubles_the_block():
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    model = draem_model.Draem(recon_width=4, disc_width=2, wdam_blocks=(1, 2, 3), rngs=nnx.Rngs(0))
    with_wdam = _forward(model, x)["reconstruction"]
    _force_wdam(model, 0.0)
    gated_off = _forward(model, x)
    for i in (1, 2, 3):
        setattr(model.reconstructive.encoder, f"wdam{i}", None)
    plain = _forward(model, x)
    assert not np.allclose(with_wdam, plain["reconstruction"], rtol=0.1, atol=0)  # WDAM acts
    np.testing.assert_allclose(gated_off["anomaly"], plain["anomaly"], atol=1e-6)
    np.testing.assert_allclose(gated_off["reconstruction"], plain["reconstruction"], atol=1e-6)
    # Weights 1: WDAM is the identity (perfect reconstruction), so block 1 gives ReLU(2 X).
    model1 = draem_model.Draem(recon_width=4, disc_width=2, wdam_blocks=(1,), rngs=nnx.Rngs(0))
    _force_wdam(model1, 1.0)
    encoder = model1.reconstructive.encoder
    star = _forward(encoder, x)[0]
    plain_block = _forward(encoder.block1, x)
    np.testing.assert_allclose(star, jax.nn.relu(2 * plain_block), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Losses and scores


def test_ssim_matches_scikit_image_and_a_zero_padded_reference():
    rng = np.random.default_rng(0)
    a = rng.random((2, 28, 31, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1).astype(np.float32)
    ours = np.asarray(draem_method.ssim_map(jnp.asarray(a), jnp.asarray(b)))
    for i in range(2):
        ref = skimage.metrics.structural_similarity(
            a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=-1,
        )  # fmt: skip
        # skimage averages the interior, where the 11 x 11 window needs no padding.
        np.testing.assert_allclose(ours[i, 5:-5, 5:-5].mean(), ref, rtol=1e-4)

    # Borders: zero padding, as DRAEM's F.conv2d(padding=5); radius int(3.33 * 1.5 + 0.5) = 5.
    def blur(v):
        return scipy.ndimage.gaussian_filter(
            v.astype(np.float64), sigma=(0, 1.5, 1.5, 0), mode="constant", truncate=10 / 3
        )

    mx, my = blur(a), blur(b)
    vx, vy, cov = blur(a * a) - mx**2, blur(b * b) - my**2, blur(a * b) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref_map = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    np.testing.assert_allclose(ours, ref_map, atol=2e-4)


def test_focal_loss_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 9, 7, 2)).astype(np.float32)
    target = rng.random((2, 9, 7)) < 0.3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for gamma in (0.0, 2.0):
        # DRAEM's FocalLoss: one-hot clipped to [1e-5, 1 - 1e-5], p_t = <onehot, p> + 1e-5.
        onehot = np.stack([~target, target], -1).astype(np.float64).clip(1e-5, 1 - 1e-5)
        pt = (onehot * probs).sum(-1) + 1e-5
        ref = np.mean(-((1 - pt) ** gamma) * np.log(pt))
        ours = draem_method.focal_loss(jnp.asarray(probs), jnp.asarray(target), gamma=gamma)
        np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


@pytest.mark.parametrize("pool", [21, 5])
def test_image_score_is_max_of_zero_padded_average_pool(pool):
    maps = np.random.default_rng(2).random((3, 30, 26)).astype(np.float32)
    maps[1, 3:8, 20:25] += 2.0
    # torch avg_pool2d(k, stride 1, padding k // 2) counts the zero padding: uniform_filter, cval 0.
    ref = scipy.ndimage.uniform_filter(maps.astype(np.float64), (1, pool, pool), mode="constant")
    ours = draem_method.pooled_max(jnp.asarray(maps), pool_size=pool)
    np.testing.assert_allclose(np.asarray(ours), ref.max(axis=(1, 2)), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Augmentation against PIL


def test_source_augmenters_sharpness_and_equalize_match_pil():
    img = (np.random.default_rng(3).random((20, 24, 3)) * 255).astype(np.uint8)
    for factor in (0.0, 0.5, 1.7):
        ref = np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(factor)) / 255.0
        ours = np.clip(augment._enhance_sharpness(img.astype(np.float32) / 255.0, factor), 0, 1)
        np.testing.assert_allclose(ours, ref, atol=2.5 / 255)  # PIL rounds its smoothed image
    ref = np.asarray(ImageOps.equalize(Image.fromarray(img))) / 255.0
    ours = np.stack([augment._equalize(img[..., c] / 255.0) for c in range(3)], -1)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_procedural_textures_are_deterministic_varied_and_not_demo_photos():
    textures = [anomaly_sources.procedural_texture(0, i, 48) for i in range(10)]
    np.testing.assert_array_equal(textures[3], anomaly_sources.procedural_texture(0, 3, 48))
    for t in textures:
        assert t.shape == (48, 48, 3) and t.dtype == np.float32
        assert 0.0 <= t.min() and t.max() <= 1.0 and t.std() > 0.02
    assert len({t.tobytes() for t in textures}) == 10
    photos = [demo._resize(demo._photo(name), 48) for name in ("brick", "grass", "gravel")]
    for t in textures:
        gray = t.mean(-1)
        for p in photos:
            assert abs(np.corrcoef(gray.ravel(), p.ravel())[0, 1]) < 0.9


# --------------------------------------------------------------------------------------------
# The method on the demo data


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    config = draem_wdam_config.get_config("demo")
    config.data.root = str(tmp_path_factory.mktemp("demo"))
    config.data.image_size = 32
    config.data.category = "grass"
    config.model.recon_width = 2
    config.model.disc_width = 2
    config.train.batch_size = 4
    config.train.epochs = 10
    config.score.eval_batch_size = 8
    return get_method(config)


def test_batch_is_a_pure_function_of_step_and_half_normal(method):
    a, b = method.batch(3), method.batch(3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"].shape == (4, 32, 32, 3) and a["mask"].shape == (4, 32, 32)
    anomalous = []
    for step in range(12):
        batch = method.batch(step)
        assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
        outside = batch["mask"] == 0
        np.testing.assert_array_equal(batch["augmented"][outside], batch["image"][outside])
        anomalous += list(batch["mask"].any(axis=(1, 2)))
    assert 0.25 < np.mean(anomalous) < 0.75  # DRAEM: half the samples stay normal


def test_validation_images_are_held_out_and_steps_follow_epochs(method):
    data = method.data
    assert len(data.val_images) == round(0.2 * (len(data.images) + len(data.val_images)))
    train = {x.tobytes() for x in data.images}
    assert not any(x.tobytes() in train for x in data.val_images)
    assert method.total_steps == 10 * math.ceil(len(data.images) / 4)
    _, masks = method.validation_set
    v = len(data.val_images)
    assert not masks[:v].any() and masks[v:].any(axis=(1, 2)).all()


def test_optimizer_is_adam_with_x02_steps_at_80_and_90_percent(method):
    tx = method.optimizer()
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    total, lrs = method.total_steps, []
    for _ in range(total):
        updates, state = tx.update({"w": jnp.ones(())}, state, params)
        lrs.append(-float(updates["w"]))  # Adam on a constant gradient moves by lr
    spe = method.steps_per_epoch
    expected = np.full(total, 1e-4)
    expected[int(0.8 * 10) * spe :] = 2e-5
    expected[int(0.9 * 10) * spe :] = 4e-6
    np.testing.assert_allclose(lrs, expected, rtol=1e-3)


def test_train_step_validate_and_score(method):
    model = method.create_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = {k: jnp.asarray(v) for k, v in method.batch(0).items()}

    @jax.jit
    def loss_and_grad(p, batch):
        def objective(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return method.loss(m, batch, step=jnp.zeros([], jnp.int32), key=jax.random.key(0))

        return jax.value_and_grad(objective, has_aux=True)(p)

    (loss, aux), grads = loss_and_grad(params, batch)
    assert np.isfinite(float(loss)) and set(aux) == {"l2", "ssim", "focal"}
    np.testing.assert_allclose(float(loss), sum(float(v) for v in aux.values()), rtol=1e-5)
    assert float(optax.global_norm(grads)) > 0
    val = method.validate(model, step=0)
    assert set(val) == {
        "val/i_auroc",
        "val/p_auroc",
        "val/mean_auroc",
        "test/i_auroc",
        "test/p_auroc",
    }
    assert all(0.0 <= v <= 1.0 for v in val.values())
    assert val["val/mean_auroc"] == pytest.approx((val["val/i_auroc"] + val["val/p_auroc"]) / 2)
    # The test curve is the test split scored as evaluation scores it (at the input size).
    test = method.test_split
    test_scores = method.score(model, {}, test.images, step=0)
    assert val["test/i_auroc"] == pytest.approx(
        sklearn.metrics.roc_auc_score(test.labels, test_scores.image_scores)
    )
    assert val["test/p_auroc"] == pytest.approx(
        sklearn.metrics.roc_auc_score(test.masks.reshape(-1), test_scores.maps.reshape(-1))
    )
    images, _ = method.validation_set
    scores = method.score(model, {}, images, step=0)
    maps = np.asarray(_forward(model, jnp.asarray(images))["anomaly"])
    np.testing.assert_allclose(scores.maps, maps, atol=1e-5)
    pool = method.config.score.pool_size
    ref = scipy.ndimage.uniform_filter(maps.astype(np.float64), (1, pool, pool), mode="constant")
    np.testing.assert_allclose(scores.image_scores, ref.max(axis=(1, 2)), rtol=1e-4)


@pytest.mark.parametrize("module", [draem_config, draem_wdam_config])
@pytest.mark.parametrize("arg", [None, "demo"])
def test_configs_build(module, arg):
    config = module.get_config(arg)
    assert config.method == "draem"
    assert tuple(config.model.wdam_blocks) == ((1, 2, 3) if module is draem_wdam_config else ())
    if arg is None:  # the official hyperparameters
        assert config.train.epochs == 700 and config.train.batch_size == 8
        assert config.data.image_size == 256 and config.model.recon_width == 128
    with pytest.raises(ValueError, match="demo"):
        module.get_config("bogus")


def test_missing_texture_folder_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="anomaly_source_dir"):
        anomaly_sources.TextureBank(str(tmp_path / "dtd"), image_size=16, seed=0)
