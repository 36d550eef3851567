"""An exact k=1 nearest-neighbour search over a PatchCore memory bank that skips most of it.

Brute force (:func:`wdam_jax.methods.patchcore.knn_search`) runs at the speed of its matrix
product, so only doing less work makes it faster. Coreset rows of CNN features lie near a
low-dimensional subspace and in clusters; a proven lower bound on the distance lets the search
skip the rows that cannot be nearest and still return the brute-force answer.

The bound. Let ``V`` be ``[D, d]`` orthonormal columns (the bank's top ``d`` principal
directions), ``c`` the bank mean, ``p(y) = V^T (y - c)`` a row's code and
``r(y) = ||(I - V V^T)(y - c)||`` its distance from the subspace. For a query ``q`` and row ``x``,
with ``u = q - x``, Pythagoras gives ``||u||^2 = ||V^T u||^2 + ||(I - V V^T) u||^2``; the first
term is ``||p(q) - p(x)||^2`` and, by the reverse triangle inequality, the second is at least
``(r(q) - r(x))^2``. So ``LB(q, x) = ||p(q) - p(x)||^2 + (r(q) - r(x))^2 <= ||q - x||^2``.

Build (:meth:`PrunedBank.build`, once per fitted bank): centre, take ``d`` principal directions
(from at most 16,384 rows; any orthonormal ``V`` keeps the bound valid, better ones prune more),
compute every row's code and residual norm, and order the rows into blocks of 128 by a PCA tree
(each node split at a multiple of 128 rows along its own top direction), so a block is compact.

Search (:meth:`PrunedBank.knn_search`, k=1), for query chunks of 128 (queries sorted by the
block centroid nearest their code, so a chunk's queries want the same blocks):

1. an upper bound ``U``: the exact distance to the lowest-bound row of the query's home block;
2. bounds, coarse then fine: a block's ball bound (its codes lie within a radius of its centroid,
   its residual norms in a range: ``relu(||p(q) - centroid|| - radius)^2 + relu(gap to the
   range)^2 <= LB`` of each of its rows) keeps the blocks that may hold a row within the
   threshold of step 3, then ``LB`` for every row of the kept blocks (``d / D`` of brute force's
   multiply-adds per row, scanned in segments: memory ``O(chunk x segment)``); a block's bound
   is its rows' minimum;
3. a block is needed if its bound is ``<= U (1 + rtol) + atol (||q - c||^2 + max ||x - c||^2)``;
   the margin covers float32 rounding of the bounds and of brute force's norm expansion (whose
   error scales with the norms, not the distance); the chunk scans the union of its queries'
   needed blocks (static shapes: padded to one of a few sizes, each compiled once);
4. exact squared distances on the scanned rows by the same norm expansion as brute force, the
   minimum, and among equal minima the lowest original index (brute force's tie rule).

A chunk whose union exceeds half the bank (a bank without structure) falls back to brute force
itself for its queries, and once three quarters of at least 8 chunks have, the remaining queries
skip the bounds too; :attr:`PrunedBank.last_stats` counts them and the fraction scanned.
k > 1 (the reweighting's ``N_b(m*)``, a handful of queries) and row lookups use the bank as is.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from wdam_jax.methods import patchcore as pc

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_HIGHEST = lax.Precision.HIGHEST
_BIG_INDEX = np.iinfo(np.int32).max
BLOCK = 128
INDEX_KEYS = ("center", "directions", "codes", "residual", "order")


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------


@jax.jit
def _codes(rows: Array, center: Array, directions: Array) -> tuple[Array, Array]:
    """``(codes [N, d], residual norms [N])`` of rows; the residual as an explicit vector, so
    its norm keeps float32 accuracy for rows close to the subspace (no ``||x||^2 - ||p||^2``)."""
    centred = jnp.asarray(rows, jnp.float32) - center
    codes = jnp.matmul(centred, directions, precision=_HIGHEST)
    residual = centred - jnp.matmul(codes, directions.T, precision=_HIGHEST)
    return codes, jnp.sqrt(jnp.sum(residual * residual, axis=1))


def _chunked_codes(rows, center, directions, *, chunk: int = 8192) -> tuple[np.ndarray, ...]:
    parts = [_codes(jnp.asarray(rows[s : s + chunk]), center, directions)
             for s in range(0, rows.shape[0], chunk)]  # fmt: skip
    return tuple(np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(2))


def principal_directions(
    bank: Array, center: Array, dim: int, *, max_rows: int = 16384
) -> np.ndarray:
    """``[D, dim]`` float32 orthonormal top principal directions of ``bank`` ``[M, D]`` about
    ``center`` (from a strided subsample of at most ``max_rows`` rows, so no centred copy of a
    large bank is made; eigenvectors of the float64 covariance)."""
    stride = max(1, -(-bank.shape[0] // max_rows))
    sample = np.asarray(bank[::stride] - center, np.float32)
    cov = np.matmul(sample.T, sample).astype(np.float64)
    _, vectors = np.linalg.eigh(cov)
    return np.ascontiguousarray(vectors[:, ::-1][:, :dim], np.float32)


def tree_order(codes: np.ndarray, *, block: int = BLOCK) -> np.ndarray:
    """A row order whose consecutive ``block``-row groups are compact (a PCA tree).

    Each node of ``n`` rows is split along the top principal direction of its codes so that the
    left part holds ``block * floor(ceil(n / block) / 2)`` rows; only the last block is partial.

    Args:
      codes: ``[N, d]``.
      block: leaf size.

    Returns:
      ``[N]`` int32 permutation.
    """
    order = np.arange(codes.shape[0])
    stack = [(0, codes.shape[0])]
    while stack:
        lo, hi = stack.pop()
        n = hi - lo
        if n <= block:
            continue
        sub = codes[order[lo:hi]].astype(np.float32)
        sub = sub - sub.mean(axis=0)
        _, vectors = np.linalg.eigh(np.matmul(sub.T, sub).astype(np.float64))
        proj = sub @ vectors[:, -1].astype(np.float32)
        split = block * (-(-n // block) // 2)
        part = np.argpartition(proj, split - 1)
        order[lo:hi] = order[lo:hi][part]
        stack += [(lo, lo + split), (lo + split, hi)]
    return order.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Search kernels
# --------------------------------------------------------------------------------------------


@jax.jit
def _query_codes(
    queries: Array, center: Array, directions: Array, centroids: Array
) -> tuple[Array, Array, Array]:
    """Codes ``[Q, d]``, residual norms ``[Q]`` and nearest block centroid ``[Q]`` of queries."""
    codes, residual = _codes(queries, center, directions)
    d2 = jnp.sum(centroids * centroids, axis=1)[None, :] - 2.0 * jnp.matmul(
        codes, centroids.T, precision=_HIGHEST
    )
    return codes, residual, jnp.argmin(d2, axis=1).astype(jnp.int32)


def _slack(queries: Array, center: Array, max_sqnorm: Array, atol: Array) -> Array:
    """The absolute margin ``atol (||q - c||^2 + max ||x - c||^2)`` ``[Qc]`` of step 3."""
    centred = queries - center
    return atol * (jnp.sum(centred * centred, axis=1) + max_sqnorm)


@jax.jit
def _ball_blocks(
    queries: Array,
    q_codes: Array,
    q_residual: Array,
    home: Array,
    bank: Array,
    center: Array,
    codes: Array,
    residual: Array,
    sorted_rows: Array,
    balls: tuple[Array, Array, Array, Array],
    max_sqnorm: Array,
    rtol: Array,
    atol: Array,
) -> tuple[Array, Array]:
    """Steps 1 and 2 (coarse) for one query chunk: ``(blocks a ball bound keeps [blocks] bool,
    the upper bound [Qc])``.

    The upper bound is the exact distance to the lowest-bound row of the query's home block (the
    centroid nearest its code). A block's ball bound: its rows' codes lie within ``radius`` of the
    block centroid and their residual norms in ``[r_lo, r_hi]``, so for every row
    ``LB >= relu(||p(q) - centroid|| - radius)^2 + relu(r_lo - r(q), r(q) - r_hi)^2``; the
    centroid distance is lowered by 1e-3 of the norms first (its own rounding).
    """
    centroids, radius, r_lo, r_hi = balls
    pos = home[:, None] * BLOCK + jnp.arange(BLOCK, dtype=jnp.int32)[None]  # [Qc, BLOCK]
    c, r = codes[pos], residual[pos]
    lb = jnp.sum(jnp.square(c - q_codes[:, None, :]), axis=2) + jnp.square(q_residual[:, None] - r)
    rows = jnp.take_along_axis(sorted_rows[pos], jnp.argmin(lb, axis=1)[:, None], axis=1)[:, 0]
    exact = jnp.sum(jnp.square(bank[jnp.maximum(rows, 0)] - queries), axis=1)
    upper = jnp.where(rows >= 0, exact, jnp.inf)
    threshold = upper * (1.0 + rtol) + _slack(queries, center, max_sqnorm, atol)
    q_sq = jnp.sum(q_codes * q_codes, axis=1)
    c_sq = jnp.sum(centroids * centroids, axis=1)
    d2 = q_sq[:, None] - 2.0 * jnp.matmul(q_codes, centroids.T, precision=_HIGHEST) + c_sq[None]
    rounding = 1e-3 * jnp.sqrt(q_sq[:, None] + jnp.max(c_sq))
    gap = jnp.maximum(jnp.sqrt(jnp.maximum(d2, 0.0)) - rounding - radius[None], 0.0)
    r_gap = jnp.maximum(
        jnp.maximum(r_lo[None] - q_residual[:, None], q_residual[:, None] - r_hi[None]), 0.0
    )
    keep = jnp.square(gap) + jnp.square(r_gap) <= threshold[:, None]
    return jnp.any(keep, axis=0), upper


@partial(jax.jit, static_argnames=("segment_blocks",))
def _needed_blocks(
    queries: Array,
    q_codes: Array,
    q_residual: Array,
    upper: Array,
    blocks: Array,
    bank: Array,
    center: Array,
    codes: Array,
    residual: Array,
    sorted_rows: Array,
    max_sqnorm: Array,
    rtol: Array,
    atol: Array,
    *,
    segment_blocks: int,
) -> tuple[Array, Array]:
    """Steps 2 (fine) and 3: of ``blocks`` ``[U]`` (a multiple of ``segment_blocks``), those
    whose rows' minimum ``LB`` is within the threshold: ``(union [U] bool, needed per query
    [Qc])``. The upper bound is first lowered to the exact distance of the lowest-bound row seen.
    Scanned in segments, so memory is ``O(chunk x segment)``."""
    qc = q_codes.shape[0]
    q_sq = jnp.sum(q_codes * q_codes, axis=1)
    q_codes_m2 = -2.0 * q_codes
    within = jnp.arange(BLOCK, dtype=jnp.int32)

    def step(carry, seg):
        best_lb, best_pos = carry
        pos = (seg[:, None] * BLOCK + within[None]).reshape(-1)
        c, r = codes[pos], residual[pos]
        proj = jnp.matmul(q_codes_m2, c.T, precision=_HIGHEST) + jnp.sum(c * c, axis=1)[None]
        lb = jnp.maximum(proj + q_sq[:, None], 0.0) + jnp.square(q_residual[:, None] - r[None])
        low = jnp.min(lb, axis=1)
        at = jnp.min(jnp.where(lb <= low[:, None], pos[None], _BIG_INDEX), axis=1)
        better = low < best_lb
        carry = (jnp.where(better, low, best_lb), jnp.where(better, at, best_pos))
        return carry, jnp.min(lb.reshape(qc, segment_blocks, BLOCK), axis=2)

    init = (jnp.full((qc,), jnp.inf, jnp.float32), jnp.zeros((qc,), jnp.int32))
    (_, best_pos), block_lb = lax.scan(step, init, blocks.reshape(-1, segment_blocks))
    rows = sorted_rows[best_pos]
    exact = jnp.sum(jnp.square(bank[jnp.maximum(rows, 0)] - queries), axis=1)
    upper = jnp.minimum(upper, jnp.where(rows >= 0, exact, jnp.inf))
    threshold = upper * (1.0 + rtol) + _slack(queries, center, max_sqnorm, atol)
    need = jnp.moveaxis(block_lb, 0, 1).reshape(qc, -1) <= threshold[:, None]
    return jnp.any(need, axis=0), jnp.sum(need, axis=1)


@jax.jit
def _scan_blocks(
    queries: Array,
    blocks: Array,
    bank: Array,
    center: Array,
    bank_sqnorm: Array,
    sorted_rows: Array,
) -> tuple[Array, Array]:
    """Step 4: exact nearest row among ``blocks`` ``[U]`` (padding blocks allowed).

    Returns:
      ``(distances [Qc, 1], original indices [Qc, 1])``, as :func:`patchcore.knn_search`.
    """
    pos = (blocks[:, None] * BLOCK + jnp.arange(BLOCK, dtype=jnp.int32)[None]).reshape(-1)
    index = sorted_rows[pos]  # original row numbers, -1 for padding
    valid = index >= 0
    rows = bank[jnp.maximum(index, 0)] - center
    rows_sq = jnp.where(valid, bank_sqnorm[jnp.maximum(index, 0)], jnp.inf)
    queries = queries - center
    q_sqnorm = jnp.sum(queries * queries, axis=1)
    # The same norm expansion as brute force (``patchcore._knn_block``), so the distances agree.
    d2 = jnp.matmul(-2.0 * queries, rows.T, precision=_HIGHEST) + rows_sq[None, :]
    best = jnp.min(d2, axis=1, keepdims=True)
    original = jnp.where(valid, index, _BIG_INDEX)
    first = jnp.min(jnp.where(d2 <= best, original[None, :], _BIG_INDEX), axis=1, keepdims=True)
    return jnp.sqrt(jnp.maximum(best + q_sqnorm[:, None], 0.0)), first


def _bucket(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (each <= 1.5x the last) ``>= n``:
    few compiled scan sizes, at most a third of a scan spent on padding blocks."""
    size = 1
    while size < n:
        if size < 2:
            size = 2
        else:
            size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------


