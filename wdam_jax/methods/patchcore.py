"""PatchCore (Roth et al., CVPR 2022) in ``jax.numpy``: features, coreset, kNN, scores, maps.

The paper's third integration (Sec. 4.2, Table 6). Everything here is a pure function of arrays
and explicit PRNG keys; the run (backbones, data, metrics) lives in ``wdam_jax.patchcore_run``.

Memory: the coreset never forms an ``N x N`` matrix (it keeps ``N x proj_dim`` projections and an
``N`` vector of distances), and kNN search is chunked over the bank and the queries with a running
top-k, so scoring memory is ``O(query_chunk x bank_chunk)`` whatever the bank size.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from wdam_jax.errors import MissingFileError
from wdam_jax.filters import gaussian_blur

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_HIGHEST = lax.Precision.HIGHEST

# --------------------------------------------------------------------------------------------
# Patch features
# --------------------------------------------------------------------------------------------


def adaptive_avg_pool_last(x: ArrayLike, out_dim: int) -> Array:
    """Adaptive average pooling over the last axis, bin for bin as ``torch.adaptive_avg_pool1d``.

    Bin ``i`` averages input entries ``floor(i L / out) .. ceil((i + 1) L / out) - 1``.

    Args:
      x: ``[..., L]``.
      out_dim: number of output bins.

    Returns:
      ``[..., out_dim]`` in ``x``'s dtype.
    """
    x = jnp.asarray(x)
    length = x.shape[-1]
    if length == out_dim:
        return x
    if length % out_dim == 0:
        return x.reshape(*x.shape[:-1], out_dim, length // out_dim).mean(axis=-1)
    if out_dim % length == 0:
        return jnp.repeat(x, out_dim // length, axis=-1)
    starts = (np.arange(out_dim) * length) // out_dim
    ends = -((-(np.arange(out_dim) + 1) * length) // out_dim)
    weights = np.zeros((length, out_dim), np.float32)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        weights[s:e, i] = 1.0 / (e - s)
    return jnp.matmul(x, jnp.asarray(weights, x.dtype), precision=_HIGHEST)


def local_aggregate(fmap: ArrayLike, *, patch_size: int = 3) -> Array:
    """Average each location's ``patch_size x patch_size`` neighbourhood (zero padded, stride 1).

    PatchCore's "locally aware patch features": the official code unfolds zero-padded
    ``p x p`` patches and averages them; dividing by ``p * p`` including the padding matches it.

    Args:
      fmap: ``[B, H, W, C]``.
      patch_size: odd neighbourhood size ``p``.

    Returns:
      ``[B, H, W, C]``.
    """
    fmap = jnp.asarray(fmap)
    pad = (patch_size - 1) // 2
    summed = lax.reduce_window(
        fmap,
        jnp.zeros((), fmap.dtype),
        lax.add,
        (1, patch_size, patch_size, 1),
        (1, 1, 1, 1),
        ((0, 0), (pad, patch_size - 1 - pad), (pad, patch_size - 1 - pad), (0, 0)),
    )
    return summed / (patch_size * patch_size)


def patch_features(
    layer2: ArrayLike,
    layer3: ArrayLike,
    *,
    patch_size: int = 3,
    pretrain_dim: int = 1024,
    target_dim: int = 1024,
) -> Array:
    """Locally aggregated layer2 + layer3 patch features, as PatchCore's official code.

    1. Each layer is averaged over a ``3 x 3`` neighbourhood (``local_aggregate``).
    2. layer3 is upsampled to layer2's grid (bilinear, half-pixel centres: align_corners=False).
    3. Each layer's channel vector is reduced to ``pretrain_dim`` by adaptive average pooling over
       channels (the official ``MeanMapper``), the two are concatenated and pooled again to
       ``target_dim`` (the official ``Aggregator``).

    The official code pools the flattened ``C x 3 x 3`` patch in step 3 instead of averaging the
    neighbourhood first; for layer3 (1024 -> 1024 bins of 9) the two are identical, for layer2 the
    official bins mix 4-5 of the 9 positions of one channel, here all 9 are averaged (as anomalib).

    Args:
      layer2: ``[B, h, w, C2]``.
      layer3: ``[B, h3, w3, C3]``.
      patch_size: neighbourhood size.
      pretrain_dim: common per-layer dimension.
      target_dim: final dimension ``D``.

    Returns:
      ``[B, h, w, D]`` float32.
    """
    layer2 = local_aggregate(jnp.asarray(layer2, jnp.float32), patch_size=patch_size)
    layer3 = local_aggregate(jnp.asarray(layer3, jnp.float32), patch_size=patch_size)
    b, h, w, _ = layer2.shape
    layer3 = jax.image.resize(
        layer3, (b, h, w, layer3.shape[-1]), method="bilinear", antialias=False
    )
    per_layer = [adaptive_avg_pool_last(f, pretrain_dim) for f in (layer2, layer3)]
    return adaptive_avg_pool_last(jnp.concatenate(per_layer, axis=-1), target_dim)


# --------------------------------------------------------------------------------------------
# Greedy coreset (approximate k-center)
# --------------------------------------------------------------------------------------------


def _project(features: ArrayLike, matrix: Array, *, row_chunk: int = 16384) -> Array:
    """``features @ matrix`` in row chunks, so a numpy ``features`` is never copied whole."""
    n = features.shape[0]
    if isinstance(features, jax.Array):
        return jnp.matmul(features.astype(jnp.float32), matrix, precision=_HIGHEST)
    parts = []
    for start in range(0, n, row_chunk):
        rows = jnp.asarray(np.asarray(features[start : start + row_chunk], np.float32))
        parts.append(jnp.matmul(rows, matrix, precision=_HIGHEST))
    return jnp.concatenate(parts, axis=0)


@jax.jit
def _coreset_steps(
    proj: Array, sqnorm: Array, min_dist: Array, picks: Array, start: Array, stop: Array
) -> tuple[Array, Array]:
    """Picks ``picks[start:stop]`` greedily: each time the row farthest from the chosen set."""

    def body(i, carry):
        min_dist, picks = carry
        j = jnp.argmax(min_dist).astype(jnp.int32)
        # Squared distance of every row to the new centre by norm expansion: one matvec.
        dot = jnp.matmul(proj, proj[j], precision=_HIGHEST, preferred_element_type=jnp.float32)
        d = sqnorm - 2.0 * dot + sqnorm[j]
        # Chosen rows get -1 so that argmax never returns them again (unique indices even when
        # the data has duplicate rows).
        min_dist = jnp.minimum(min_dist, d).at[j].set(-1.0)
        return min_dist, picks.at[i].set(j)

    return lax.fori_loop(start, stop, body, (min_dist, picks))


def coreset_inputs(
    key: Array,
    features: ArrayLike,
    n: int,
    *,
    proj_dim: int = 128,
    dtype: jax.typing.DTypeLike = jnp.float16,
) -> tuple[Array, Array, Array]:
    """What :func:`greedy_coreset`'s pick loop starts from (see there for the arguments).

    Returns:
      ``(proj [N, p] dtype, sqnorm [N] float32, min_dist [N] float32)``: the centred, RMS-scaled
      projection, its squared row norms, and each row's initial distance to the chosen set.
    """
    num_rows, dim = features.shape
    if not 1 <= n <= num_rows:
        raise ValueError(f"greedy_coreset: n={n} must be in [1, {num_rows}] (the number of rows)")
    key_proj, key_start = jax.random.split(key)
    if dim > proj_dim:
        matrix = jax.random.normal(key_proj, (dim, proj_dim), jnp.float32) / math.sqrt(proj_dim)
        proj = _project(features, matrix)
    else:
        proj = jnp.asarray(features, jnp.float32)
    # Centring changes no distance but shrinks the norms, so the norm expansion cancels less.
    proj = proj - jnp.mean(proj, axis=0)
    rms = jnp.sqrt(jnp.mean(jnp.square(proj)))
    proj = (proj / jnp.where(rms > 0, rms, 1.0)).astype(dtype)
    sqnorm = jnp.sum(jnp.square(proj.astype(jnp.float32)), axis=1)
    first = jax.random.randint(key_start, (), 0, num_rows, jnp.int32)
    # Every row starts "infinitely far" from the empty set; the random first centre a bit farther,
    # so that the first step (argmax) picks it.
    min_dist = jnp.where(jnp.arange(num_rows) == first, jnp.inf, jnp.finfo(jnp.float32).max)
    return proj, sqnorm, min_dist


def greedy_coreset(
    key: Array,
    features: ArrayLike,
    n: int,
    *,
    proj_dim: int = 128,
    dtype: jax.typing.DTypeLike = jnp.float16,
    steps_per_call: int = 2048,
    on_progress: Callable[[int, int], None] | None = None,
) -> Array:
    """Approximate k-center greedy coreset (PatchCore Sec. 3.2) on a random Gaussian projection.

    Rows are centred and projected to ``proj_dim`` dimensions with a Gaussian matrix
    (Johnson-Lindenstrauss), the first centre is a random row, then each step picks the row whose
    distance to its nearest chosen row is largest. Memory is ``O(N x proj_dim)``: one matvec per
    pick, never an ``N x N`` matrix. The loop is a jit-compiled ``lax.fori_loop`` run in calls of
    ``steps_per_call`` picks so that progress can be reported between calls.

    Each pick reads the whole ``[N, proj_dim]`` projection, so the loop is memory bound; the
    projection is stored in ``dtype`` (float16 by default: half the traffic of float32, products
    accumulated in float32). It is scaled to unit RMS entries first, so float16 neither overflows
    nor underflows; its rounding (~5e-4 relative) is far below the projection's own distance
    distortion (~sqrt(2 / proj_dim), 12% at 128).

    Args:
      key: PRNG key (projection and first centre).
      features: ``[N, D]`` (numpy or jax; numpy is projected in row chunks).
      n: number of rows to pick, ``1 <= n <= N``.
      proj_dim: projection dimension; features with ``D <= proj_dim`` are used unprojected.
      dtype: storage dtype of the projection (``jnp.float32`` for exact projected distances).
      steps_per_call: picks per jit call (progress granularity; does not change the result).
      on_progress: called as ``on_progress(picked, n)`` after each call.

    Returns:
      ``[n]`` int32 unique row indices, in pick order.
    """
    inputs = coreset_inputs(key, features, n, proj_dim=proj_dim, dtype=dtype)
    return pick_in_calls(_coreset_steps, *inputs, n, steps_per_call, on_progress)


def pick_in_calls(
    steps: Callable, proj: Array, sqnorm: Array, min_dist: Array, n: int, steps_per_call: int,
    on_progress: Callable[[int, int], None] | None,
) -> Array:  # fmt: skip
    """Runs the pick loop ``steps`` (:func:`_coreset_steps` or a sharded one) ``steps_per_call``
    picks at a time, reporting progress between calls; returns the ``[n]`` picks."""
    picks = jnp.zeros((n,), jnp.int32)
    done = 0
    while done < n:
        stop = min(n, done + steps_per_call)
        min_dist, picks = steps(proj, sqnorm, min_dist, picks, jnp.int32(done), jnp.int32(stop))
        done = stop
        if on_progress is not None:
            picks.block_until_ready()
            on_progress(done, n)
    return picks


def coverage_radius(
    features: ArrayLike, selected: ArrayLike, *, query_chunk: int = 4096, bank_chunk: int = 2048
) -> float:
    """Coverage radius ``max_i min_j ||x_i - x_selected_j||`` (the k-center objective).

    Args:
      features: ``[N, D]``.
      selected: ``[n]`` row indices.
      query_chunk: rows per query chunk of the kNN search.
      bank_chunk: rows per bank chunk of the kNN search.

    Returns:
      The radius as a Python float.
    """
    bank = jnp.asarray(np.asarray(features)[np.asarray(selected)], jnp.float32)
    dist, _ = knn_search(bank, features, k=1, query_chunk=query_chunk, bank_chunk=bank_chunk)
    return float(jnp.max(dist))


# --------------------------------------------------------------------------------------------
# kNN search
# --------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("k", "bank_chunk"))
def _knn_block(
    bank: Array, center: Array, bank_sqnorm: Array, queries: Array, *, k: int, bank_chunk: int
) -> tuple[Array, Array]:
    """Exact k smallest squared distances of ``queries`` to ``bank``, scanning bank chunks.

    ``center`` (the bank mean) is subtracted from every row and query first: distances do not
    change, but the norms shrink, so the norm expansion loses less to cancellation.
    """
    num_bank = bank.shape[0]
    m = min(bank_chunk, num_bank)
    num_chunks = -(-num_bank // m)
    queries = queries - center
    q_sqnorm = jnp.sum(queries * queries, axis=1)
    # ||q||^2 is the same for every bank row, so the scan ranks ||b||^2 - 2 q.b and adds it at
    # the end; the -2 is folded into the queries once instead of scaling every product.
    queries_m2 = -2.0 * queries

    def step(carry, chunk):
        best_d, best_i = carry
        nominal = chunk * m
        # The last chunk is shifted back to stay in bounds; rows it shares with the previous
        # chunk are masked so that no row is counted twice.
        start = jnp.minimum(nominal, num_bank - m)
        rows = lax.dynamic_slice_in_dim(bank, start, m) - center
        rows_sq = lax.dynamic_slice_in_dim(bank_sqnorm, start, m)
        d2 = jnp.matmul(queries_m2, rows.T, precision=_HIGHEST) + rows_sq[None, :]
        index = start + jnp.arange(m, dtype=jnp.int32)
        d2 = jnp.where(index[None, :] < nominal, jnp.inf, d2)
        if k == 1:
            # Two plain reductions (the minimum, then the first index reaching it) instead of
            # argmin's paired value/index reduction, which XLA:CPU runs several times slower
            # than the matmul it follows (measured in benchmarks/README_patchcore.md).
            cand_d = jnp.min(d2, axis=1, keepdims=True)
            first = jnp.where(d2 <= cand_d, index[None, :], jnp.iinfo(jnp.int32).max)
            cand_i = jnp.min(first, axis=1, keepdims=True)
            better = cand_d < best_d
            return (jnp.where(better, cand_d, best_d), jnp.where(better, cand_i, best_i)), None
        neg, j = lax.top_k(-d2, min(k, m))
        all_d = jnp.concatenate([best_d, -neg], axis=1)
        all_i = jnp.concatenate([best_i, index[j]], axis=1)
        neg, order = lax.top_k(-all_d, k)
        return (-neg, jnp.take_along_axis(all_i, order, axis=1)), None

    init = (
        jnp.full((queries.shape[0], k), jnp.inf, jnp.float32),
        jnp.full((queries.shape[0], k), -1, jnp.int32),
    )
    (best_d, best_i), _ = lax.scan(step, init, jnp.arange(num_chunks, dtype=jnp.int32))
    return jnp.sqrt(jnp.maximum(best_d + q_sqnorm[:, None], 0.0)), best_i


@jax.jit
def _centred_sqnorm(bank: Array, center: Array) -> Array:
    """``||b - center||^2`` per row; jit fuses the subtraction so no centred bank copy is made."""
    return jnp.sum(jnp.square(bank - center), axis=1)


def knn_search(
    bank: ArrayLike,
    queries: ArrayLike,
    *,
    k: int = 1,
    query_chunk: int = 2048,
    bank_chunk: int = 1024,
) -> tuple[Array, Array]:
    """Exact Euclidean k nearest bank rows of each query, chunked over queries and bank.

    Distances use the norm expansion ``||q||^2 - 2 q.b + ||b||^2``, clamped at 0 before the square
    root; a running top-k over bank chunks (``lax.scan``) and a Python loop over query chunks keep
    memory at ``O(query_chunk x bank_chunk)`` on top of the bank.

    Args:
      bank: ``[M, D]``.
      queries: ``[Q, D]`` (numpy or jax; moved to the device one chunk at a time).
      k: number of neighbours, ``1 <= k <= M``.
      query_chunk: at most this many queries per jit call (rounded up to a multiple of 8); the
        queries are split into equal chunks, the last one zero padded by the few rows left.
      bank_chunk: bank rows per scan step (1024 measured fastest on a 2-core CPU among 256 to
        8192, by 5 to 10 % over 2048; see ``benchmarks/README_patchcore.md``).

    Returns:
      ``(distances [Q, k] float32 ascending, indices [Q, k] int32)``.
    """
    bank = jnp.asarray(bank, jnp.float32)
    num_bank = bank.shape[0]
    if not 1 <= k <= num_bank:
        raise ValueError(f"knn_search: k={k} must be in [1, {num_bank}] (the bank size)")
    center = jnp.mean(bank, axis=0)
    bank_sqnorm = _centred_sqnorm(bank, center)
    num_q = queries.shape[0]
    # Equal chunks (rounded up to a multiple of 8) rather than full ones and a padded remainder:
    # 6272 queries (8 images of 28 x 28 patches) run as 4 x 1568, not 4 x 2048 with 1920 rows of
    # padding (23 % of the multiply-adds wasted).
    num_chunks = max(1, -(-num_q // query_chunk))
    per_chunk = -(-num_q // num_chunks)
    qc = max(1, min(num_q, (per_chunk + 7) // 8 * 8))
    out_d, out_i = [], []
    for start in range(0, num_q, qc):
        chunk = queries[start : start + qc]
        valid = chunk.shape[0]
        chunk = jnp.asarray(chunk, jnp.float32)
        if valid < qc:
            chunk = jnp.pad(chunk, ((0, qc - valid), (0, 0)))
        d, i = _knn_block(bank, center, bank_sqnorm, chunk, k=k, bank_chunk=bank_chunk)
        out_d.append(d[:valid])
        out_i.append(i[:valid])
    if not out_d:
        return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
    return jnp.concatenate(out_d), jnp.concatenate(out_i)


def knn_scores(bank: ArrayLike, queries: ArrayLike, *, k: int = 1) -> Array:
    """Euclidean distances of each query to its ``k`` nearest bank rows (see ``knn_search``).

    Args:
      bank: ``[M, D]``.
      queries: ``[Q, D]``.
      k: number of neighbours.

    Returns:
      ``[Q, k]`` float32, ascending along the last axis.
    """
    return knn_search(bank, queries, k=k)[0]


# --------------------------------------------------------------------------------------------
# Scores and maps
# --------------------------------------------------------------------------------------------


def _bank_search(bank, queries: ArrayLike, *, k: int) -> tuple[Array, Array]:
    """:func:`knn_search` on a bank array, or a sharded bank's own search."""
    search = getattr(bank, "knn_search", None)
    return search(queries, k=k) if search else knn_search(bank, queries, k=k)


