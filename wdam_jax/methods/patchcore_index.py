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

1. bounds: ``LB`` for every row from the codes (``d / D`` of brute force's multiply-adds,
   scanned in segments: memory ``O(chunk x segment)``); a block's bound is its rows' minimum;
2. an upper bound ``U``: the exact distance to the lowest-bound row among the query's
   ``candidates`` best blocks;
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


@partial(jax.jit, static_argnames=("segment_blocks", "candidates"))
def _needed_blocks(
    queries: Array,
    q_codes: Array,
    q_residual: Array,
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
    candidates: int,
) -> tuple[Array, Array]:
    """Steps 1-3 for one query chunk: ``(union [blocks] bool, needed blocks per query [Qc])``.

    ``codes``/``residual``/``sorted_rows`` are in block order and padded (residual ``inf``,
    row ``-1``) to a whole number of segments of ``segment_blocks`` blocks.
    """
    qc = queries.shape[0]
    seg = segment_blocks * BLOCK
    num_segments = codes.shape[0] // seg
    q_sq = jnp.sum(q_codes * q_codes, axis=1)
    q_codes_m2 = -2.0 * q_codes

    def step(_, s):
        c = lax.dynamic_slice_in_dim(codes, s * seg, seg)
        r = lax.dynamic_slice_in_dim(residual, s * seg, seg)
        proj = jnp.matmul(q_codes_m2, c.T, precision=_HIGHEST) + jnp.sum(c * c, axis=1)[None]
        lb = jnp.maximum(proj + q_sq[:, None], 0.0) + jnp.square(q_residual[:, None] - r[None])
        return None, jnp.min(lb.reshape(qc, segment_blocks, BLOCK), axis=2)

    _, block_lb = lax.scan(step, None, jnp.arange(num_segments))
    block_lb = jnp.moveaxis(block_lb, 0, 1).reshape(qc, -1)  # [Qc, blocks]
    # Upper bound: the exact distance to the lowest-bound row of each of the best few blocks
    # (their bounds recomputed here: cheaper than tracking every block's argmin in the scan).
    _, best = lax.top_k(-block_lb, candidates)
    pos = (best[..., None] * BLOCK + jnp.arange(BLOCK, dtype=jnp.int32)).reshape(qc, -1)
    c, r = codes[pos], residual[pos]  # [Qc, c * BLOCK, d], [Qc, c * BLOCK]
    lb = jnp.sum(jnp.square(c - q_codes[:, None, :]), axis=2) + jnp.square(q_residual[:, None] - r)
    rows = jnp.take_along_axis(sorted_rows[pos], jnp.argmin(lb, axis=1)[:, None], axis=1)[:, 0]
    exact = jnp.sum(jnp.square(bank[jnp.maximum(rows, 0)] - queries), axis=1)
    upper = jnp.where(rows >= 0, exact, jnp.inf)
    centred = queries - center
    slack = atol * (jnp.sum(centred * centred, axis=1) + max_sqnorm)
    need = block_lb <= (upper * (1.0 + rtol) + slack)[:, None]
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
        candidates: int = 1,
        rtol: float = 1e-3,
        atol: float = 1e-4,
    ):
        self.bank = jnp.asarray(bank, jnp.float32)
        num, dim = self.bank.shape
        self.shape = (num, dim)
        self.query_chunk, self.candidates = query_chunk, candidates
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
        self.centroids = jnp.asarray(
            full.reshape(self.num_blocks, BLOCK, -1).sum(axis=1) / counts[:, None], jnp.float32
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
        perm = np.argsort(np.concatenate(home), kind="stable")
        qc = self.query_chunk
        out_d = np.zeros((num_q, 1), np.float32)
        out_i = np.zeros((num_q, 1), np.int32)
        fallback: list[np.ndarray] = []
        scanned = needed = 0
        rtol, atol = jnp.float32(self.rtol), jnp.float32(self.atol)
        bounded = fallback_chunks = 0
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
            union, per_query = _needed_blocks(
                chunk, jnp.asarray(q_codes[ids_padded]), jnp.asarray(q_res[ids_padded]),
                self.bank, self.center, self.codes, self.residual, self.sorted_rows,
                self.max_sqnorm, rtol, atol, segment_blocks=self.segment_blocks,
                candidates=min(self.candidates, self.num_blocks),
            )  # fmt: skip
            blocks = np.flatnonzero(np.asarray(union)[: self.num_blocks])
            needed += int(np.asarray(per_query)[: len(ids)].sum())
            bounded += len(ids)
            size = _bucket(len(blocks))
            # Scanning more than half the bank through a gather costs about a full scan: brute
            # force itself answers these queries (below, in one call).
            if 2 * size > self.num_blocks:
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
