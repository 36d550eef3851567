"""The run store: a trained run read back from its workdir, for everything that uses one
(evaluation, prediction, export, thresholds, the analyses). The loop (:mod:`wdam_jax.train`)
writes runs; nothing here trains.

- :func:`restore`: the method, the model at a checkpoint and its fitted statistics (refitted when
  the checkpoint holds none or they are stale);
- :func:`fit_statistics` / :func:`stale`: ``Method.fit`` stamped with the training files'
  fingerprint, and the check that they still match;
- :func:`read_train_log`: the scalars the loop logged (``train_log.jsonl``).

A run's feature backbone is not read here: the loop writes it to ``<workdir>/backbone`` as
torchvision-named weights (:data:`wdam_jax.checkpoints.BACKBONE_FILE`), which PatchCore's members
load like ImageNet weights, so no method needs the run store.
"""

from __future__ import annotations

import io
import json
import pathlib

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from wdam_jax import checkpoints
from wdam_jax.data import sources
from wdam_jax.methods.base import Fitted, Method
from wdam_jax.methods.registry import get_method
from wdam_jax.state import data_mesh, init_state, model_from_state

TRAIN_LOG = "train_log.jsonl"
DATA_SUMMARY = "data_summary.json"


class Restored:
    """A run restored from its workdir: its method, model at ``step``, and fitted statistics.

    ``fitted`` is what the checkpoint holds, or, for a checkpoint taken before the end of
    training, computed now by ``method.fit`` on the training images (not saved).
    """

    def __init__(self, method: Method, model: nnx.Module, step: int, fitted: Fitted):
        self.method, self.model, self.step, self.fitted = method, model, step, fitted

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.method.config


DATA_FINGERPRINT = "data_fingerprint"


def _fingerprint(method: Method) -> np.ndarray | None:
    if "data" not in method.config:  # a method that reads no dataset (tests' toy methods)
        return None
    digest = sources.train_fingerprint(method.config.data)
    return np.frombuffer(bytes.fromhex(digest), np.uint8).copy()


def fit_statistics(method: Method, model: nnx.Module, *, step: int) -> Fitted:
    """``method.fit`` on the method's normal training images, stamped with their fingerprint
    (:func:`wdam_jax.data.sources.train_fingerprint`) so stale statistics are never reused."""
    fitted = dict(method.fit(model, method.train_images(), step=step))
    fingerprint = _fingerprint(method)
    return fitted if fingerprint is None else {**fitted, DATA_FINGERPRINT: fingerprint}


def stale(method: Method, fitted: Fitted) -> bool:
    """True if ``fitted`` was computed on other training files than the config's now."""
    current = _fingerprint(method)
    if current is None:
        return False
    stored = fitted.get(DATA_FINGERPRINT)
    return stored is None or not np.array_equal(stored, current)


def restore(
    workdir: str | pathlib.Path,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    method: Method | None = None,
    best: bool = False,
) -> Restored:
    """The model (and fitted statistics) of a workdir's newest (or ``step``'s) checkpoint.

    Args:
      workdir: a training workdir.
      step: checkpoint step (default: newest).
      config: the run's config (default: the one recorded in the workdir).
      method: an already built method for ``config`` (reuses its loaded data).
      best: the checkpoint with the best validation score (``train.select_metric``) instead.
    """
    config = checkpoints.read_config(workdir) if config is None else config
    method = get_method(config) if method is None else method
    manager = checkpoints.checkpoint_manager(workdir, best=best)
    if best and manager.latest_step() is None:
        manager.close()
        raise checkpoints.NoCheckpointError(
            f"{workdir} has no best checkpoint: runs keep one when config.train.select_metric "
            "names a metric their validation reports (with config.train.eval_every > 0); "
            "evaluate the newest checkpoint instead (without --checkpoint=best)."
        )
    if manager.latest_step() is None:
        raise checkpoints.NoCheckpointError(
            f"{workdir} has no checkpoint yet: train it first, or finish an interrupted run by "
            f"re-running its command (python -m launch.train --config=... --workdir={workdir})."
        )
    graphdef, rest, _, state = init_state(method, config, abstract=True)
    state, fitted = checkpoints.restore(manager, state, step=step, mesh=data_mesh())
    manager.close()
    model = model_from_state(graphdef, rest, state)
    step = int(state["step"])
    if fitted and stale(method, fitted):
        logging.warning(
            "The training files of %s changed since its statistics were fitted: refitting them "
            "now for this evaluation (python -m launch.train on the run refits and saves them%s).",
            workdir,
            "" if method.total_steps == 0 else "; the network itself was trained on the old files",
        )
        fitted = {}
    if not fitted:
        fitted = fit_statistics(method, model, step=step)
    return Restored(method, model, step, fitted)


def write_backbone(
    method: Method, model: nnx.Module, workdir: str | pathlib.Path, *, step: int
) -> pathlib.Path | None:
    """Writes the run's feature backbone as trained at ``step`` (``Method.backbone``; nothing
    for a method without one) to ``<workdir>/backbone.npz``: the torchvision-named state_dict
    with the WDAM weights beside it (:func:`wdam_jax.models.wide_resnet.to_torchvision`), which
    PatchCore's members read through the same ``from_torchvision`` as converted ImageNet weights.
    One file written atomically by plain numpy (no orbax: the first process of a multi-host run
    writes it alone, without a barrier).

    Returns:
      The file written, or None.
    """
    from wdam_jax.models import wide_resnet

    backbone = method.backbone(model, step=step)
    if backbone is None:
        return None
    buffer = io.BytesIO()
    np.savez(buffer, **wide_resnet.to_torchvision(backbone))
    path = pathlib.Path(workdir) / checkpoints.BACKBONE_FILE
    checkpoints.atomic_write_bytes(path, buffer.getvalue())
    return path


def read_train_log(workdir: str | pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """``train_log.jsonl`` as ``{name: [(step, value), ...]}`` (a resumed step's last value)."""
    path = pathlib.Path(workdir) / TRAIN_LOG
    latest: dict[tuple[str, int], float] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            step = int(row.pop("step"))
            for k, v in row.items():
                latest[(k, step)] = v
    out: dict[str, list[tuple[int, float]]] = {}
    for (k, step), v in sorted(latest.items()):
        out.setdefault(k, []).append((step, v))
    return out
