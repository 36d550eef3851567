"""The one training loop every method plugs into (the contract: :mod:`wdam_jax.methods.base`).

A method contributes its model, optimiser, batches, loss, and optionally periodic validation and
fitted statistics. This module owns everything else:

- the train state ``{"params", "batch_stats", "opt_state", "step", "rng"}``, a pytree of arrays;
- a jit-compiled train step with the state donated and the step number folded into the RNG key;
- data parallelism over all devices with ``jax.sharding``: a 1-D ``Mesh`` named ``data``, the
  batch sharded along its first axis, the state replicated. BatchNorm statistics are then
  computed over the global batch, so 1 and N devices train the same model. With several
  processes (hosts, :mod:`wdam_jax.distributed`) the mesh spans all of them and each process
  builds only its part of the batch;
- a non-finite loss stops the run with an error naming the step (the last checkpoint is kept);
- checkpoints (:mod:`wdam_jax.checkpoints`): since batch ``s`` depends only on ``(seed, s)``, the
  data position is the step and a re-run of the same command resumes exactly. After the last
  step the method's ``fit`` runs and its statistics are saved with the final checkpoint
  (without the optimiser state if ``config.train.save_final_params_only``);
- one writer per run: the run folder's lock (:mod:`wdam_jax.runlock`) is held from the config
  check to the last save, so a second trainer on the workdir is refused, naming this one;
- ``method.validate`` every ``config.train.eval_every`` steps;
- TensorBoard scalars (``<workdir>/tensorboard``), the same scalars as JSON lines
  (``<workdir>/train_log.jsonl``, read by the learning-curve figure), and a progress line with
  rate and ETA.

Variables other than parameters and batch statistics (e.g. WDAM's ``SubbandWeights`` diagnostic)
are kept out of the state, the gradients and the checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import pathlib
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wdam_jax import checkpoints, distributed, runlock, runs
from wdam_jax.data import summary as data_summary
from wdam_jax.errors import InputsError
from wdam_jax.methods.base import Fitted, Method
from wdam_jax.methods.registry import get_method
from wdam_jax.progress import Progress
from wdam_jax.runs import DATA_SUMMARY, TRAIN_LOG, fit_statistics, stale
from wdam_jax.state import DATA_AXIS, State, data_mesh, init_state, model_from_state

TENSORBOARD_DIR = "tensorboard"


# --------------------------------------------------------------------------------------------
# State, step, sharding.


def train_step(graphdef, rest, loss_fn, tx, state: State, batch: Mapping[str, jax.Array]):
    """One optimisation step (pure; jit it with the state donated).

    Args:
      graphdef, rest: from :func:`wdam_jax.state.split_model`.
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


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's part of the batch on the mesh, split along its first axis.

    With ``P`` processes each gives its own rows (part ``jax.process_index()`` of ``P``); the
    global batch is their concatenation in process order.
    """
    n = mesh.devices.size // jax.process_count()  # this process's devices
    sizes = {k: v.shape[0] for k, v in batch.items()}
    bad = {k: s for k, s in sizes.items() if s % n}
    if bad:
        raise ValueError(
            f"Batch sizes {bad} are not divisible by the {n} devices of this process; change "
            "train.batch_size or run on fewer devices."
        )
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    parts = jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * parts, *v.shape[1:]))
        for k, v in batch.items()
    }


# --------------------------------------------------------------------------------------------
# Logging.


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


class _Log:
    """The run's scalars: TensorBoard and ``train_log.jsonl`` (one JSON object per line)."""

    def __init__(self, workdir: pathlib.Path):
        self.summaries = _Summaries(workdir / TENSORBOARD_DIR)
        self.path = workdir / TRAIN_LOG

    def __call__(self, step: int, values: Mapping[str, float]) -> None:
        self.summaries.scalars(step, values)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        self.summaries.close()


class _NoLog:
    """What the processes other than the first log in a multi-host run: nothing."""

    def __call__(self, step: int, values: Mapping[str, float]) -> None:
        del step, values

    def close(self) -> None:
        pass


