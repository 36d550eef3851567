"""``tf.data`` input pipelines yielding numpy batches for the jit-compiled steps.

A batch is a pure function of ``(seed, step)``: the example stream is the concatenation of
per-epoch permutations (epoch ``e`` uses ``np.random.default_rng([seed, e])``), batch ``step``
takes positions ``[step * B, (step + 1) * B)`` of it, and a per-example augmentation gets its own
``np.random.default_rng([seed, step, i])``. So the pipeline is deterministic, can run its map in
parallel without changing results, and resumes exactly from a checkpointed step (``start_step``).
``tf.data`` supplies the background prefetching; TF sees no GPU (see ``tf_setup``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np

from wdam_jax.data.tf_setup import import_tensorflow

Batch = dict[str, np.ndarray]
MapFn = Callable[[np.random.Generator, dict[str, np.ndarray]], dict[str, np.ndarray]]


def batch_indices(
    step: int, *, num_examples: int, batch_size: int, seed: int, shuffle: bool = True
) -> np.ndarray:
    """Example indices of batch ``step`` ([batch_size] int64), crossing epochs as needed."""
    start = step * batch_size
    positions = np.arange(start, start + batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        order = (
            np.random.default_rng([seed, int(e)]).permutation(num_examples)
            if shuffle
            else np.arange(num_examples)
        )
        sel = epochs == e
        out[sel] = order[offsets[sel]]
    return out


def make_batch(
    arrays: Mapping[str, np.ndarray],
    step: int,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    map_fn: MapFn | None = None,
) -> Batch:
    """Batch ``step`` as a dict of numpy arrays (the function every pipeline step runs).

    Args:
      arrays: name -> [N, ...] arrays sharing N.
      step: batch number, >= 0.
      batch_size: B.
      seed: pipeline seed.
      shuffle: permute each epoch; False walks the examples in order.
      map_fn: optional ``(rng, example) -> example`` applied per example (augmentation), with
        ``rng = default_rng([seed, step, i])``; it must return the same keys, shapes and dtypes
        every time.

    Returns:
      name -> [B, ...] arrays.
    """
    n = _num_examples(arrays)
    idx = batch_indices(step, num_examples=n, batch_size=batch_size, seed=seed, shuffle=shuffle)
    return _gather(arrays, idx, seed=seed, step=step, map_fn=map_fn)


def _gather(
    arrays: Mapping[str, np.ndarray],
    idx: np.ndarray,
    *,
    seed: int,
    step: int,
    map_fn: MapFn | None,
) -> Batch:
    batch = {k: np.asarray(v)[idx] for k, v in arrays.items()}
    if map_fn is None:
        return batch
    examples = [
        map_fn(np.random.default_rng([seed, step, i]), {k: v[i] for k, v in batch.items()})
        for i in range(len(idx))
    ]
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def _num_examples(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {k: len(v) for k, v in arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must be non-empty and share their first dimension: {sizes}")
    return next(iter(sizes.values()))


def numpy_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
    map_fn: MapFn | None = None,
    start_step: int = 0,
    num_parallel_calls: int | None = None,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Iterator of numpy batches from in-memory arrays through ``tf.data``.

    Args:
      arrays: name -> [N, ...] arrays sharing N.
      batch_size: B.
      seed: pipeline seed; the same seed gives the same batches.
      shuffle: permute each epoch.
      repeat: endless stream; otherwise one epoch.
      drop_remainder: without ``repeat``, drop the last partial batch (else yield it smaller).
      map_fn: per-example augmentation ``(rng, example) -> example`` (see :func:`make_batch`).
      start_step: first batch number (resume from a checkpoint at this step).
      num_parallel_calls: batches built in parallel (default: AUTOTUNE); order is kept.
      prefetch: batches prefetched.

    Yields:
      name -> [B, ...] numpy arrays.
    """
    tf = import_tensorflow()
    n = _num_examples(arrays)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if repeat:
        stop = None
    else:
        stop = n // batch_size if drop_remainder else -(-n // batch_size)
        if stop == 0:
            raise ValueError(f"batch_size {batch_size} > {n} examples with drop_remainder=True")
    # Shapes and dtypes of a batch, from step 0 (cheap: one batch).
    probe = make_batch(arrays, 0, batch_size=batch_size, seed=seed, shuffle=shuffle, map_fn=map_fn)
    keys = sorted(probe)

    def build(step):
        step = int(step)
        if stop is not None and (step + 1) * batch_size > n:
            # The final, partial batch of a one-epoch pipeline: the rest of epoch 0.
            order = np.random.default_rng([seed, 0]).permutation(n) if shuffle else np.arange(n)
            b = _gather(arrays, order[step * batch_size :], seed=seed, step=step, map_fn=map_fn)
        else:
            b = make_batch(
                arrays, step, batch_size=batch_size, seed=seed, shuffle=shuffle, map_fn=map_fn
            )
        return [b[k] for k in keys]

    def to_tensors(step):
        outs = tf.numpy_function(build, [step], [tf.as_dtype(probe[k].dtype) for k in keys])
        for o, k in zip(outs, keys, strict=True):
            o.set_shape([None, *probe[k].shape[1:]])
        return dict(zip(keys, outs, strict=True))

    if stop is None:
        steps = tf.data.Dataset.counter(start=start_step)
    else:
        steps = tf.data.Dataset.range(start_step, stop)
    ds = steps.map(
        to_tensors,
        num_parallel_calls=num_parallel_calls or tf.data.AUTOTUNE,
        deterministic=True,
    ).prefetch(prefetch)
    return ds.as_numpy_iterator()
