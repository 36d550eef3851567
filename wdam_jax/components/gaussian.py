"""Gaussian densities of normal features: the Ledoit-Wolf fit (numpy, float64) and the
Mahalanobis distance in ``jax.numpy`` that every score path uses (CutPaste's image score and
pixel map; PaDiM's reading of it).

The fit is host work done once per run; the distance runs inside the jitted scoring function,
as ``||(x - mean) W||`` with ``W W^T = precision`` (:func:`whiten`): a sum of squares, so float32
keeps ~1e-6 relative precision where the quadratic form would cancel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit-Wolf shrinkage intensity of centred samples (Ledoit & Wolf, 2004).

    The same estimator as ``sklearn.covariance.ledoit_wolf_shrinkage``:
    ``shrunk = (1 - s) * S + s * mu * I`` with ``S`` the empirical covariance and
    ``mu = trace(S) / D``.

    Args:
      x: ``[N, D]`` samples, already centred.

    Returns:
      The shrinkage ``s`` in [0, 1].
    """
    x = np.asarray(x, np.float64)
    n, d = x.shape
    x2 = x**2
    trace_terms = x2.sum(axis=0) / n
    mu = trace_terms.sum() / d
    beta_ = np.sum(x2.T @ x2)
    delta_ = np.sum((x.T @ x) ** 2) / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * trace_terms.sum() + d * mu**2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """A Gaussian density: ``mean`` ``[..., D]`` (broadcast over locations) and ``precision``
    ``[D, D]``."""

    mean: np.ndarray
    precision: np.ndarray

    def mahalanobis(self, x: np.ndarray) -> np.ndarray:
        """``sqrt((x - mean)^T P (x - mean))`` over the last axis: ``[..., D] -> [...]``."""
        centred = np.asarray(x, np.float64) - self.mean
        sq = np.einsum("...i,ij,...j->...", centred, self.precision, centred)
        return np.sqrt(np.maximum(sq, 0.0))


def fit_gaussian(x: np.ndarray, *, location_axes: Sequence[int] = ()) -> Gaussian:
    """Fits a Gaussian with Ledoit-Wolf shrinkage covariance.

    Args:
      x: ``[N, ..., D]`` normal features.
      location_axes: axes of ``x`` (after the first) that keep their own mean, e.g. ``(1, 2)``
        for ``[N, h, w, D]`` feature maps; the covariance is pooled over samples and locations.

    Returns:
      The :class:`Gaussian`; ``mean`` has shape ``[D]`` or ``[h, w, D]``.
    """
    x = np.asarray(x, np.float64)
    keep = set(location_axes)
    reduce_axes = tuple(a for a in range(x.ndim - 1) if a not in keep)
    mean = x.mean(axis=reduce_axes, keepdims=True)
    centred = (x - mean).reshape(-1, x.shape[-1])
    s = ledoit_wolf_shrinkage(centred)
    emp = centred.T @ centred / centred.shape[0]
    mu = np.trace(emp) / emp.shape[0]
    cov = (1.0 - s) * emp + s * mu * np.eye(emp.shape[0])
    return Gaussian(mean=mean.reshape(mean.shape[len(reduce_axes) :]), precision=_pinvh(cov))


def _pinvh(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    keep = w > w.max() * cov.shape[0] * np.finfo(np.float64).eps
    return (v[:, keep] / w[keep]) @ v[:, keep].T


def whiten(mean: np.ndarray, precision: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``(mean, W)`` as float32 with ``W W^T = precision`` (eigendecomposition in float64).

    Args:
      mean: ``[..., D]``; precision: ``[D, D]`` symmetric positive semi-definite.

    Returns:
      ``mean`` and ``W`` ``[D, D]`` for :func:`mahalanobis`.
    """
    w, v = np.linalg.eigh(np.asarray(precision, np.float64))
    factor = v * np.sqrt(np.maximum(w, 0.0))
    return jnp.asarray(mean, jnp.float32), jnp.asarray(factor, jnp.float32)


def mahalanobis(x: jax.Array, mean: jax.Array, factor: jax.Array) -> jax.Array:
    """``sqrt((x - mean)^T P (x - mean))`` over the last axis, ``[..., D] -> [...]``, with
    ``(mean, factor)`` from :func:`whiten` (``mean`` broadcast over the leading axes)."""
    y = jnp.matmul(x - mean, factor, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.sum(jnp.square(y), axis=-1))
