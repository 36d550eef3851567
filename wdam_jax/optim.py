"""Optimiser helpers shared by methods (kept apart from the loop so methods never import it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class StagedState(NamedTuple):
    count: jax.Array
    inner: tuple[optax.OptState, ...]


def staged(
    transforms: Sequence[optax.GradientTransformation], boundaries: Sequence[int]
) -> optax.GradientTransformation:
    """Runs ``transforms[i]`` for steps in ``[boundaries[i-1], boundaries[i])``.

    Each transform keeps its own state and its own step count, which only advances while it is
    active, so a schedule inside it counts from its stage's first step (e.g. an Adam stage after
    an SGD stage starts with fresh moments and bias correction, as a newly created optimiser).
    One compiled step serves every stage (``lax.switch`` on the step).

    Args:
      transforms: one transformation per stage.
      boundaries: ``len(transforms) - 1`` non-decreasing steps where the next stage starts; an
        empty stage (equal boundaries) is skipped.
    """
    if len(boundaries) != len(transforms) - 1 or list(boundaries) != sorted(boundaries):
        raise ValueError(f"staged: need {len(transforms) - 1} sorted boundaries, got {boundaries}")
    bounds = np.asarray(boundaries, np.int32)

    def init(params):
        return StagedState(jnp.zeros([], jnp.int32), tuple(t.init(params) for t in transforms))

    def update(updates, state, params=None):
        index = jnp.searchsorted(jnp.asarray(bounds), state.count, side="right")

        def branch(i):
            def run(operand):
                grads, inner = operand
                out, new = transforms[i].update(grads, inner[i], params)
                return out, (*inner[:i], new, *inner[i + 1 :])

            return run

        branches = [branch(i) for i in range(len(transforms))]
        out, inner = jax.lax.switch(index, branches, (updates, state.inner))
        return out, StagedState(state.count + 1, inner)

    return optax.GradientTransformation(init, update)
