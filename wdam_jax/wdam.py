"""The Wavelet Domain Attention Module (paper Sec. 3.2, eq. 6-8; Fig. 4).

Two exact formulations of the same module (``WDAM(impl=...)``):

* ``"reference"``: the paper's: ``dwt2`` into four sub-bands, scale each by its weight, ``idwt2``
  back (with the wavelet formulation ``method``, the paper's being ``"conv"``).
* ``"fused"`` (default): per 2x2 block the scale-and-invert is one 4x4 linear map
  ``H^T diag(A_w) H`` (``H`` the orthonormal Haar analysis matrix) applied to the block's four
  entries: one elementwise pass that reads X and writes the output, into which XLA also fuses
  Bottleneck*'s ``ReLU(X + WDAM(X))``. The pooled statistics of eq. 6 are read from the
  sub-bands per band (no ``[B, h, w, 4C]`` concatenation). ``tests/test_wdam.py`` checks both
  agree, values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from wdam_jax.wavelet import HAAR, Method, dwt2, idwt2

SUBBANDS = ("LL", "LH", "HL", "HH")
Impl = Literal["fused", "reference"]


class SubbandWeights(nnx.Variable):
    """The sub-band weights ``A_w`` a WDAM applied in its last call, ``[B, 4]`` (for Table 10).

    A diagnostic, not a parameter or a statistic: training and checkpoints leave it out.
    """


def reweight_subbands(x: jax.Array, weights: jax.Array, *, method: Method = "auto") -> jax.Array:
    """Scales each Haar sub-band of ``x`` by its weight and transforms back (eq. 8 + IDWT).

    Args:
      x: ``[B, H, W, C]`` features.
      weights: ``[B, 4]`` per-image weights for (LL, LH, HL, HH).
      method: wavelet formulation, see :mod:`wdam_jax.wavelet`.

    Returns:
      ``[B, H, W, C]``; all-zero weights give zeros, all-one weights give ``x``.
    """
    return _scale_and_invert(dwt2(x, method=method), weights, x.shape[1:3], method)


def _scale_and_invert(bands, weights: jax.Array, size: tuple[int, int], method: Method):
    scale = weights.astype(bands[0].dtype)[:, None, None, :]
    scaled = [band * scale[..., k : k + 1] for k, band in enumerate(bands)]
    return idwt2(*scaled, size=size, method=method)


def block_maps(weights: jax.Array) -> jax.Array:
    """The per-image 2x2-block operator of eq. 8 + IDWT: ``H^T diag(A_w) H``.

    Args:
      weights: ``[B, 4]`` sub-band weights ``A_w`` for (LL, LH, HL, HH).

    Returns:
      float32 ``[B, 4, 4]``, acting on a block's entries ``(a, b, c, d)`` =
      ``(x[0, 0], x[0, 1], x[1, 0], x[1, 1])``; symmetric, the identity for all-one weights.
    """
    haar = jnp.asarray(HAAR)
    return jnp.einsum("kj,bk,ki->bji", haar, weights.astype(jnp.float32), haar)


def reweight_blocks(x: jax.Array, weights: jax.Array) -> jax.Array:
    """:func:`reweight_subbands` as one 4x4 linear map per 2x2 block (the fused formulation).

    Args:
      x: ``[B, H, W, C]`` features, float32 or bfloat16; odd sizes repeat the last row / column
        (pywt's symmetric mode, as :func:`wdam_jax.wavelet.dwt2`) and are cropped back.
      weights: ``[B, 4]`` per-image weights for (LL, LH, HL, HH).

    Returns:
      ``[B, H, W, C]`` in ``x.dtype``, computed in float32 (bfloat16 inputs are rounded once, at
      the end).
    """
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    h, w = padded.shape[1] // 2, padded.shape[2] // 2
    blocks = padded.reshape(batch, h, 2, w, 2, channels).astype(jnp.float32)
    entries = [blocks[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]  # a, b, c, d
    m = block_maps(weights)[:, :, :, None, None, None]  # [B, 4, 4, 1, 1, 1]
    out = [sum(m[:, i, j] * entries[j] for j in range(4)) for i in range(4)]
    top = jnp.stack(out[:2], axis=3)  # [B, h, w, 2 (dw), C]
    bottom = jnp.stack(out[2:], axis=3)
    y = jnp.stack([top, bottom], axis=2).reshape(batch, 2 * h, 2 * w, channels)
    return y[:, :height, :width].astype(x.dtype)


class WDAM(nnx.Module):
    """Wavelet Domain Attention Module: one attention weight per Haar sub-band.

    ``X_w = concat(LL, LH, HL, HH)`` (4C channels) is average- and max-pooled over space (eq. 6);
    one shared MLP ``4C -> 4C/r -> 4`` (ReLU hidden) maps both, and the sum goes through a
    sigmoid to give ``A_w`` with one weight per sub-band (eq. 7). The paper's eq. 7 omits the
    sigmoid, but Table 10 reports weights in [0, 1] and says all-zero weights mean "no effect",
    which is CBAM's sigmoid gate, so the sigmoid is applied here. ``X_w * A_w`` is split back into
    sub-bands and inverse-transformed to ``[B, H, W, C]`` (eq. 8).

    The weights of the last call are kept in ``self.subband_weights`` (``[B, 4]``) without
    changing the output. ``self.on_weights``, when set (a static attribute, so a merged copy inside
    a jitted function keeps it), is called with each call's weights as a numpy ``[B, 4]`` through
    ``jax.debug.callback``: how :mod:`wdam_jax.analysis.subband_weights` collects them from any
    method's scoring function (Table 10).

    Args:
      channels: C of the features.
      reduction: the MLP reduction ratio r.
      impl: ``"fused"`` (one 4x4 map per 2x2 block, :func:`reweight_blocks`) or
        ``"reference"`` (``dwt2`` -> scale -> ``idwt2``); see the module docstring.
      method: the wavelet formulation of ``impl="reference"`` (``"conv"`` is the paper's);
        the fused form is its own formulation and takes only ``"auto"``.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        impl: Impl = "fused",
        method: Method = "auto",
        rngs: nnx.Rngs,
    ):
        if impl not in ("fused", "reference"):
            raise ValueError(f"Unknown WDAM impl {impl!r}; use 'fused' or 'reference'.")
        if impl == "fused" and method != "auto":
            raise ValueError(
                f"WDAM(method={method!r}) selects the wavelet formulation of impl='reference'; "
                "pass impl='reference' with it."
            )
        hidden = max(1, 4 * channels // reduction)
        self.channels = channels
        self.reduction = reduction
        self.impl = impl
        self.method = method
        self.fc1 = nnx.Linear(4 * channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, len(SUBBANDS), rngs=rngs)
        self.subband_weights = SubbandWeights(jnp.zeros((0, len(SUBBANDS)), jnp.float32))
        self.on_weights: Callable[[jax.Array], None] | None = None

    def attention(self, x_w: jax.Array) -> jax.Array:
        """Eq. 6-7: ``[B, h, w, 4C]`` joint wavelet features -> ``[B, 4]`` weights in (0, 1)."""
        return self._gate(*_pool([x_w]))

    def _gate(self, avg: jax.Array, peak: jax.Array) -> jax.Array:
        mlp = lambda v: self.fc2(jax.nn.relu(self.fc1(v)))
        return jax.nn.sigmoid(mlp(avg) + mlp(peak))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies WDAM to ``[B, H, W, C]`` features; returns ``[B, H, W, C]``."""
        fused = self.impl == "fused"
        bands = dwt2(x, method="reshape" if fused else self.method)
        weights = self._gate(*_pool(bands)) if fused else self.attention(jnp.concatenate(bands, -1))
        self.subband_weights.set_value(weights)
        if self.on_weights is not None:
            jax.debug.callback(self.on_weights, weights)
        if fused:
            return reweight_blocks(x, weights)
        return _scale_and_invert(bands, weights, x.shape[1:3], self.method)


def _pool(parts) -> tuple[jax.Array, jax.Array]:
    """Eq. 6 over channel-concatenated ``parts`` (each ``[B, h, w, *]``): ``[B, sum *]`` twice."""
    parts = [p.astype(jnp.float32) for p in parts]
    avg = jnp.concatenate([jnp.mean(p, axis=(1, 2)) for p in parts], axis=-1)
    peak = jnp.concatenate([jnp.max(p, axis=(1, 2)) for p in parts], axis=-1)
    return avg, peak
