"""One scoring path per method: a pure function of ``(args, images)`` run in fixed-size batches.

A method describes its scoring once, as a :class:`Scorer`; evaluation, prediction, validation
curves and export all go through it (:meth:`wdam_jax.methods.base.Method.score` and
``inference_fn``), so "the exported model scores as the evaluated one" holds by construction.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wdam_jax.data.pipeline import map_batches


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A method's scoring: ``fn(args, images [B, S, S, 3]) -> (image_scores [B], maps [B, S, S])``.

    Attributes:
      fn: pure and traceable, with a symbolic ``B`` too (export). The same object for the same
        network structure and settings (build it with an ``lru_cache``d function), so that it
        compiles once per input shape however often a run is scored (validation curves).
      args: the arrays it reads (the model's state, fitted statistics), a pytree.
    """

    fn: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    args: Any

    def inference_fn(self) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
        """``images -> (image_scores, maps)`` with ``args`` closed over (for ``jax.export``)."""
        return functools.partial(self.fn, self.args)

    def __call__(self, images: np.ndarray, *, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """``fn`` compiled, over ``images [N, S, S, 3]`` in padded batches of ``batch_size``."""
        compiled = _compiled(self.fn)
        scores, maps = map_batches(
            lambda chunk: jax.device_get(compiled(self.args, chunk)),
            np.asarray(images, np.float32),
            batch_size=batch_size,
        )
        return scores, maps


@functools.lru_cache(maxsize=32)
def _compiled(fn: Callable) -> Callable:
    return jax.jit(fn)


@functools.lru_cache(maxsize=8)
def _forward(graphdef, names: tuple[str, ...]):
    """One compiled inference forward per (network structure, feature names)."""

    @jax.jit
    def forward(state, x):
        out = nnx.merge(graphdef, state, copy=True)(x, train=False)
        return tuple(out[k].astype(jnp.float32) for k in names)

    return forward


def extract_features(
    model: nnx.Module, images: np.ndarray, *, names: Sequence[str], batch_size: int
) -> dict[str, np.ndarray]:
    """The named features of ``images`` ``[N, S, S, 3]`` in inference mode, in padded batches of
    ``batch_size`` (:func:`~wdam_jax.data.pipeline.map_batches`; one compile per shape)."""
    names = tuple(names)
    graphdef, state = nnx.split(model)
    forward = _forward(graphdef, names)
    values = map_batches(
        lambda chunk: jax.device_get(forward(state, chunk)), images, batch_size=batch_size
    )
    return dict(zip(names, values, strict=True))


def fill_untrained(model: nnx.Module, value: float) -> None:
    """Sets every variable outside the train state (not ``nnx.Param`` / ``nnx.BatchStat``: WDAM
    gates and diagnostics) to ``value``: an abstract model (``nnx.eval_shape``) needs them
    concrete, since checkpoints restore only the train state."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and not isinstance(var, nnx.Param | nnx.BatchStat):
            current = var.get_value()
            var.set_value(jnp.full(current.shape, value, current.dtype))