def _bank_rows(bank, index: Array) -> Array:
    """``bank[index]`` (float32) of a bank array or a sharded bank."""
    take_rows = getattr(bank, "take_rows", None)
    return take_rows(index) if take_rows else jnp.asarray(bank, jnp.float32)[index]


def reweighted_image_scores(
    bank: ArrayLike,
    patch_feats: ArrayLike,
    patch_dists: ArrayLike,
    nn_index: ArrayLike,
    *,
    num_neighbors: int = 9,
) -> Array:
    """PatchCore image score ``s = w s*`` with its reweighting (Roth et al. 2022, Sec. 3.3).

    1. ``m_test,*`` is the test patch with the largest distance to the bank; ``s*`` that distance.
    2. ``m*`` is its nearest bank entry.
    3. ``N_b(m*)``: the ``b`` nearest bank entries of ``m*`` (``m*`` itself among them).
    4. ``w = 1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||``, computed as a
       softmax with the maximum subtracted, so large distances do not overflow.

    With ``b = 1`` the weight is degenerate (always 0) and ``s*`` is returned, as anomalib does.

    Args:
      bank: ``[M, D]`` memory bank, or a row-sharded one
        (:class:`wdam_jax.methods.patchcore_sharded.ShardedBank`).
      patch_feats: ``[B, L, D]`` test patch features.
      patch_dists: ``[B, L]`` distance of each patch to its nearest bank entry.
      nn_index: ``[B, L]`` index of that entry.
      num_neighbors: ``b``.

    Returns:
      ``[B]`` image scores.
    """
    patch_feats = jnp.asarray(patch_feats, jnp.float32)
    patch_dists = jnp.asarray(patch_dists, jnp.float32)
    nn_index = jnp.asarray(nn_index, jnp.int32)
    batch = jnp.arange(patch_dists.shape[0])
    worst = jnp.argmax(patch_dists, axis=1)
    s_star = patch_dists[batch, worst]  # s* in the paper
    b = min(num_neighbors, bank.shape[0])
    if b == 1:
        return s_star
    m_test = patch_feats[batch, worst]  # m_test,* in the paper, [B, D]
    m_star = _bank_rows(bank, nn_index[batch, worst])  # m* in the paper, [B, D]
    _, support = _bank_search(bank, m_star, k=b)  # N_b(m*), [B, b]
    d_support = jnp.linalg.norm(m_test[:, None, :] - _bank_rows(bank, support), axis=-1)
    log_denominator = jax.nn.logsumexp(d_support, axis=1)
    weight = 1.0 - jnp.exp(s_star - log_denominator)
    return weight * s_star


