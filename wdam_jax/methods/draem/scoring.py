"""DRAEM's scoring (as ``test_DRAEM.py``): the softmax anomaly channel is the map, its maximum
average-pooled over ``score.pool_size`` pixels the image score; one jnp function on every path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def pooled_max(maps: jax.Array, *, pool_size: int = 21) -> jax.Array:
    """DRAEM's image score: max of ``maps`` ``[N, H, W]`` average-pooled over ``pool_size`` x
    ``pool_size`` windows, stride 1, zero padding counted in the average. Returns ``[N]``."""
    pad = pool_size // 2
    summed = jax.lax.reduce_window(
        maps, 0.0, jax.lax.add, (1, pool_size, pool_size), (1, 1, 1),
        ((0, 0), (pad, pad), (pad, pad)),
    )  # fmt: skip
    return jnp.max(summed, axis=(1, 2)) / (pool_size * pool_size)


@functools.lru_cache(maxsize=8)
def scoring_fn(graphdef, pool_size: int):
    """``(state, images) -> (image scores [N], anomaly maps [N, H, W])`` in inference mode, for a
    :class:`~wdam_jax.components.scoring.Scorer` (DRAEM scores with the network alone)."""

    def fn(state, images):
        anomaly = nnx.merge(graphdef, state, copy=True)(images, train=False)["anomaly"]
        return pooled_max(anomaly, pool_size=pool_size), anomaly

    return fn