def _check_finite(metrics: Mapping[str, float], step: int, manager) -> None:
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(
            f"Non-finite loss {metrics['loss']} at step {step} (grad norm "
            f"{metrics['grad_norm']:.3g}); the run stopped and the checkpoint at step "
            f"{manager.latest_step()} in {manager.directory} is kept. Try a lower learning "
            "rate, float32 (config.model.dtype), or check the input images for NaNs."
        )


class _Best:
    """Keeps the state with the highest ``config.train.select_metric`` among the validations
    (with its fitted statistics) in ``<workdir>/best_checkpoint/``, and its step and score in
    ``best_checkpoint.json``; model selection on validation data only, never on the test split
    (the method's ``validate`` decides what it scores)."""

    def __init__(self, workdir: pathlib.Path, metric: str, *, primary: bool = True):
        self.metric = metric
        self.primary = primary  # the one process that writes the record (every process saves)
        self.record = workdir / checkpoints.BEST_RECORD
        self.manager = None
        self.value = -math.inf
        if not metric:
            return
        self.manager = checkpoints.checkpoint_manager(workdir, max_to_keep=1, best=True)
        if self.record.is_file() and self.manager.latest_step() is not None:
            self.value = float(json.loads(self.record.read_text())["value"])

    def offer(self, step: int, values: Mapping[str, float], state, fit: Callable[[], Fitted]):
        if self.manager is None or not values.get(self.metric, -math.inf) > self.value:
            return
        self.value = float(values[self.metric])
        checkpoints.save(self.manager, step, state, fit())
        record = {"metric": self.metric, "value": self.value, "step": step}
        if self.primary:
            checkpoints.atomic_write_text(self.record, json.dumps(record, indent=1))
        logging.info(
            "best %s so far (%.4f) at step %d: saved to %s.",
            *record.values(),
            self.manager.directory,
        )

    def close(self):
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()


def check_run(method: Method, workdir: pathlib.Path) -> None:
    """Raises :class:`InputsError` listing every problem with the run's inputs and workdir,
    before anything is written."""
    problems = method.check_inputs() + checkpoints.check_workdir(workdir)
    if problems:
        raise InputsError(problems, what=f"{method.config.method} in {workdir}")


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    stop_at: int | None = None,
    method: Method | None = None,
    allow_config_change: bool = False,
) -> tuple[nnx.Module, State]:
    """Trains ``config``'s method in ``workdir``, resuming from its newest checkpoint.

    Args:
      config: the experiment config (``config.method``, ``config.seed``, ``config.train.*``).
      workdir: output folder (checkpoints, logs, config.json).
      stop_at: stop after this step (as an interruption would; a later call resumes).
      method: an already built method (default: ``get_method(config)``).
      allow_config_change: resume even if the workdir's config differs in a field that changes
        the model, data or schedule (see :func:`wdam_jax.checkpoints.write_config`).

    Returns:
      ``(model, state)`` at the last step run.

    Raises:
      FloatingPointError: the loss became NaN or infinite.
      runlock.FolderBusyError: another process writes ``workdir`` (nothing was written).
    """
    workdir = pathlib.Path(workdir)
    method = get_method(config) if method is None else method
    check_run(method, workdir)
    with runlock.hold(workdir):  # one writer per run, for as long as it writes
        return _train(config, workdir, method, stop_at, allow_config_change)


