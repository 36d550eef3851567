"""Single-level orthonormal 2-D Haar wavelet transform (paper Sec. 3.2, eq. 4-5).

Conventions (docs/design.md, sub-band naming): inputs are NHWC, the transform runs over H and W,
and the sub-bands equal ``pywt.dwt2(x, "haar", mode="symmetric")`` over those axes with

    ll = pywt cA,   lh = pywt cH,   hl = pywt cV,   hh = pywt cD.

For a 2x2 block ``[[a, b], [c, d]]`` (rows along H) that is

    ll = (a + b + c + d) / 2      lh = (a + b - c - d) / 2
    hl = (a - b + c - d) / 2      hh = (a - b - c + d) / 2

Odd H or W: pywt's symmetric mode for a length-2 filter repeats the last row / column, so the
input is edge-padded by one and ``idwt2(..., size=(H, W))`` crops it back.

Two exact formulations are provided:

* ``"conv"``: the paper's (after WTConv): a depthwise ``lax.conv_general_dilated`` with fixed
  2x2 Haar kernels at stride 2, and its transposed convolution (input dilation 2) as inverse.
* ``"reshape"``: the same arithmetic on a space-to-depth view (``[B, h, 2, w, 2, C]``), which
  XLA fuses into one elementwise kernel.

``method="auto"`` picks ``"reshape"`` on CPU, where it measured several times faster (see
``benchmarks/bench_wavelet.py``), and the paper's ``"conv"`` on other backends.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Method = Literal["auto", "conv", "reshape"]
SubBands = tuple[jax.Array, jax.Array, jax.Array, jax.Array]

# Rows: ll, lh, hl, hh. Columns: the block entries a, b, c, d = x[0,0], x[0,1], x[1,0], x[1,1].
# The matrix is orthonormal, so its transpose is the synthesis (inverse) operator.
HAAR = 0.5 * np.array(
    [
        [1.0, 1.0, 1.0, 1.0],
        [1.0, 1.0, -1.0, -1.0],
        [1.0, -1.0, 1.0, -1.0],
        [1.0, -1.0, -1.0, 1.0],
    ],
    dtype=np.float32,
)
# The analysis filters as 2x2 kernels over (dh, dw): _KERNELS[k, dh, dw].
_KERNELS = HAAR.reshape(4, 2, 2)
_DIMS = ("NHWC", "HWIO", "NHWC")


def _resolve(method: Method) -> str:
    if method == "auto":
        return "reshape" if jax.default_backend() == "cpu" else "conv"
    if method not in ("conv", "reshape"):
        raise ValueError(f"Unknown wavelet method {method!r}; use 'auto', 'conv' or 'reshape'.")
    return method


def _pad_even(x: jax.Array) -> jax.Array:
    """Repeats the last row / column of odd-sized inputs (pywt 'symmetric' mode for Haar)."""
    pad_h, pad_w = x.shape[1] % 2, x.shape[2] % 2
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return x


def dwt2(x: jax.Array, *, method: Method = "auto") -> SubBands:
    """Single-level 2-D Haar DWT over the spatial axes (eq. 4).

    Args:
      x: ``[B, H, W, C]`` array, float32 or bfloat16.
      method: ``"conv"`` (fixed-kernel depthwise convolution), ``"reshape"`` or ``"auto"``.

    Returns:
      ``(ll, lh, hl, hh)``, each ``[B, ceil(H/2), ceil(W/2), C]`` in ``x.dtype``.
    """
    if x.ndim != 4:
        raise ValueError(f"dwt2 expects [B, H, W, C], got shape {x.shape}.")
    x = _pad_even(x)
    batch, height, width, channels = x.shape
    h, w = height // 2, width // 2
    if _resolve(method) == "reshape":
        blocks = x.reshape(batch, h, 2, w, 2, channels)
        a, b = blocks[:, :, 0, :, 0], blocks[:, :, 0, :, 1]
        c, d = blocks[:, :, 1, :, 0], blocks[:, :, 1, :, 1]
        half = jnp.asarray(0.5, x.dtype)
        ab, cd = a + b, c + d
        a_b, c_d = a - b, c - d
        return (half * (ab + cd), half * (ab - cd), half * (a_b + c_d), half * (a_b - c_d))
    # Depthwise conv: output channel 4c + k is sub-band k of input channel c.
    kernel = np.tile(np.transpose(_KERNELS, (1, 2, 0))[:, :, None, :], (1, 1, 1, channels))
    out = lax.conv_general_dilated(
        x,
        jnp.asarray(kernel, x.dtype),
        window_strides=(2, 2),
        padding="VALID",
        dimension_numbers=_DIMS,
        feature_group_count=channels,
    )
    out = out.reshape(batch, h, w, channels, 4)
    return out[..., 0], out[..., 1], out[..., 2], out[..., 3]


def idwt2(
    ll: jax.Array,
    lh: jax.Array,
    hl: jax.Array,
    hh: jax.Array,
    *,
    size: tuple[int, int] | None = None,
    method: Method = "auto",
) -> jax.Array:
    """Inverse of :func:`dwt2` (eq. 5).

    Args:
      ll, lh, hl, hh: sub-bands, each ``[B, h, w, C]``.
      size: ``(H, W)`` of the signal to return; defaults to ``(2h, 2w)``. Odd sizes crop the
        repeated last row / column that :func:`dwt2` added.
      method: ``"conv"`` (transposed convolution), ``"reshape"`` or ``"auto"``.

    Returns:
      ``[B, H, W, C]`` array in the sub-bands' dtype.
    """
    if not (ll.shape == lh.shape == hl.shape == hh.shape):
        raise ValueError(
            f"idwt2 sub-bands must share one shape, got {ll.shape}, {lh.shape}, {hl.shape}, "
            f"{hh.shape}."
        )
    batch, h, w, channels = ll.shape
    height, width = size if size is not None else (2 * h, 2 * w)
    if not (2 * h - 1 <= height <= 2 * h and 2 * w - 1 <= width <= 2 * w):
        raise ValueError(f"size={size} does not match sub-bands of spatial shape {(h, w)}.")
    if _resolve(method) == "reshape":
        half = jnp.asarray(0.5, ll.dtype)
        s, t = ll + lh, ll - lh
        u, v = hl + hh, hl - hh
        a, b = half * (s + u), half * (s - u)
        c, d = half * (t + v), half * (t - v)
        top = jnp.stack([a, b], axis=3)  # [B, h, w, 2(dw), C]
        bottom = jnp.stack([c, d], axis=3)
        x = jnp.stack([top, bottom], axis=2).reshape(batch, 2 * h, 2 * w, channels)
    else:
        # Interleave to channel 4c + k, then a grouped transposed conv: input dilation 2 and a
        # spatially flipped kernel scatter each coefficient back onto its 2x2 block.
        bands = jnp.stack([ll, lh, hl, hh], axis=-1).reshape(batch, h, w, channels * 4)
        synthesis = np.transpose(_KERNELS[:, ::-1, ::-1], (1, 2, 0))[:, :, :, None]
        kernel = np.tile(synthesis, (1, 1, 1, channels))  # [2, 2, 4, C]
        x = lax.conv_general_dilated(
            bands,
            jnp.asarray(kernel, ll.dtype),
            window_strides=(1, 1),
            padding=((1, 1), (1, 1)),
            lhs_dilation=(2, 2),
            dimension_numbers=_DIMS,
            feature_group_count=channels,
        )
    return x[:, :height, :width, :]
