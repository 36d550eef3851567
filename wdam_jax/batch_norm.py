"""BatchNorm statistics re-estimated over a dataset with the weights frozen ("precise BN").

A network trained for few steps, or whose weights still move fast, has running statistics that
are an exponential average of the last ~10 batches (momentum 0.9) taken under *older* weights,
so in inference mode it does not compute what it computed in training mode
(``docs/cutpaste_demo_diagnosis.md``: pooled-feature std 38.5 in inference mode vs 0.37 in
training mode at initialisation). The standard remedy (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021; fvcore's ``update_bn_stats``) is to recompute every BatchNorm layer's mean and
variance as the average over many batches of the statistics the training-mode forward computes,
with the weights frozen, and to use those in inference mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PREFIX = "batch_stats:"  # key prefix of re-estimated statistics inside a method's ``Fitted``


@functools.lru_cache(maxsize=8)
def _batch_statistics(graphdef, call: Callable):
    """One compiled training-mode forward per (network, call) returning each BatchNorm's
    statistics of that batch (momentum 0 makes the running statistic the batch's)."""

    @jax.jit
    def stats(state, x):
        model = nnx.merge(graphdef, state, copy=True)
        call(model, x)
        return nnx.state(model, nnx.BatchStat)

    return stats


def _zero_momentum(model: nnx.Module) -> nnx.Module:
    model = nnx.clone(model)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            node.momentum = 0.0
    return model


def precise_batch_stats(
    model: nnx.Module,
    batches: Iterable[np.ndarray],
    *,
    call: Callable[[nnx.Module, jax.Array], object],
) -> dict[str, np.ndarray]:
    """Every BatchNorm's population mean and variance over ``batches``, weights frozen.

    For each batch the training-mode forward (``call(model, x)``, which must run the network with
    ``train=True``) normalises with that batch's statistics, as in training; the returned mean is
    the average of the batch means and the variance the average of ``E[x^2]`` minus the squared
    mean, so the result is the statistic of all the batches' rows together (batches of equal
    size). ``model`` is not changed.

    Args:
      model: the network (any ``nnx.Module`` with ``nnx.BatchNorm`` layers).
      batches: ``[B, ...]`` inputs, all of one shape (one compile).
      call: the training-mode forward, e.g. ``lambda m, x: m(x, train=True)``; a module-level
        function or a cached one, so its compile is reused.

    Returns:
      ``{PREFIX + "path.to.bn.mean": [C], ...}`` float32, for :func:`apply_batch_stats`.
    """
    frozen = _zero_momentum(model)
    graphdef, state = nnx.split(frozen)
    stats_fn = _batch_statistics(graphdef, call)
    first, second, count = None, None, 0
    for x in batches:
        flat = {
            ".".join(map(str, path)): np.asarray(v.get_value(), np.float64)
            for path, v in nnx.to_flat_state(stats_fn(state, jnp.asarray(x)))
        }
        if first is None:
            first = {k: np.zeros_like(v) for k, v in flat.items() if k.endswith("mean")}
            second = {k: np.zeros_like(v) for k, v in flat.items() if k.endswith("mean")}
        for key in first:
            mean, var = flat[key], flat[key[: -len("mean")] + "var"]
            first[key] += mean
            second[key] += var + mean**2
        count += 1
    if not count:
        raise ValueError("precise_batch_stats needs at least one batch.")
    out = {}
    for key, total in first.items():
        mean = total / count
        var = np.maximum(second[key] / count - mean**2, 0.0)
        out[PREFIX + key] = mean.astype(np.float32)
        out[PREFIX + key[: -len("mean")] + "var"] = var.astype(np.float32)
    return out


def apply_batch_stats(model: nnx.Module, fitted: Mapping[str, np.ndarray]) -> nnx.Module:
    """A copy of ``model`` whose BatchNorm statistics are the ones of
    :func:`precise_batch_stats` found in ``fitted`` (``model`` itself if there are none)."""
    stats = {k[len(PREFIX) :]: v for k, v in fitted.items() if k.startswith(PREFIX)}
    if not stats:
        return model
    model = nnx.clone(model)
    flat = nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
    names = {".".join(map(str, path)) for path, _ in flat}
    if names != set(stats):
        missing, extra = sorted(names - set(stats))[:3], sorted(set(stats) - names)[:3]
        raise ValueError(
            f"The fitted BatchNorm statistics do not match the network (missing {missing}, "
            f"unknown {extra}): they were fitted on another architecture; refit them."
        )
    for path, var in flat:
        value = var.get_value()
        var.set_value(jnp.asarray(stats[".".join(map(str, path))], value.dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model
