"""Gaussian filters as ``[n, n]`` matrices, so a separable blur is two small matmuls.

XLA:CPU runs one-channel and depthwise convolutions (and their gradients) 20-50x slower than
these matmuls at the sizes used here (``benchmarks/README_patchcore.md``, ``ssim_map`` in
:mod:`wdam_jax.methods.draem`). The cost is ``O(n)`` per output pixel instead of ``O(taps)``,
which stays small for maps of a few hundred pixels.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Boundary = Literal["reflect", "zero"]


@functools.lru_cache(maxsize=64)
def gaussian_matrix(
    n: int, *, sigma: float, offsets: tuple[int, ...], boundary: Boundary
) -> np.ndarray:
    """``[n, n]`` float32 matrix ``M`` of a 1-D Gaussian filter: ``out = M @ signal``.

    Args:
      n: signal length.
      sigma: standard deviation of the taps, in samples.
      offsets: the tap positions relative to the output sample (normalised Gaussian weights).
      boundary: ``"reflect"``: scipy.ndimage's "reflect" (the edge sample repeated, reflected
        as often as the offsets need); ``"zero"``: samples outside the signal count as 0.

    Returns:
      float32 ``[n, n]``.
    """
    offsets_arr = np.asarray(offsets, np.int64)
    taps = np.exp(-0.5 * (offsets_arr / sigma) ** 2)
    taps /= taps.sum()
    before, after = max(0, -int(offsets_arr.min())), max(0, int(offsets_arr.max()))
    if boundary == "reflect":
        source = np.pad(np.arange(n), (before, after), mode="symmetric")
    elif boundary == "zero":
        source = np.pad(np.arange(n), (before, after), constant_values=-1)
    else:
        raise ValueError(f"Unknown boundary {boundary!r}; use 'reflect' or 'zero'.")
    rows = np.arange(n)
    matrix = np.zeros((n, n), np.float64)
    for offset, tap in zip(offsets_arr, taps, strict=True):
        cols = source[rows + before + offset]  # padded position -> sample (-1: outside)
        inside = cols >= 0
        np.add.at(matrix, (rows[inside], cols[inside]), tap)
    return matrix.astype(np.float32)


def gaussian_blur(maps: ArrayLike, *, sigma: float = 4.0, truncate: float = 4.0) -> jax.Array:
    """Separable Gaussian smoothing, as ``scipy.ndimage.gaussian_filter(mode="reflect")``.

    Args:
      maps: ``[B, H, W]``.
      sigma: standard deviation in pixels.
      truncate: kernel radius in standard deviations (scipy's default 4).

    Returns:
      ``[B, H, W]`` float32.
    """
    maps = jnp.asarray(maps, jnp.float32)
    radius = int(truncate * sigma + 0.5)
    kwargs = dict(sigma=sigma, offsets=tuple(range(-radius, radius + 1)), boundary="reflect")
    rows = jnp.asarray(gaussian_matrix(maps.shape[1], **kwargs))
    cols = jnp.asarray(gaussian_matrix(maps.shape[2], **kwargs))
    # Two small matmuls with the reflect padding folded into the matrices: the same sums as a
    # padded separable convolution, but XLA:CPU runs a 1-channel convolution ~50x slower than
    # these (77 ms vs ~1 ms for 8 maps of 224 x 224, benchmarks/README_patchcore.md).
    out = jnp.einsum("ih,bhw->biw", rows, maps, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("jw,biw->bij", cols, out, precision=jax.lax.Precision.HIGHEST)
