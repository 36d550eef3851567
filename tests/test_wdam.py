"""WDAM (eq. 6-8) and Bottleneck* (eq. 9): properties and a numpy + pywt reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt
from flax import nnx

from wdam_jax.models.wide_resnet import Bottleneck
from wdam_jax.wdam import WDAM, block_maps, reweight_blocks, reweight_subbands


def _force_gate(wdam: WDAM, value: float) -> None:
    """Makes the sigmoid gate saturate at 0 or 1 for every input."""
    fc2 = wdam.fc2
    fc2.kernel.set_value(jnp.zeros_like(fc2.kernel.get_value()))
    fc2.bias.set_value(jnp.full_like(fc2.bias.get_value(), 60.0 if value else -60.0))


def _features(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (1, 7, 5, 16)])
def test_gate_zero_gives_zero_and_one_gives_identity(shape):
    x = _features(shape)
    wdam = WDAM(16, rngs=nnx.Rngs(0))
    _force_gate(wdam, 0.0)
    chex.assert_trees_all_close(wdam(x), jnp.zeros_like(x), atol=1e-6)
    _force_gate(wdam, 1.0)
    chex.assert_trees_all_close(wdam(x), x, atol=1e-5)


def test_reweight_subbands_scales_each_band():
    x = _features((2, 6, 6, 3), seed=1)
    weights = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    y = np.asarray(reweight_subbands(x, weights))
    # Image 0 keeps only LL, image 1 only the details; pywt rebuilds both independently.
    ca, details = pywt.dwt2(np.asarray(x), "haar", axes=(1, 2))
    zeros = np.zeros_like(ca)
    only_ll = pywt.idwt2((ca, (zeros, zeros, zeros)), "haar", axes=(1, 2))
    only_details = pywt.idwt2((zeros, details), "haar", axes=(1, 2))
    np.testing.assert_allclose(y[0], only_ll[0], atol=1e-5)
    np.testing.assert_allclose(y[1], only_details[1], atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_wdam_matches_numpy_reference(impl):
    channels, reduction = 32, 8
    x = _features((3, 10, 12, channels), seed=2)
    wdam = WDAM(channels, reduction=reduction, impl=impl, rngs=nnx.Rngs(3))
    y = wdam(x)
    # Reference: pywt sub-bands, CBAM-style pooled MLP with the module's weights, sigmoid gate.
    xn = np.asarray(x, np.float64)
    ca, (ch, cv, cd) = pywt.dwt2(xn, "haar", mode="symmetric", axes=(1, 2))
    x_w = np.concatenate([ca, ch, cv, cd], axis=-1)
    w1, b1 = np.asarray(wdam.fc1.kernel.get_value()), np.asarray(wdam.fc1.bias.get_value())
    w2, b2 = np.asarray(wdam.fc2.kernel.get_value()), np.asarray(wdam.fc2.bias.get_value())
    mlp = lambda v: np.maximum(v @ w1 + b1, 0.0) @ w2 + b2
    logits = mlp(x_w.mean(axis=(1, 2))) + mlp(x_w.max(axis=(1, 2)))
    a = 1.0 / (1.0 + np.exp(-logits))  # [B, 4]
    s = lambda band, k: band * a[:, None, None, k : k + 1]
    ref = pywt.idwt2((s(ca, 0), (s(ch, 1), s(cv, 2), s(cd, 3))), "haar", axes=(1, 2))
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4, rtol=1e-4)
    weights = wdam.subband_weights.get_value()
    chex.assert_shape(weights, (3, 4))
    np.testing.assert_allclose(np.asarray(weights), a, atol=1e-5)
    assert w1.shape == (4 * channels, 4 * channels // reduction) and w2.shape[1] == 4


def test_wdam_under_jit_and_grad_with_bfloat16():
    wdam = WDAM(16, rngs=nnx.Rngs(0))
    x = _features((2, 8, 8, 16)).astype(jnp.bfloat16)

    @nnx.jit
    def loss(model, x):
        return jnp.mean(model(x).astype(jnp.float32) ** 2)

    grads = nnx.grad(loss)(wdam, x)
    assert wdam(x).dtype == jnp.bfloat16
    assert float(jnp.abs(grads.fc1.kernel.get_value()).sum()) > 0


def _bottleneck_pair():
    rngs = nnx.Rngs(0)
    kwargs = dict(stride=1, wdam_reduction=4, dtype=None)
    star = Bottleneck(16, 4, wdam=True, rngs=rngs, **kwargs)
    plain = Bottleneck(16, 4, wdam=False, rngs=nnx.Rngs(1), **kwargs)
    nnx.update(plain, nnx.state(star, nnx.Not(nnx.PathContains("wdam"))))
    return star, plain


def test_bottleneck_star_with_gate_zero_is_plain_and_with_one_doubles():
    star, plain = _bottleneck_pair()
    x = jax.nn.relu(_features((2, 8, 8, 16), seed=4))
    reference = plain(x, train=False)
    _force_gate(star.wdam, 0.0)
    chex.assert_trees_all_close(star(x, train=False), reference, atol=1e-5)
    _force_gate(star.wdam, 1.0)
    # Block output X is non-negative (after ReLU), so ReLU(X + X) = 2X.
    chex.assert_trees_all_close(star(x, train=False), 2.0 * reference, atol=1e-4)


def test_block_maps_are_haar_transposed_times_weights_times_haar():
    weights = jnp.asarray(np.random.default_rng(5).uniform(size=(3, 4)), jnp.float32)
    haar = 0.5 * np.array([[1, 1, 1, 1], [1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]])
    expected = np.stack([haar.T @ np.diag(w) @ haar for w in np.asarray(weights, np.float64)])
    np.testing.assert_allclose(np.asarray(block_maps(weights)), expected, atol=1e-6)
    np.testing.assert_allclose(np.asarray(block_maps(jnp.ones((1, 4))))[0], np.eye(4), atol=1e-6)


def _wdam_pair(channels, *, method="reshape"):
    """The same WDAM weights in the fused and the reference formulation."""
    fused = WDAM(channels, reduction=4, rngs=nnx.Rngs(7))
    reference = WDAM(channels, reduction=4, impl="reference", method=method, rngs=nnx.Rngs(8))
    nnx.update(reference, nnx.state(fused, nnx.Param))
    return fused, reference


@pytest.mark.parametrize("shape", [(2, 8, 6, 8), (2, 7, 5, 8), (1, 1, 3, 8)])
@pytest.mark.parametrize("method", ["reshape", "conv"])
def test_fused_wdam_equals_reference_values_and_gradients(shape, method):
    fused, reference = _wdam_pair(shape[-1], method=method)
    x = _features(shape, seed=6)
    # Bottleneck*'s use, eq. 9, with a loss that weighs every output position differently.
    probe = _features(shape, seed=9)
    loss = lambda model, x: jnp.sum(probe * jax.nn.relu(x + model(x)))
    grad = jax.jit(nnx.grad(loss, argnums=(0, 1)))
    (g_model_f, g_x_f), (g_model_r, g_x_r) = grad(fused, x), grad(reference, x)
    chex.assert_trees_all_close(fused(x), reference(x), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
        fused.subband_weights.get_value(), reference.subband_weights.get_value(), atol=1e-6
    )
    chex.assert_trees_all_close(g_x_f, g_x_r, atol=1e-5, rtol=1e-5)
    params = lambda g: nnx.state(g, nnx.Param)
    chex.assert_trees_all_close(params(g_model_f), params(g_model_r), atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(g_model_f.fc1.kernel.get_value()).sum()) > 0


def test_fused_wdam_in_bfloat16_is_close_to_float32_and_stays_bfloat16():
    fused, reference = _wdam_pair(16)
    x = _features((2, 9, 8, 16), seed=10)
    y16 = fused(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y16)))
    # bfloat16 keeps 8 significant bits: one rounding of the input and one of the output.
    chex.assert_trees_all_close(y16.astype(jnp.float32), reference(x), atol=0.05, rtol=0.02)


def test_reweight_blocks_equals_reweight_subbands_for_any_weights():
    x = _features((3, 5, 6, 4), seed=11)
    weights = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [0.2, 0.5, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0]])
    chex.assert_trees_all_close(
        reweight_blocks(x, weights), reweight_subbands(x, weights), atol=1e-6
    )
    chex.assert_trees_all_close(reweight_blocks(x, weights)[2], x[2], atol=1e-6)


def test_fused_wdam_refuses_a_wavelet_method():
    with pytest.raises(ValueError, match="impl='reference'"):
        WDAM(8, method="conv", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown WDAM impl"):
        WDAM(8, impl="pallas", rngs=nnx.Rngs(0))
