"""PatchCore's memory bank sharded over devices along its rows (``patchcore.shard_bank=True``).

A bank of ``M`` rows is split into equal contiguous blocks, one per device of a 1-D mesh named
``bank`` (``NamedSharding(mesh, P("bank", None))``; the last block padded with rows no search
can return), so its size is bounded by the devices' total memory, not one device's. The
results equal the single-device functions of :mod:`wdam_jax.methods.patchcore`: the same coreset
indices, the same neighbours, distances within float32 rounding.

- **kNN** (:meth:`ShardedBank.knn_search`): each device searches its block with the chunked
  running top-k of :func:`patchcore.knn_search`, then the ``k`` candidates of every device are
  all-gathered and merged by one more top-k. Communication per query batch: an all-gather of
  ``k`` (distance, index) pairs per query per device, ``devices x Q x k x 8`` bytes, nothing of
  the bank. :meth:`ShardedBank.take_rows` (the rows of ``m*`` and ``N_b(m*)`` for the image-score
  reweighting) is a masked all-reduce of the ``[..., D]`` rows asked for.
- **Coreset** (:func:`greedy_coreset`): the centred projection of :func:`patchcore.greedy_coreset`
  is spread over the devices the same way and the pick loop runs on all of them at once. Each
  pick is one all-reduce argmax: every device offers its farthest row (distance, global index
  and its ``proj_dim`` projection) through an all-gather, every device takes the farthest of
  those and updates its own rows' distances, ``devices x (proj_dim x 2 + 8)`` bytes per pick.
  The projection itself (``N x proj_dim``, 1/16 of float32 ``N x 1024`` features at the default
  ``proj_dim=128`` in float16) is computed as in the single-device function, then spread.

On one device both reduce to the single-device computation plus a no-op collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wdam_jax.methods import patchcore as pc

Array = jax.Array
BANK_AXIS = "bank"


def bank_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``bank`` over ``devices`` (default: this process's devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BANK_AXIS,))


def _pad_rows(x: Array, rows: int, value) -> Array:
    pad = rows - x.shape[0]
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return x if pad == 0 else jnp.pad(x, widths, constant_values=value)


def _padded_size(n: int, mesh: Mesh) -> int:
    devices = mesh.devices.size
    return -(-n // devices) * devices


class ShardedBank:
    """A memory bank ``[M, D]`` split by rows over ``mesh`` (see the module docstring).

    Attributes:
      rows: ``[M', D]`` float32, sharded ``P("bank", None)``; ``M' >= M`` rows, the padding last.
      sqnorm: ``[M']`` each row's squared norm around ``center``; ``inf`` for padding, so a
        padded row is never a neighbour.
      center: ``[D]`` the mean of the ``M`` real rows, replicated.
      shape: ``(M, D)``.
    """

    def __init__(self, bank: jax.typing.ArrayLike, mesh: Mesh):
        bank = jnp.asarray(bank, jnp.float32)
        self.mesh, self.shape = mesh, tuple(bank.shape)
        m = self.shape[0]
        rows = _padded_size(m, mesh)
        sharded = NamedSharding(mesh, PartitionSpec(BANK_AXIS))
        self.rows = jax.device_put(_pad_rows(bank, rows, 0.0), sharded)
        self.center = jax.device_put(jnp.mean(bank, axis=0), NamedSharding(mesh, PartitionSpec()))
        sqnorm = pc._centred_sqnorm(self.rows, self.center)
        self.sqnorm = jnp.where(jnp.arange(rows) < m, sqnorm, jnp.inf)

    def knn_search(
        self, queries: jax.typing.ArrayLike, *, k: int = 1, query_chunk: int = 2048,
        bank_chunk: int = 2048,
    ) -> tuple[Array, Array]:  # fmt: skip
        """:func:`patchcore.knn_search` against the sharded bank (same arguments and returns)."""
        m = self.shape[0]
        if not 1 <= k <= m:
            raise ValueError(f"knn_search: k={k} must be in [1, {m}] (the bank size)")
        search = partial(_search_jit, mesh=self.mesh, k=k, bank_chunk=bank_chunk)
        num_q = queries.shape[0]
        qc = min(query_chunk, max(num_q, 1))
        out_d, out_i = [], []
        for start in range(0, num_q, qc):
            chunk = jnp.asarray(queries[start : start + qc], jnp.float32)
            valid = chunk.shape[0]
            if valid < qc:
                chunk = jnp.pad(chunk, ((0, qc - valid), (0, 0)))
            d, i = search(self.rows, self.center, self.sqnorm, chunk)
            out_d.append(d[:valid])
            out_i.append(i[:valid])
        if not out_d:
            return jnp.zeros((0, k), jnp.float32), jnp.zeros((0, k), jnp.int32)
        return jnp.concatenate(out_d), jnp.concatenate(out_i)

    def take_rows(self, index: jax.typing.ArrayLike) -> Array:
        """``bank[index]`` ``[..., D]`` float32: each device gives the rows it holds (zeros for
        the others) and one all-reduce sums them."""
        return _take_jit(self.rows, jnp.asarray(index, jnp.int32), mesh=self.mesh)


@partial(jax.jit, static_argnames=("mesh", "k", "bank_chunk"))
def _search_jit(rows, center, sqnorm, queries, *, mesh: Mesh, k: int, bank_chunk: int):
    def local(rows, center, sqnorm, queries):
        block = rows.shape[0]
        kk = min(k, block)
        d, i = pc._knn_block(rows, center, sqnorm, queries, k=kk, bank_chunk=bank_chunk)
        i = i + lax.axis_index(BANK_AXIS) * block
        # Every device's k candidates, [Q, devices * kk] in device (= global row) order, so
        # the merge's top_k breaks ties by the lower global index as the single-device scan.
        d = lax.all_gather(d, BANK_AXIS, axis=1, tiled=True)
        i = lax.all_gather(i, BANK_AXIS, axis=1, tiled=True)
        neg, order = lax.top_k(-d, k)
        return -neg, jnp.take_along_axis(i, order, axis=1)

    spec = PartitionSpec(BANK_AXIS)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, PartitionSpec(), spec, PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )(rows, center, sqnorm, queries)


@partial(jax.jit, static_argnames=("mesh",))
def _take_jit(rows, index, *, mesh: Mesh):
    def local(rows, index):
        block = rows.shape[0]
        offset = lax.axis_index(BANK_AXIS) * block
        mine = (index >= offset) & (index < offset + block)
        got = rows[jnp.clip(index - offset, 0, block - 1)]
        return lax.psum(jnp.where(mine[..., None], got, 0.0), BANK_AXIS)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(BANK_AXIS), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,
    )(rows, index)


@partial(jax.jit, static_argnames=("mesh",), donate_argnums=(2, 3))
def _coreset_steps(proj, sqnorm, min_dist, picks, start, stop, *, mesh: Mesh):
    """:func:`patchcore._coreset_steps` with ``proj``, ``sqnorm``, ``min_dist`` row-sharded."""

    def local(proj, sqnorm, min_dist, picks, start, stop):
        block = proj.shape[0]
        offset = lax.axis_index(BANK_AXIS) * block
        rows = offset + jnp.arange(block, dtype=jnp.int32)

        def body(i, carry):
            min_dist, picks = carry
            mine = jnp.argmax(min_dist)
            # The all-reduce argmax: every device's farthest row, the farthest of those (the
            # first device among ties, i.e. the lowest global index, as jnp.argmax).
            best = lax.all_gather(min_dist[mine], BANK_AXIS)
            index = lax.all_gather(offset + mine.astype(jnp.int32), BANK_AXIS)
            row = lax.all_gather(proj[mine], BANK_AXIS)
            sq = lax.all_gather(sqnorm[mine], BANK_AXIS)
            s = jnp.argmax(best)
            j = index[s]
            dot = jnp.matmul(
                proj, row[s], precision=pc._HIGHEST, preferred_element_type=jnp.float32
            )
            d = sqnorm - 2.0 * dot + sq[s]
            min_dist = jnp.where(rows == j, -1.0, jnp.minimum(min_dist, d))
            return min_dist, picks.at[i].set(j)

        return lax.fori_loop(start, stop, body, (min_dist, picks))

    spec = PartitionSpec(BANK_AXIS)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, spec, PartitionSpec(), PartitionSpec(), PartitionSpec()),
        out_specs=(spec, PartitionSpec()),
        check_vma=False,
    )(proj, sqnorm, min_dist, picks, start, stop)


def greedy_coreset(
    key: Array,
    features: jax.typing.ArrayLike,
    n: int,
    *,
    mesh: Mesh,
    proj_dim: int = 128,
    dtype: jax.typing.DTypeLike = jnp.float16,
    steps_per_call: int = 2048,
    on_progress: Callable[[int, int], None] | None = None,
) -> Array:
    """:func:`patchcore.greedy_coreset` with the pick loop sharded by rows over ``mesh``.

    Same arguments (plus ``mesh``) and the same result: ``[n]`` int32 unique row indices in
    pick order.
    """
    proj, sqnorm, min_dist = pc.coreset_inputs(key, features, n, proj_dim=proj_dim, dtype=dtype)
    rows = _padded_size(proj.shape[0], mesh)
    sharded = NamedSharding(mesh, PartitionSpec(BANK_AXIS))
    proj = jax.device_put(_pad_rows(proj, rows, 0), sharded)
    sqnorm = jax.device_put(_pad_rows(sqnorm, rows, 0.0), sharded)
    # Padded rows are never picked: below every real row (chosen ones are -1).
    min_dist = jax.device_put(_pad_rows(min_dist, rows, -jnp.inf), sharded)
    steps = partial(_coreset_steps, mesh=mesh)
    return pc.pick_in_calls(steps, proj, sqnorm, min_dist, n, steps_per_call, on_progress)
