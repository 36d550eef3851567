"""The train state of a run and the models built from it: what the loop trains and what a
restored run holds (:mod:`wdam_jax.train`, :mod:`wdam_jax.runs`).

The state is the pytree ``{"params", "batch_stats", "opt_state", "step", "rng"}``; the model's
other variables (e.g. WDAM's ``SubbandWeights`` diagnostic) are kept out of it, the gradients and
the checkpoints. Runs are data parallel over a 1-D ``Mesh`` named ``data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from wdam_jax import distributed
from wdam_jax.methods.base import Method

State = dict[str, Any]

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: every device of every process,
    ordered by process, so each process's devices hold one contiguous block of the batch)."""
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def split_model(model: nnx.Module):
    """``(graphdef, params, batch_stats, rest)``; ``rest`` (diagnostics) is never trained."""
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


def init_state(method: Method, config: ml_collections.ConfigDict, *, abstract: bool = False):
    """Builds the model and the train state at step 0 (``abstract``: shapes only, to restore into).

    Returns:
      ``(graphdef, rest, tx, state)``: the model's structure, its non-trained variables, the
      optimiser, and the state pytree ``{"params", "batch_stats", "opt_state", "step", "rng"}``.
    """
    model = method.create_model(abstract=abstract)
    graphdef, params, batch_stats, rest = split_model(model)
    tx = method.optimizer()
    state = {
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": jax.eval_shape(tx.init, params) if abstract else tx.init(params),
        "step": jnp.zeros([], jnp.int32),
        "rng": jax.random.key_data(jax.random.key(config.seed)),
    }
    return graphdef, rest, tx, state


def model_from_state(graphdef, rest, state: State) -> nnx.Module:
    """The model holding ``state``'s parameters and batch statistics (on this process's first
    device in a multi-host run, for host-side work: validation, fitting, scoring)."""
    state = distributed.local_copy(state)
    return nnx.merge(graphdef, state["params"], state["batch_stats"], rest, copy=True)
