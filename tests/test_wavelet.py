"""dwt2 / idwt2 against pywt (the independent reference) and their transform properties."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt

from wdam_jax.wavelet import dwt2, idwt2

METHODS = ("conv", "reshape")
SHAPES = ((2, 8, 8, 3), (1, 7, 9, 2), (3, 5, 4, 1), (1, 1, 1, 4))


def _pywt_bands(x):
    ca, (ch, cv, cd) = pywt.dwt2(np.asarray(x, np.float64), "haar", mode="symmetric", axes=(1, 2))
    return ca, ch, cv, cd  # lh = cH, hl = cV, hh = cD


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dwt2_equals_pywt(method, shape):
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    bands = dwt2(jnp.asarray(x), method=method)
    for name, band, ref in zip(("ll", "lh", "hl", "hh"), bands, _pywt_bands(x), strict=True):
        chex.assert_shape(band, ref.shape)
        np.testing.assert_allclose(np.asarray(band), ref, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_idwt2_inverts_dwt2(method, shape):
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    y = idwt2(*dwt2(x, method=method), size=shape[1:3], method=method)
    chex.assert_trees_all_close(y, x, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_idwt2_equals_pywt_idwt2(method):
    rng = np.random.default_rng(2)
    bands = [rng.normal(size=(2, 4, 5, 3)).astype(np.float32) for _ in range(4)]
    ref = pywt.idwt2((bands[0], tuple(bands[1:])), "haar", mode="symmetric", axes=(1, 2))
    y = idwt2(*map(jnp.asarray, bands), method=method)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16(method):
    x = np.random.default_rng(3).normal(size=(1, 6, 6, 4)).astype(np.float32)
    bands = dwt2(jnp.asarray(x, jnp.bfloat16), method=method)
    for band, ref in zip(bands, _pywt_bands(x), strict=True):
        assert band.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(band, np.float32), ref, rtol=2e-2, atol=2e-2)
    y = idwt2(*bands, method=method)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), x, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("method", METHODS)
def test_jit_traces_once_per_shape(method):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def roundtrip(x):
        return idwt2(*dwt2(x, method=method), size=x.shape[1:3], method=method)

    x = jnp.ones((2, 6, 6, 3))
    roundtrip(x)
    roundtrip(x + 1.0)  # same shape: no retrace
    with pytest.raises(AssertionError, match="traced > 1"):
        roundtrip(jnp.ones((2, 8, 8, 3)))  # a new shape retraces, and the counter sees it


@pytest.mark.parametrize("method", METHODS)
def test_grad_of_orthonormal_transform(method):
    # The Haar transform is orthonormal: d/dx of 0.5 * ||dwt2(x)||^2 is x itself (even sizes).
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 4, 6, 2)), jnp.float32)
    energy = lambda x: 0.5 * sum(jnp.sum(b**2) for b in dwt2(x, method=method))
    chex.assert_trees_all_close(jax.grad(energy)(x), x, atol=1e-5)
    # And the gradient of the low band's sum is 1/2 everywhere.
    g = jax.grad(lambda x: jnp.sum(dwt2(x, method=method)[0]))(x)
    chex.assert_trees_all_close(g, jnp.full_like(x, 0.5))


@pytest.mark.parametrize("method", METHODS)
def test_vmap_matches_batch(method):
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 2, 4, 4, 2)), jnp.float32)
    vmapped = jax.vmap(lambda v: dwt2(v, method=method))(x)
    batched = dwt2(x.reshape(6, 4, 4, 2), method=method)
    for a, b in zip(vmapped, batched, strict=True):
        chex.assert_trees_all_close(a.reshape(b.shape), b)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        dwt2(jnp.ones((4, 4, 3)))
    with pytest.raises(ValueError, match="size"):
        idwt2(*dwt2(jnp.ones((1, 4, 4, 1))), size=(9, 4))
