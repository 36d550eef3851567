"""Batching shared by every method: which examples make batch ``step``, and batched inference.

A training batch is a pure function of ``(seed, step)``: the example stream is the concatenation
of per-epoch permutations (epoch ``e`` uses ``np.random.default_rng([seed, e])``), batch ``step``
takes positions ``[step * B, (step + 1) * B)`` of it, and a method's per-example augmentation
gets its own ``np.random.default_rng([seed, step, i])``. So batches are deterministic and a run
resumes exactly from a checkpointed step. The loop builds the next batch on a host thread while
the device runs the current step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from wdam_jax.progress import Progress


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


def part_indices(
    step: int, *, num_examples: int, batch_size: int, seed: int, part: int = 0, parts: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Part ``part`` of ``parts`` of batch ``step``: ``(positions in the batch, example indices)``,
    both ``[batch_size / parts]`` int64 (the contiguous block ``part`` of :func:`batch_indices`).

    Raises:
      ValueError: ``batch_size`` is not divisible by ``parts`` (the number of processes).
    """
    if batch_size % parts or not 0 <= part < parts:
        raise ValueError(
            f"train.batch_size={batch_size} cannot be split into {parts} equal parts (one per "
            f"process; this is part {part}): use a batch size divisible by the process count."
        )
    size = batch_size // parts
    positions = np.arange(part * size, (part + 1) * size)
    idx = batch_indices(step, num_examples=num_examples, batch_size=batch_size, seed=seed)
    return positions, idx[positions]


def map_batches(
    fn: Callable[[np.ndarray], Sequence[np.ndarray] | np.ndarray],
    images: np.ndarray,
    *,
    batch_size: int,
    progress: Progress | None = None,
) -> tuple[np.ndarray, ...]:
    """Applies ``fn`` to ``images [N, ...]`` in batches of exactly ``batch_size`` (the last one
    padded by repeating its last image, so a jitted ``fn`` compiles once) and concatenates its
    outputs without the padding.

    Args:
      fn: ``[batch_size, ...] -> array or tuple of arrays``, each ``[batch_size, ...]``.
      images: the inputs.
      batch_size: rows per call.
      progress: optional reporter, updated with the number of images done.

    Returns:
      A tuple of ``[N, ...]`` numpy arrays, one per output of ``fn``.
    """
    if len(images) == 0:
        raise ValueError("map_batches: no images.")
    outputs: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out = fn(chunk)
        out = (out,) if not isinstance(out, tuple | list) else out
        if not outputs:
            outputs = [[] for _ in out]
        for acc, o in zip(outputs, out, strict=True):
            acc.append(np.asarray(o)[: batch_size - pad])
        if progress is not None:
            progress.update(min(start + batch_size, len(images)))
    return tuple(np.concatenate(acc) for acc in outputs)