class PrunedBank:
    """A memory bank with its pruning index; a drop-in bank for :func:`patchcore.score_patches`
    (``shape``, ``knn_search``, ``take_rows``).

    Build with :meth:`build` (or :meth:`from_arrays` for saved arrays); save :meth:`arrays`.
    """

    def __init__(
        self,
        bank: ArrayLike,
        arrays: dict[str, np.ndarray],
        *,
        query_chunk: int = 128,
        rtol: float = 1e-3,
        atol: float = 1e-4,
    ):
        self.bank = jnp.asarray(bank, jnp.float32)
        num, dim = self.bank.shape
        self.shape = (num, dim)
        self.query_chunk = query_chunk
        self.rtol, self.atol = rtol, atol
        self.index_arrays = {k: np.asarray(arrays[k]) for k in INDEX_KEYS}
        # The codes are about the saved centre (queries are coded about it too); exact distances
        # use brute force's own centre and row norms (the same functions), so they agree with
        # it on this backend even where its mean rounds differently from the fitting one's.
        self.code_center = jnp.asarray(self.index_arrays["center"], jnp.float32)
        self.center = jnp.mean(self.bank, axis=0)
        self.bank_sqnorm = pc._centred_sqnorm(self.bank, self.center)
        self.max_sqnorm = jnp.max(self.bank_sqnorm)
        spread = float(jnp.sqrt(self.max_sqnorm))
        if self.code_center.shape != self.center.shape or not np.allclose(
            self.code_center, self.center, rtol=1e-4, atol=1e-5 * spread
        ):
            raise ValueError("PrunedBank: the saved index was built for another bank (centre)")
        self.directions = jnp.asarray(self.index_arrays["directions"], jnp.float32)
        order = self.index_arrays["order"].astype(np.int32)
        codes = self.index_arrays["codes"].astype(np.float32)
        residual = self.index_arrays["residual"].astype(np.float32)
        if order.shape != (num,) or codes.shape[0] != num or residual.shape != (num,):
            raise ValueError(f"PrunedBank: index arrays do not match a bank of {num} rows")
        self.num_blocks = -(-num // BLOCK)
        self.segment_blocks = min(16, self.num_blocks + 1)  # at least one padding block
        total = -(-(self.num_blocks + 1) // self.segment_blocks) * self.segment_blocks
        pad = total * BLOCK - num
        self.pad_block = self.num_blocks  # a block of padding rows only
        self.sorted_rows = jnp.asarray(np.concatenate([order, np.full(pad, -1, np.int32)]))
        self.codes = jnp.asarray(
            np.concatenate([codes, np.zeros((pad, codes.shape[1]), np.float32)])
        )
        self.residual = jnp.asarray(np.concatenate([residual, np.full(pad, np.inf, np.float32)]))
        full = np.concatenate([codes, np.zeros((self.num_blocks * BLOCK - num, codes.shape[1]))])
        counts = np.minimum(BLOCK, num - np.arange(self.num_blocks) * BLOCK)
        centroids = full.reshape(self.num_blocks, BLOCK, -1).sum(axis=1) / counts[:, None]
        self.centroids = jnp.asarray(centroids, jnp.float32)
        # Each block's ball about its float32 centroid (radius rounded up) and residual range.
        gaps = full.reshape(self.num_blocks, BLOCK, -1) - np.asarray(self.centroids)[:, None]
        real = np.arange(self.num_blocks * BLOCK).reshape(self.num_blocks, BLOCK) < num
        radius = np.where(real, np.linalg.norm(gaps, axis=2), 0.0).max(axis=1)
        res = np.concatenate([residual, np.full(self.num_blocks * BLOCK - num, np.nan)])
        res = res.reshape(self.num_blocks, BLOCK)
        self.balls = (
            self.centroids,
            jnp.asarray(np.nextafter(radius.astype(np.float32), np.float32(np.inf))),
            jnp.asarray(np.nanmin(res, axis=1), jnp.float32),
            jnp.asarray(np.nanmax(res, axis=1), jnp.float32),
        )
        self.last_stats: dict[str, float] = {}

    @classmethod
    def build(cls, bank: ArrayLike, *, dim: int = 63, **options: Any) -> PrunedBank:
        """Builds the index of ``bank`` ``[M, D]`` with ``min(dim, D)`` principal directions."""
        return cls(bank, build_arrays(bank, dim=dim), **options)

    @classmethod
    def from_arrays(cls, bank: ArrayLike, arrays: dict[str, np.ndarray], **options: Any):
        """The index saved by :meth:`arrays` (``arrays`` holds :data:`INDEX_KEYS`)."""
        return cls(bank, arrays, **options)

    def arrays(self) -> dict[str, np.ndarray]:
        """What to save beside the bank (:data:`INDEX_KEYS`)."""
        return dict(self.index_arrays)

    def take_rows(self, index: ArrayLike) -> Array:
        return self.bank[jnp.asarray(index, jnp.int32)]

    def knn_search(self, queries: ArrayLike, *, k: int = 1) -> tuple[Array, Array]:
        """:func:`patchcore.knn_search`'s answer: pruned for ``k == 1``, brute force otherwise.

        Args:
          queries: ``[Q, D]``.
          k: number of neighbours.

        Returns:
          ``(distances [Q, k] float32, indices [Q, k] int32)``.
        """
        if k != 1:
            return pc.knn_search(self.bank, queries, k=k)
        queries = np.asarray(queries, np.float32)
        num_q = queries.shape[0]
        if num_q == 0:
            return jnp.zeros((0, 1), jnp.float32), jnp.zeros((0, 1), jnp.int32)
        q_codes, q_res, home = [], [], []
        for s in range(0, num_q, 4096):
            c, r, h = _query_codes(
                jnp.asarray(queries[s : s + 4096]),
                self.code_center,
                self.directions,
                self.centroids,
            )
            q_codes.append(np.asarray(c))
            q_res.append(np.asarray(r))
            home.append(np.asarray(h))
        q_codes, q_res = np.concatenate(q_codes), np.concatenate(q_res)
        home = np.concatenate(home)
        perm = np.argsort(home, kind="stable")
        qc = self.query_chunk
        out_d = np.zeros((num_q, 1), np.float32)
        out_i = np.zeros((num_q, 1), np.int32)
        fallback: list[np.ndarray] = []
        scanned = needed = 0
        rtol, atol = jnp.float32(self.rtol), jnp.float32(self.atol)
        bounded = fallback_chunks = bounded_blocks = 0
        for s in range(0, num_q, qc):
            ids = perm[s : s + qc]
            chunks = s // qc
            if chunks >= 8 and fallback_chunks > 0.75 * chunks:  # no structure: stop bounding
                fallback.append(perm[s:])
                scanned += (num_q - s) * self.num_blocks
                break
            # A short last chunk repeats its last query: same shape, no extra blocks needed.
            ids_padded = np.concatenate([ids, np.full(qc - len(ids), ids[-1])])
            chunk = jnp.asarray(queries[ids_padded])
            q_codes_c = jnp.asarray(q_codes[ids_padded])
            q_res_c = jnp.asarray(q_res[ids_padded])
            keep, upper = _ball_blocks(
                chunk, q_codes_c, q_res_c, jnp.asarray(home[ids_padded]), self.bank,
                self.center, self.codes, self.residual, self.sorted_rows, self.balls,
                self.max_sqnorm, rtol, atol,
            )  # fmt: skip
            kept = np.flatnonzero(np.asarray(keep))
            bounded_blocks += len(ids) * len(kept)
            seg = self.segment_blocks
            kept = np.concatenate(
                [kept, np.full(-(-_bucket(len(kept)) // seg) * seg - len(kept), self.pad_block)]
            )
            union, per_query = _needed_blocks(
                chunk, q_codes_c, q_res_c, upper, jnp.asarray(kept, jnp.int32), self.bank,
                self.center, self.codes, self.residual, self.sorted_rows, self.max_sqnorm, rtol,
                atol, segment_blocks=seg,
            )  # fmt: skip
            blocks = kept[np.asarray(union)]
            blocks = blocks[blocks != self.pad_block]
            needed += int(np.asarray(per_query)[: len(ids)].sum())
            bounded += len(ids)
            size = _bucket(len(blocks))
            # Scanning more than half the bank through a gather costs about a full scan: brute
            # force itself answers these queries (below, in one call).
            if 2 * size > self.num_blocks or not len(blocks):  # (none: only by rounding)
                fallback.append(ids)
                fallback_chunks += 1
                scanned += len(ids) * self.num_blocks
                continue
            padded = np.concatenate([blocks, np.full(size - len(blocks), self.pad_block)])
            d, i = _scan_blocks(chunk, jnp.asarray(padded, jnp.int32), self.bank, self.center,
                                self.bank_sqnorm, self.sorted_rows)  # fmt: skip
            out_d[ids], out_i[ids] = np.asarray(d)[: len(ids)], np.asarray(i)[: len(ids)]
            scanned += len(ids) * size
        if fallback:
            ids = np.concatenate(fallback)
            d, i = pc.knn_search(self.bank, queries[ids], k=1)
            out_d[ids], out_i[ids] = np.asarray(d), np.asarray(i)
        self.last_stats = {
            "queries": num_q,
            "fallback_fraction": sum(map(len, fallback)) / num_q,
            "scanned_fraction": scanned / (num_q * self.num_blocks),
            # Over the queries whose bounds were computed (all but those after an early stop).
            "needed_fraction": needed / max(1, bounded * self.num_blocks),
            # Blocks whose rows' bounds were computed (those the ball bounds kept), per query.
            "bounded_fraction": bounded_blocks / max(1, bounded * self.num_blocks),
        }
        return jnp.asarray(out_d), jnp.asarray(out_i)


def build_arrays(bank: ArrayLike, *, dim: int = 63) -> dict[str, np.ndarray]:
    """The index arrays of ``bank`` ``[M, D]`` (:data:`INDEX_KEYS`).

    Returns:
      ``center [D]``, ``directions [D, d]``, and in block order ``codes [M, d]``,
      ``residual [M]`` and ``order [M]`` (the original row of each position).
    """
    bank32 = jnp.asarray(bank, jnp.float32)
    num, width = bank32.shape
    if num < 1:
        raise ValueError("PrunedBank: the bank is empty")
    center = jnp.mean(bank32, axis=0)
    directions = principal_directions(bank32, center, min(dim, width))
    codes, residual = _chunked_codes(np.asarray(bank32), center, jnp.asarray(directions))
    order = tree_order(codes)
    return {
        "center": np.asarray(center),
        "directions": directions,
        "codes": codes[order],
        "residual": residual[order],
        "order": order,
    }
