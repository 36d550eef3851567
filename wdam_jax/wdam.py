"""The Wavelet Domain Attention Module (paper Sec. 3.2, eq. 6-8; Fig. 4)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from wdam_jax.wavelet import Method, dwt2, idwt2

SUBBANDS = ("LL", "LH", "HL", "HH")


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
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        method: Method = "auto",
        rngs: nnx.Rngs,
    ):
        hidden = max(1, 4 * channels // reduction)
        self.channels = channels
        self.reduction = reduction
        self.method = method
        self.fc1 = nnx.Linear(4 * channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, len(SUBBANDS), rngs=rngs)
        self.subband_weights = SubbandWeights(jnp.zeros((0, len(SUBBANDS)), jnp.float32))
        self.on_weights: Callable[[jax.Array], None] | None = None

    def attention(self, x_w: jax.Array) -> jax.Array:
        """Eq. 6-7: ``[B, h, w, 4C]`` joint wavelet features -> ``[B, 4]`` weights in (0, 1)."""
        x_w = x_w.astype(jnp.float32)
        avg = jnp.mean(x_w, axis=(1, 2))
        peak = jnp.max(x_w, axis=(1, 2))
        mlp = lambda v: self.fc2(jax.nn.relu(self.fc1(v)))
        return jax.nn.sigmoid(mlp(avg) + mlp(peak))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies WDAM to ``[B, H, W, C]`` features; returns ``[B, H, W, C]``."""
        bands = dwt2(x, method=self.method)
        weights = self.attention(jnp.concatenate(bands, axis=-1))
        self.subband_weights.set_value(weights)
        if self.on_weights is not None:
            jax.debug.callback(self.on_weights, weights)
        return _scale_and_invert(bands, weights, x.shape[1:3], self.method)
