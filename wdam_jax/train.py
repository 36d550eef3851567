"""The one training loop every method plugs into (DESIGN.md, "Decisions").

A method (``wdam_jax.methods.*``) contributes four things through :class:`Method`: its model, its
optimiser, a batch builder that is a pure function of ``(config.seed, step)``, and a loss. This
module owns everything else:

- the train state ``{"params", "batch_stats", "opt_state", "step", "rng"}``, a pytree of arrays;
- a jit-compiled train step with the state donated and the step number folded into the RNG key;
- data parallelism over all local devices with ``jax.sharding``: a 1-D ``Mesh`` named ``data``,
  the batch sharded along its first axis, the state replicated. BatchNorm statistics are then
  computed over the global batch, so 1 and N devices train the same model;
- a non-finite loss stops the run with an error naming the step (the last checkpoint is kept);
- one orbax ``CheckpointManager`` per workdir (``<workdir>/checkpoints``) holding the whole state;
  since batch ``s`` depends only on ``(seed, s)``, the data position is the step and a re-run of
  the same command resumes exactly;
- TensorBoard scalars (``<workdir>/tensorboard``) and a progress line with rate and ETA.

Variables other than parameters and batch statistics (e.g. WDAM's ``SubbandWeights`` diagnostic)
are kept out of the state, the gradients and the checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import json
import logging as std_logging
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Batch = dict[str, np.ndarray]
State = dict[str, Any]

CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
CONFIG_FILE = "config.json"
DATA_AXIS = "data"

# Method name (``config.method``) -> "module:class".
METHODS = {"cutpaste": "wdam_jax.methods.cutpaste:CutPaste"}


class Method(Protocol):
    """What a method gives the training loop. Built as ``cls(config)``.

    Attributes:
      total_steps: number of train steps of the run.
    """

    total_steps: int

    def create_model(self, *, abstract: bool = False) -> nnx.Module:
        """The model at step 0 (initialised from ``config.seed``); shapes only if ``abstract``.

        Variables other than ``nnx.Param`` / ``nnx.BatchStat`` must be concrete either way."""

    def optimizer(self) -> optax.GradientTransformation:
        """The optimiser over the model's ``nnx.Param`` state, schedules included."""

    def batch(self, step: int) -> Batch:
        """Batch ``step``: name -> ``[B, ...]`` numpy arrays, a pure function of (seed, step)."""

    def loss(
        self, model: nnx.Module, batch: Mapping[str, jax.Array], *, step: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and scalar metrics of one batch, the model in training mode (traced)."""


def get_method(config: ml_collections.ConfigDict) -> Method:
    """Builds the method named by ``config.method``."""
    if config.method not in METHODS:
        raise ValueError(
            f"config.method={config.method!r} is not one of {sorted(METHODS)}; fix the config."
        )
    module, name = METHODS[config.method].split(":")
    return getattr(importlib.import_module(module), name)(config)


# --------------------------------------------------------------------------------------------
# Optimiser helper shared by methods with training stages.


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


# --------------------------------------------------------------------------------------------
# State, step, sharding.


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
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


def train_step(graphdef, rest, loss_fn, tx, state: State, batch: Mapping[str, jax.Array]):
    """One optimisation step (pure; jit it with the state donated).

    Args:
      graphdef, rest: from :func:`split_model`.
      loss_fn: ``Method.loss``.
      tx: the optimiser.
      state: the train state.
      batch: name -> ``[B, ...]`` arrays.

    Returns:
      ``(new_state, metrics)``; metrics hold ``loss``, ``grad_norm`` and the method's own.
    """
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)

    def objective(params, batch_stats):
        model = nnx.merge(graphdef, params, batch_stats, rest, copy=True)
        loss, metrics = loss_fn(model, batch, step=step, key=key)
        return loss, (metrics, nnx.state(model, nnx.BatchStat))

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (metrics, batch_stats)), grads = grad_fn(state["params"], state["batch_stats"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {
        "params": optax.apply_updates(state["params"], updates),
        "batch_stats": batch_stats,
        "opt_state": opt_state,
        "step": step + 1,
        "rng": state["rng"],
    }
    return new_state, {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}


def compile_train_step(graphdef, rest, loss_fn, tx, mesh: Mesh) -> Callable:
    """:func:`train_step` under ``jax.jit``: state replicated and donated, batch sharded."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return jax.jit(
        functools.partial(train_step, graphdef, rest, loss_fn, tx),
        in_shardings=(replicated, sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def shard_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split along its first axis."""
    n = mesh.devices.size
    sizes = {k: v.shape[0] for k, v in batch.items()}
    bad = {k: s for k, s in sizes.items() if s % n}
    if bad:
        raise ValueError(
            f"Batch sizes {bad} are not divisible by the {n} devices; change train.batch_size "
            "or run on fewer devices."
        )
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def model_from_state(graphdef, rest, state: State) -> nnx.Module:
    """The model holding ``state``'s parameters and batch statistics."""
    return nnx.merge(graphdef, state["params"], state["batch_stats"], rest, copy=True)


# --------------------------------------------------------------------------------------------
# Checkpoints and the workdir.


def checkpoint_manager(
    workdir: str | pathlib.Path, *, max_to_keep: int | None = None
) -> ocp.CheckpointManager:
    """The workdir's one CheckpointManager (synchronous: the state's buffers are donated)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def _abstract(state: State, sharding) -> State:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def restore_state(
    manager: ocp.CheckpointManager, state: State, *, step: int | None = None, mesh: Mesh
) -> State:
    """Restores the checkpoint at ``step`` (default: newest) into ``state``'s structure."""
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"No checkpoint at step {step} in {manager.directory}; available: "
            f"{sorted(manager.all_steps())}."
        )
    target = _abstract(state, NamedSharding(mesh, PartitionSpec()))
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Records the run's config in the workdir (read back by :func:`read_config`).

    A workdir that already holds a different config keeps it and the difference is logged: the
    resumed run uses the config given now.
    """
    path = workdir / CONFIG_FILE
    text = config.to_json(indent=2, sort_keys=True)
    if path.is_file() and path.read_text() != text:
        old = _flatten(json.loads(path.read_text()))
        new = _flatten(json.loads(text))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        logging.warning("Config differs from the one recorded in %s in: %s", path, diff)
    path.write_text(text)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config recorded by :func:`train_and_evaluate` in ``workdir`` (lists back as tuples)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a training workdir (run python -m launch.train "
            "--config=... --workdir=... first)."
        )

    def tuples(v):
        if isinstance(v, list):
            return tuple(tuples(x) for x in v)
        if isinstance(v, dict):
            return {k: tuples(x) for k, x in v.items()}
        return v

    return ml_collections.ConfigDict(tuples(json.loads(path.read_text())))


def restore_model(
    workdir: str | pathlib.Path,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    method: Method | None = None,
) -> tuple[nnx.Module, Method, int]:
    """The model of a workdir's newest (or ``step``'s) checkpoint.

    Args:
      workdir: a training workdir.
      step: checkpoint step (default: newest).
      config: the run's config (default: the one recorded in the workdir).
      method: an already built method for ``config`` (reuses its loaded data).

    Returns:
      ``(model, method, step)``.
    """
    config = read_config(workdir) if config is None else config
    method = get_method(config) if method is None else method
    manager = checkpoint_manager(workdir)
    graphdef, rest, _, state = init_state(method, config, abstract=True)
    state = restore_state(manager, state, step=step, mesh=data_mesh())
    manager.close()
    return model_from_state(graphdef, rest, state), method, int(state["step"])


def restore_backbone(workdir: str | pathlib.Path, *, step: int | None = None):
    """The WideResNet50-2 backbone (with WDAM where trained) of a CutPaste run's checkpoint.

    Returns:
      A :class:`wdam_jax.models.wide_resnet.WideResNet50_2` (``num_classes=None``) whose WDAMs
      are the plain modules; a checkpoint taken before WDAM entered training has them removed.
    """
    model, method, restored = restore_model(workdir, step=step)
    if not hasattr(method, "backbone_at"):
        raise ValueError(f"{workdir} is a {type(method).__name__} run, which has no backbone.")
    return method.backbone_at(model, restored)


# --------------------------------------------------------------------------------------------
# Logging.


class _DropOrbaxInfo(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax() -> None:
    """Hides orbax's per-save INFO lines (a dozen per checkpoint) from the absl log."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
        handler.addFilter(_DropOrbaxInfo())


