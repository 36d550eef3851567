"""A run directory's files: the orbax checkpoints and the recorded config.

Layout of ``<workdir>``:

- ``checkpoints/<step>/`` (one orbax ``CheckpointManager``): item ``state`` (params, batch
  statistics, optimiser state, step, RNG) and, once the method has fitted its statistics
  (``Method.fit``: a PatchCore bank, a Gaussian density), item ``fitted``;
- ``config.json``: the config the run was made with, written atomically; a later command with a
  config that differs in a field that changes the model, the data or the schedule is refused.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
STATE, FITTED = "state", "fitted"
# Config fields a resumed run may change: they affect logging, checkpoint cadence or scoring
# output, never the trained weights (scoring fields are re-read by every evaluation).
RESUMABLE_PREFIXES = (
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "score.eval_batch_size",
    "score.num_figures",
)


class ConfigMismatchError(ValueError):
    """A workdir holds a run made with another config."""


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so a reader sees the old
    file or the new one, never a truncated one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_manager(
    workdir: str | pathlib.Path, *, max_to_keep: int | None = None
) -> ocp.CheckpointManager:
    """The workdir's one CheckpointManager (synchronous: the state's buffers are donated)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / CHECKPOINT_DIR,
        options=options,
        item_names=(STATE, FITTED),
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    fitted: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Saves the train state (and the fitted statistics, if any) as checkpoint ``step``."""
    items = {STATE: ocp.args.StandardSave(state)}
    if fitted:
        items[FITTED] = ocp.args.StandardSave({k: np.asarray(v) for k, v in fitted.items()})
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def _abstract(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(
    manager: ocp.CheckpointManager, state: Any, *, step: int | None = None, mesh: Mesh
) -> tuple[Any, dict[str, np.ndarray]]:
    """Restores checkpoint ``step`` (default: newest) into ``state``'s structure.

    Returns:
      ``(state, fitted)``; ``fitted`` is empty when the checkpoint holds none.
    """
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"No checkpoint at step {step} in {manager.directory}; available: "
            f"{sorted(manager.all_steps())}."
        )
    target = _abstract(state, NamedSharding(mesh, PartitionSpec()))
    has_fitted = (pathlib.Path(manager.directory) / str(step) / FITTED).is_dir()
    items = {STATE: ocp.args.StandardRestore(target)}
    if has_fitted:
        items[FITTED] = ocp.args.StandardRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    fitted = {k: np.asarray(v) for k, v in (restored[FITTED] if has_fitted else {}).items()}
    return restored[STATE], fitted


# --------------------------------------------------------------------------------------------
# The recorded config.


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigMismatchError(
            f"{path} is unreadable ({e}); it records the run's config. Restore it from a backup, "
            "or delete it to record the config given now (only if you are sure it is the same)."
        ) from e


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Fields (dotted) whose values differ between two config dicts (lists == tuples)."""
    a, b = flatten(json.loads(json.dumps(old))), flatten(json.loads(json.dumps(new)))
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def write_config(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, *, allow_change: bool = False
) -> None:
    """Records the run's config in ``workdir`` (read back by :func:`read_config`).

    A workdir that already holds a config is resumed only with the same one, except for the
    fields in :data:`RESUMABLE_PREFIXES`; otherwise :class:`ConfigMismatchError` names the
    differing fields. ``allow_change`` accepts any change; the previous config is then kept as
    ``config.<n>.json`` beside the new one.
    """
    path = workdir / CONFIG_FILE
    new = json.loads(config.to_json())
    if path.is_file():
        old = _load_json(path)
        changed = config_changes(old, new)
        if not changed:
            return
        blocking = [k for k in changed if not k.startswith(RESUMABLE_PREFIXES)]
        if blocking and not allow_change:
            flat_old, flat_new = flatten(old), flatten(new)
            shown = "; ".join(
                f"{k}: {flat_old.get(k, '<absent>')!r} -> {flat_new.get(k, '<absent>')!r}"
                for k in blocking
            )
            raise ConfigMismatchError(
                f"{workdir} holds a run made with another config ({shown}). Use a new "
                "--workdir, restore those values, or pass --allow_config_change to continue "
                "this run with the new values (the old config is kept beside it)."
            )
        if blocking:
            n = 1
            while (workdir / f"config.{n}.json").exists():
                n += 1
            atomic_write_text(workdir / f"config.{n}.json", path.read_text())
            logging.warning("Config changed in %s (%s); previous kept as config.%d.json.",
                            workdir, ", ".join(blocking), n)  # fmt: skip
    atomic_write_text(path, config.to_json(indent=2, sort_keys=True))


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config recorded in ``workdir`` (lists back as tuples)."""
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

    return ml_collections.ConfigDict(tuples(_load_json(path)))


class _DropOrbaxInfo(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax() -> None:
    """Hides orbax's per-save INFO lines (a dozen per checkpoint) from the absl log."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
        handler.addFilter(_DropOrbaxInfo())