def anomaly_maps(
    patch_scores: ArrayLike, *, image_size: tuple[int, int], sigma: float = 4.0
) -> Array:
    """Patch scores upsampled (bilinear) to the input size and Gaussian-smoothed.

    Args:
      patch_scores: ``[B, h, w]``.
      image_size: ``(H, W)`` of the input.
      sigma: Gaussian standard deviation in input pixels (PatchCore: 4).

    Returns:
      ``[B, H, W]`` float32.
    """
    patch_scores = jnp.asarray(patch_scores, jnp.float32)
    up = jax.image.resize(
        patch_scores, (patch_scores.shape[0], *image_size), method="bilinear", antialias=False
    )
    return gaussian_blur(up, sigma=sigma)


# How patch distances become scores (``config.patchcore.scoring``):
# - "official": patchcore-inspection (the paper's "official PatchCore implementation"): faiss
#   ``IndexFlatL2`` returns SQUARED L2 distances, ``PatchMaker.score`` takes the image's maximum
#   patch score, and the maps are made from the same squared distances;
# - "anomalib": anomalib's ``PatchcoreModel``: Euclidean distances, the reweighted image score
#   ``w s*`` (``num_neighbors`` = b), maps from the Euclidean distances.
SCORINGS = ("official", "anomalib")