def _train(config, workdir, method, stop_at, allow_config_change) -> tuple[nnx.Module, State]:
    primary = distributed.is_primary()
    checkpoints.write_config(config, workdir, allow_change=allow_config_change, write=primary)
    if "data" in config and primary:
        summary = data_summary.summarize(config.data)
        data_summary.save(summary, workdir / DATA_SUMMARY)
        print(data_summary.format_summary(summary), flush=True)
        for warning in summary.get("warnings", []):
            logging.warning("data: %s", warning)
    mesh = data_mesh()
    manager = checkpoints.checkpoint_manager(workdir, max_to_keep=config.train.keep_checkpoints)
    if method.total_steps == 0 and manager.latest_step() == 0:
        # A gradient-free run is only its fitted statistics: refit them if the data changed or
        # the checkpoint is damaged (the damaged one is kept in damaged_checkpoints/).
        try:
            _, fitted = checkpoints.restore(
                manager, init_state(method, config, abstract=True)[3], mesh=mesh
            )
        except checkpoints.CheckpointError as e:
            logging.warning("%s Refitting.", e)
            checkpoints.set_aside(manager, [0])
        else:
            if stale(method, fitted):
                logging.warning(
                    "The training files of %s changed since its statistics were fitted (or were "
                    "fitted by an older version): refitting.",
                    workdir,
                )
                manager.delete(0)
    resuming = manager.latest_step() is not None
    graphdef, rest, tx, state = init_state(method, config, abstract=resuming)
    if resuming:
        state, _ = checkpoints.restore(manager, state, mesh=mesh, set_aside_damaged=True)
        logging.info("Resuming from step %d of %s.", int(state["step"]), manager.directory)
    else:
        # Through the host: a multi-host mesh takes host values (equal in every process).
        state = jax.device_put(jax.device_get(state), NamedSharding(mesh, PartitionSpec()))
    first, total = int(state["step"]), method.total_steps
    last = total if stop_at is None else min(stop_at, total)
    if checkpoints.OPT_STATE not in state and first < last:
        raise checkpoints.CheckpointError(
            f"Checkpoint {first} in {manager.directory} holds the final parameters only "
            "(train.save_final_params_only=True), without the optimiser state training needs to "
            f"go on to step {last}. Train longer in a new --workdir, or evaluate this run as it "
            f"is (python -m launch.evaluate --workdir={workdir})."
        )
    log = _Log(workdir) if primary else _NoLog()
    eval_every = config.train.get("eval_every", 0)
    best = _Best(workdir, config.train.get("select_metric", ""), primary=primary)

    def validate(step: int) -> None:
        model = model_from_state(graphdef, rest, state)
        values = method.validate(model, step=step)
        if values:
            log(step, values)
            logging.info("validation at step %d: %s", step, values)
            best.offer(step, values, state, lambda: fit_statistics(method, model, step=step))

    if eval_every and first == 0 < last:  # the untrained network: the curve's baseline
        validate(0)
    if first < last:
        step_fn = compile_train_step(graphdef, rest, method.loss, tx, mesh)
        progress = Progress("train", total, unit="steps", every=0, done=first)
        # One batch is built ahead on a host thread while the device runs the current step.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            # Each process builds only its part of the global batch (see shard_batch).
            part = functools.partial(
                method.batch, part=jax.process_index(), parts=jax.process_count()
            )
            pending = pool.submit(part, first)
            for step in range(first, last):
                batch = pending.result()
                pending = pool.submit(part, step + 1) if step + 1 < last else None
                state, metrics = step_fn(state, shard_batch(batch, mesh))
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                done = step + 1
                _check_finite(metrics, step, manager)
                if step == first:
                    progress.restart(done)  # the first step compiles: not part of the rate
                if done % config.train.log_every == 0 or done == last or step == first:
                    log(done, metrics)
                    shown = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
                    progress.update(done, shown, force=True)
                if eval_every and (done % eval_every == 0 or done == total):
                    validate(done)
                if done == total:
                    break  # the final checkpoint is saved with the fitted statistics below
                if done % config.train.checkpoint_every == 0 or done == last:
                    checkpoints.save(manager, done, state)
    if last == total and manager.latest_step() != total:
        model = model_from_state(graphdef, rest, state)
        fitted = fit_statistics(method, model, step=total)
        final = state
        if config.train.get("save_final_params_only", False):
            final = {k: v for k, v in state.items() if k != checkpoints.OPT_STATE}
        checkpoints.save(manager, total, final, fitted)
    if last == total and primary and not (workdir / checkpoints.BACKBONE_FILE).is_file():
        # Also for a run finished before runs wrote it: re-running its command writes it.
        runs.write_backbone(method, model_from_state(graphdef, rest, state), workdir, step=total)
    manager.wait_until_finished()
    manager.close()
    best.close()
    log.close()
    return model_from_state(graphdef, rest, state), state