class _Progress:
    """Rate and ETA over the steps run in this process (the first, compiling, step excluded)."""

    def __init__(self, first_step: int, total_steps: int, images_per_step: int):
        self.total = total_steps
        self.images = images_per_step
        self.start_step, self.start_time = first_step, None

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        now = time.perf_counter()
        if self.start_time is None:
            self.start_step, self.start_time = step, now
        done = step - self.start_step
        rate = done / (now - self.start_time) if done else float("nan")
        eta = (self.total - step) / rate if done else float("nan")
        shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
        eta_text = "?" if math.isnan(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        return (
            f"step {step}/{self.total} {shown} | {rate:.3g} steps/s, "
            f"{rate * self.images:.3g} img/s, ETA {eta_text}"
        )


class _Summaries:
    """TensorBoard scalars, written as raw ``Summary`` protos through ``tf.summary`` (works
    without the ``tensorboard`` package; TF sees no GPU)."""

    def __init__(self, logdir: pathlib.Path):
        from tensorflow.core.framework import summary_pb2

        from wdam_jax.data.tf_setup import import_tensorflow

        self._tf = import_tensorflow()
        self._proto = summary_pb2.Summary
        self._writer = self._tf.summary.create_file_writer(str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        summary = self._proto(
            value=[self._proto.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
        )
        with self._writer.as_default():
            self._tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# --------------------------------------------------------------------------------------------
# The loop.


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    stop_at: int | None = None,
    method: Method | None = None,
) -> tuple[nnx.Module, State]:
    """Trains ``config``'s method in ``workdir``, resuming from its newest checkpoint.

    Args:
      config: the experiment config (``config.method``, ``config.seed``, ``config.train.*``).
      workdir: output folder (checkpoints, TensorBoard logs, config.json).
      stop_at: stop after this step (as an interruption would; a later call resumes).
      method: an already built method (default: ``get_method(config)``).

    Returns:
      ``(model, state)`` at the last step run.

    Raises:
      FloatingPointError: the loss became NaN or infinite.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(config, workdir)
    method = get_method(config) if method is None else method
    mesh = data_mesh()
    manager = checkpoint_manager(workdir, max_to_keep=config.train.keep_checkpoints)
    resuming = manager.latest_step() is not None
    graphdef, rest, tx, state = init_state(method, config, abstract=resuming)
    if resuming:
        state = restore_state(manager, state, mesh=mesh)
        logging.info("Resuming from step %d of %s.", int(state["step"]), manager.directory)
    else:
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    first = int(state["step"])
    last = method.total_steps if stop_at is None else min(stop_at, method.total_steps)
    step_fn = compile_train_step(graphdef, rest, method.loss, tx, mesh)
    summaries = _Summaries(workdir / TENSORBOARD_DIR)
    progress = None
    eval_every = config.train.get("eval_every", 0) if hasattr(method, "validate") else 0
    if eval_every and first == 0 and first < last:  # the untrained network: the curves' baseline
        values = method.validate(model_from_state(graphdef, rest, state), step=0)
        summaries.scalars(0, values)
        logging.info("validate at step 0: %s", values)
    # One batch is built ahead on a host thread while the device runs the current step.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(method.batch, first) if first < last else None
        for step in range(first, last):
            batch = pending.result()
            if progress is None:
                progress = _Progress(step, method.total_steps, len(next(iter(batch.values()))))
            pending = pool.submit(method.batch, step + 1) if step + 1 < last else None
            state, metrics = step_fn(state, shard_batch(batch, mesh))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            done = step + 1
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"Non-finite loss {metrics['loss']} at step {step} (grad norm "
                    f"{metrics['grad_norm']:.3g}); the run stopped and the checkpoint at step "
                    f"{manager.latest_step()} in {manager.directory} is kept. Try a lower learning "
                    "rate for this stage (config.train.stage*_lr), float32 (config.model.dtype), "
                    "or check the input images for NaNs."
                )
            if done % config.train.log_every == 0 or done == last or step == first:
                summaries.scalars(done, metrics)
                logging.info("%s", progress.line(done, metrics))
            if eval_every and (done % eval_every == 0 or done == last):
                values = method.validate(model_from_state(graphdef, rest, state), step=done)
                summaries.scalars(done, values)
                logging.info("validate at step %d: %s", done, values)
            if done % config.train.checkpoint_every == 0 or done == last:
                manager.save(done, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    manager.close()
    summaries.close()
    return model_from_state(graphdef, rest, state), state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
    """Trains (or resumes) and then evaluates the final checkpoint (``launch/train.py``).

    Returns:
      The metrics: ``{category: {"i_auroc", "p_auroc", "pro"}}``.
    """
    from wdam_jax import evaluate

    method = get_method(config)
    train(config, workdir, method=method)
    return evaluate.evaluate(config, workdir, method=method)