def patch_scores(dist: ArrayLike, *, scoring: str) -> Array:
    """Per-patch anomaly scores from the Euclidean nearest-bank distances.

    Args:
      dist: ``[...]`` Euclidean distance of each patch to its nearest bank row.
      scoring: one of :data:`SCORINGS`.

    Returns:
      ``[...]``: ``dist ** 2`` for "official" (faiss's squared L2), ``dist`` for "anomalib".
    """
    dist = jnp.asarray(dist, jnp.float32)
    if scoring == "official":
        return jnp.square(dist)
    if scoring == "anomalib":
        return dist
    raise ValueError(f"PatchCore scoring={scoring!r}: use one of {', '.join(SCORINGS)}.")


def score_patches(
    bank: ArrayLike,
    feats: ArrayLike,
    *,
    image_size: tuple[int, int],
    scoring: str = "official",
    num_neighbors: int = 9,
    sigma: float = 4.0,
) -> tuple[Array, Array]:
    """Image scores and anomaly maps of images given their patch features.

    "official": image score = max over patches of the squared distance, maps from squared
    distances; "anomalib": the reweighted score (:func:`reweighted_image_scores`) on Euclidean
    distances, maps from Euclidean distances (see :data:`SCORINGS`).

    Args:
      bank: ``[M, D]`` memory bank, or a row-sharded one
        (:class:`wdam_jax.methods.patchcore_sharded.ShardedBank`).
      feats: ``[B, h, w, D]`` patch features of the test images.
      image_size: ``(H, W)`` of the maps.
      scoring: one of :data:`SCORINGS`.
      num_neighbors: ``b`` of the reweighting ("anomalib" only).
      sigma: map smoothing.

    Returns:
      ``(image_scores [B], maps [B, H, W])``.
    """
    feats = jnp.asarray(feats, jnp.float32)
    b, h, w, d = feats.shape
    flat = feats.reshape(b * h * w, d)
    dist, index = _bank_search(bank, flat, k=1)
    dist = dist[:, 0].reshape(b, h * w)
    index = index[:, 0].reshape(b, h * w)
    patch = patch_scores(dist, scoring=scoring)
    if scoring == "official":
        scores = jnp.max(patch, axis=1)
    else:
        scores = reweighted_image_scores(
            bank, flat.reshape(b, h * w, d), dist, index, num_neighbors=num_neighbors
        )
    maps = anomaly_maps(patch.reshape(b, h, w), image_size=image_size, sigma=sigma)
    return scores, maps


# --------------------------------------------------------------------------------------------
# Memory bank on disk
# --------------------------------------------------------------------------------------------


def save_bank(path: str | pathlib.Path, bank: ArrayLike, **meta: Any) -> pathlib.Path:
    """Writes a memory bank and its metadata (numbers, strings, small arrays) to an ``.npz``.

    Args:
      path: file to write (``.npz`` is appended by numpy if missing).
      bank: ``[M, D]``.
      **meta: extra arrays / scalars stored beside the bank (e.g. normalisation statistics).

    Returns:
      The path written.
    """
    path = pathlib.Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"meta_{k}": np.asarray(v) for k, v in meta.items()}
    np.savez(path, bank=np.asarray(bank, np.float32), **arrays)
    return path


def load_bank(path: str | pathlib.Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Reads a memory bank written by ``save_bank``.

    Args:
      path: the ``.npz`` file.

    Returns:
      ``(bank [M, D] float32, meta)`` with 0-d metadata arrays turned back into Python scalars.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(
            f"PatchCore memory bank {path} not found: fit first (python -m launch.patchcore "
            "--config=... --workdir=<the same workdir>)."
        )
    with np.load(path) as data:
        bank = data["bank"]
        meta = {
            k.removeprefix("meta_"): (data[k].item() if data[k].ndim == 0 else data[k])
            for k in data.files
            if k.startswith("meta_")
        }
    return bank, meta


# --------------------------------------------------------------------------------------------
# Ensemble
# --------------------------------------------------------------------------------------------


def normalisation_stats(image_scores: ArrayLike, maps: ArrayLike) -> dict[str, float]:
    """Mean and standard deviation of one member's scores on normal (training) images.

    Args:
      image_scores: ``[N]`` image scores of normal images.
      maps: ``[N, H, W]`` their anomaly maps.

    Returns:
      ``{"image_mean", "image_std", "pixel_mean", "pixel_std"}``.
    """
    image_scores = np.asarray(image_scores, np.float64)
    maps = np.asarray(maps, np.float64)
    return {
        "image_mean": float(image_scores.mean()),
        "image_std": float(image_scores.std()),
        "pixel_mean": float(maps.mean()),
        "pixel_std": float(maps.std()),
    }


def ensemble_scores(
    members: list[tuple[ArrayLike, ArrayLike]],
    stats: list[Mapping[str, float]],
    *,
    eps: float = 1e-6,
) -> tuple[Array, Array]:
    """Average of the members' scores after standardising each by its normal-image statistics.

    Each member's image scores become ``(s - image_mean) / image_std`` and its maps
    ``(m - pixel_mean) / pixel_std``, with statistics from ``normalisation_stats`` on normal
    training images, so the members' different feature scales weigh equally and no test label or
    test statistic is used. (The official PatchCore ensemble min-max normalises over the test set
    instead.) The normal images are training images, some of whose patches are in the bank, so
    their scores understate normal variation; they still put the members on one scale, which is
    all the average needs. A standard deviation below ``eps`` is replaced by 1.

    Args:
      members: ``[(image_scores [N], maps [N, H, W]), ...]``, one pair per member.
      stats: one ``normalisation_stats`` dict per member.
      eps: smallest standard deviation used as a divisor.

    Returns:
      ``(image_scores [N], maps [N, H, W])``.
    """
    if len(members) != len(stats) or not members:
        raise ValueError("ensemble_scores: one stats dict per member, at least one member")

    def std(value: float) -> float:
        return value if value > eps else 1.0

    images = [
        (jnp.asarray(s) - st["image_mean"]) / std(st["image_std"])
        for (s, _), st in zip(members, stats, strict=True)
    ]
    maps = [
        (jnp.asarray(m) - st["pixel_mean"]) / std(st["pixel_std"])
        for (_, m), st in zip(members, stats, strict=True)
    ]
    return jnp.mean(jnp.stack(images), axis=0), jnp.mean(jnp.stack(maps), axis=0)


def minmax_ensemble_scores(members: list[tuple[ArrayLike, ArrayLike]]) -> tuple[Array, Array]:
    """The official PatchCore ensemble: each member min-max normalised over the evaluated set.

    As ``run_patchcore.py`` of patchcore-inspection: a member's image scores become
    ``(s - min s) / (max s - min s)`` with min and max over the N evaluated images, its maps
    ``(m - min m) / (max m - min m)`` with min and max over every pixel of the N maps; the
    members are then averaged. The result depends on which images are evaluated together (the
    test split, in ``launch.evaluate``): a protocol for reproducing published tables, not a
    deployable scorer (use :func:`ensemble_scores` for that). A member whose scores are all equal
    (max = min) contributes zeros.

    Args:
      members: ``[(image_scores [N], maps [N, H, W]), ...]``, one pair per member.

    Returns:
      ``(image_scores [N], maps [N, H, W])``, each in [0, 1].
    """
    if not members:
        raise ValueError("minmax_ensemble_scores: at least one member")

    def minmax(x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        lo, hi = jnp.min(x), jnp.max(x)
        return jnp.where(hi > lo, (x - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)

    images = jnp.stack([minmax(s) for s, _ in members])
    maps = jnp.stack([minmax(m) for _, m in members])
    return jnp.mean(images, axis=0), jnp.mean(maps, axis=0)
