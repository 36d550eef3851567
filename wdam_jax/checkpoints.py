"""A run directory's files: the orbax checkpoints and the recorded config.

Layout of ``<workdir>``:

- ``checkpoints/<step>/`` (one orbax ``CheckpointManager``): item ``state`` (params, batch
  statistics, optimiser state, step, RNG) and, once the method has fitted its statistics
  (``Method.fit``: a PatchCore bank, a Gaussian density), item ``fitted``. With
  ``train.save_final_params_only`` the final step's ``state`` has no optimiser state (a third
  of the size under Adam): it restores for evaluation and prediction, but cannot be trained on;
- ``config.json``: the config the run was made with, written atomically; a later command with a
  config that differs in a field that changes the model, the data or the schedule is refused.

Damage. Orbax writes a step into a temporary folder and renames it when complete, so a kill never
leaves a half-written step; but it keeps no checksums (a changed byte in an array file restores
silently). Each saved step therefore also holds ``wdam_sha256.json``, the SHA-256 of its every
file, checked before the step is restored. A step that is damaged (a file missing, truncated or
changed) or fails to restore is skipped with a warning naming it, and the newest readable step
is used; a resumed training run moves the damaged steps to ``<workdir>/damaged_checkpoints/`` so
they are never mistaken for progress. If no step is readable the command stops with a message
saying so: never a silent restart from step 0.
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wdam_jax import distributed
from wdam_jax.errors import MissingFileError, UserError

CHECKPOINT_DIR = "checkpoints"
# The state with the best validation score (``train.select_metric``) and its record.
BEST_DIR = "best_checkpoint"
BEST_RECORD = "best_checkpoint.json"
DAMAGED_DIR = "damaged_checkpoints"
CHECKSUMS = "wdam_sha256.json"
CONFIG_FILE = "config.json"
# A finished run's feature backbone, torchvision-named arrays (wdam_jax.runs.write_backbone).
BACKBONE_FILE = "backbone.npz"
STATE, FITTED = "state", "fitted"
OPT_STATE = "opt_state"  # the key of ``state`` a params-only checkpoint leaves out
# Config fields a resumed run may change: they affect logging, checkpoint cadence or scoring
# output, never the trained weights (scoring fields are re-read by every evaluation).
RESUMABLE_PREFIXES = (
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.save_final_params_only",
    "train.eval_every",
    "score.eval_batch_size",
    "score.num_figures",
)


class ConfigMismatchError(UserError, ValueError):
    """A workdir holds a run made with another config."""


class NoCheckpointError(UserError, FileNotFoundError):
    """A workdir has no checkpoint (at the step asked for)."""


class CheckpointError(UserError, RuntimeError):
    """No readable checkpoint where one is needed, or a checkpoint could not be written."""


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so a reader sees the old
    file or the new one, never a truncated one."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """:func:`atomic_write_text` for bytes (a PNG, an ``.npz``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_workdir(workdir: str | os.PathLike) -> list[str]:
    """Problems with a run directory before anything is written to it (empty if none): a file
    in its place, or it (its checkpoint folder, or the nearest existing parent) not writable."""
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        return [f"--workdir={workdir} is a file, not a folder; choose another --workdir."]
    if workdir.is_dir():  # a run to resume: it and its checkpoint folder must take new files
        for folder in (workdir, workdir / CHECKPOINT_DIR):
            if folder.is_dir() and not _writable(folder):
                return [
                    f"--workdir={workdir}: {folder} is read-only. Make it writable (chmod -R u+w "
                    f"{workdir}) and re-run to resume from its checkpoints, or choose another "
                    "--workdir."
                ]
        return []
    existing = next((p for p in workdir.parents if p.exists()), None)
    if existing is not None and not _writable(existing):
        return [f"--workdir={workdir}: {existing} is not writable; choose another --workdir."]
    return []


def _writable(folder: pathlib.Path) -> bool:
    """Whether a file can be created in ``folder`` (``access(2)`` honours read-only mounts and
    immutable folders, and, unlike a permission bit, holds for root too)."""
    return os.access(folder, os.W_OK | os.X_OK)


def checkpoint_manager(
    workdir: str | pathlib.Path, *, max_to_keep: int | None = None, best: bool = False
) -> ocp.CheckpointManager:
    """The workdir's CheckpointManager (synchronous: the state's buffers are donated): of the
    newest checkpoints, or with ``best`` of the one with the best validation score."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        pathlib.Path(workdir).absolute() / (BEST_DIR if best else CHECKPOINT_DIR),
        options=options,
        item_names=(STATE, FITTED),
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    fitted: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Saves the train state (and the fitted statistics, if any) as checkpoint ``step``, with
    the SHA-256 of its files (:data:`CHECKSUMS`).

    Raises:
      CheckpointError: the step could not be written (disk full, folder read-only, ...); the
        previous checkpoints are untouched.
    """
    items = {STATE: ocp.args.StandardSave(state)}
    if fitted:
        items[FITTED] = ocp.args.StandardSave({k: np.asarray(v) for k, v in fitted.items()})
    previous = manager.latest_step()
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
        if distributed.is_primary():  # orbax has finished every process's files by now
            step_dir = _step_dir(manager, step)
            atomic_write_text(step_dir / CHECKSUMS, json.dumps(_digests(step_dir), indent=1))
        distributed.barrier(f"wdam_checksums_{step}")
    except Exception as e:  # orbax and tensorstore raise plain Exceptions for I/O failures
        kept = "no earlier checkpoint" if previous is None else f"the checkpoint at step {previous}"
        folder = pathlib.Path(manager.directory)
        if not _writable(folder):
            raise CheckpointError(
                f"Could not write checkpoint {step}: {folder} is read-only ({e}). "
                f"{kept.capitalize()} is kept; make the folder writable (chmod -R u+w "
                f"{folder.parent}) and re-run the same command to resume from it."
            ) from e
        raise CheckpointError(
            f"Could not write checkpoint {step} in {folder}: {e}. Is the disk full or "
            f"the folder read-only? {kept.capitalize()} is kept; free space or fix the "
            "permissions and re-run the same command to resume from it."
        ) from e


def _step_dir(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    return pathlib.Path(manager.directory) / str(step)


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _digests(step_dir: pathlib.Path) -> dict[str, str]:
    return {
        p.relative_to(step_dir).as_posix(): _sha256(p)
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }


def verify(step_dir: pathlib.Path) -> None:
    """Checks a step's files against its :data:`CHECKSUMS` (a step saved without them, by an
    older version or killed just before writing them, is taken as it is).

    Raises:
      CheckpointError: a file is missing or its content changed.
    """
    path = step_dir / CHECKSUMS
    if not path.is_file():
        return
    try:
        expected = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from e
    for name, digest in sorted(expected.items()):
        file = step_dir / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file} is damaged (its SHA-256 changed since it was saved)")


def _abstract(tree: Any, sharding) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def restore(
    manager: ocp.CheckpointManager,
    state: Any,
    *,
    step: int | None = None,
    mesh: Mesh,
    set_aside_damaged: bool = False,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Restores checkpoint ``step`` (default: the newest readable one) into ``state``'s structure.

    Without ``step``, a damaged or unreadable newest step is skipped with a warning naming it and
    the next older one is tried; a step deleted while being read (by the training run that
    writes the workdir, which keeps only its newest checkpoints) is replaced by the newest step
    then, so a reader beside a trainer always gets a complete checkpoint. ``set_aside_damaged``
    (a resuming training run) then moves the skipped steps to ``<workdir>/damaged_checkpoints/``
    so the run continues from the one used.

    Returns:
      ``(state, fitted)``; ``fitted`` is empty when the checkpoint holds none, and ``state`` has
      no :data:`OPT_STATE` when the checkpoint was saved without it (params only).

    Raises:
      NoCheckpointError: no checkpoint at ``step`` (or none at all).
      CheckpointError: the named step, or every step, is damaged or unreadable.
    """
    available = sorted(manager.all_steps(), reverse=True)
    if (step is not None and step not in available) or not available:
        raise NoCheckpointError(
            f"No checkpoint at step {step} in {manager.directory}; available: {sorted(available)}."
        )
    target = _abstract(state, NamedSharding(mesh, PartitionSpec()))
    failures: list[tuple[int, str]] = []
    candidates = [step] if step is not None else available
    while candidates:
        candidate = candidates.pop(0)
        try:
            restored = _restore_step(manager, candidate, target)
        except Exception as e:  # orbax/tensorstore raise plain Exceptions for damaged files
            if step is None and not _step_dir(manager, candidate).exists():
                # Deleted while we read it by the training that writes the run (it keeps only
                # its newest checkpoints): read the newest one now, which is complete.
                manager.reload()
                candidates = sorted(manager.all_steps(), reverse=True)
                logging.info("Checkpoint %d was replaced while being read; reading %s.",
                             candidate, candidates[:1])  # fmt: skip
                continue
            failures.append((candidate, f"{type(e).__name__}: {str(e)[:500]}"))
            logging.warning(
                "Checkpoint %s is damaged or unreadable (%s).",
                _step_dir(manager, candidate),
                failures[-1][1],
            )
            continue
        if failures:
            logging.warning(
                "Using checkpoint %s instead of the newer damaged one(s) %s.",
                _step_dir(manager, candidate),
                ", ".join(str(s) for s, _ in failures),
            )
            if set_aside_damaged:
                set_aside(manager, [s for s, _ in failures])
        return restored
    shown = "; ".join(f"step {s}: {why}" for s, why in failures)
    raise CheckpointError(
        f"No readable checkpoint in {manager.directory} ({shown}). Nothing was restored. Restore "
        "the folder from a backup, or move it aside to start the run again from step 0."
    )


def _restore_step(manager: ocp.CheckpointManager, step: int, target: Any):
    step_dir = _step_dir(manager, step)
    verify(step_dir)
    params_only = jax.tree.leaves(target.get(OPT_STATE)) and OPT_STATE not in _saved_keys(step_dir)
    if params_only:  # saved with train.save_final_params_only
        target = {k: v for k, v in target.items() if k != OPT_STATE}
    has_fitted = (step_dir / FITTED).is_dir()
    items = {STATE: ocp.args.StandardRestore(target)}
    if has_fitted:
        items[FITTED] = ocp.args.StandardRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    fitted = {k: np.asarray(v) for k, v in (restored[FITTED] if has_fitted else {}).items()}
    return restored[STATE], fitted


def _saved_keys(step_dir: pathlib.Path) -> set[str]:
    """The top-level keys of a step's saved ``state`` (from its metadata, no array read)."""
    handler = ocp.StandardCheckpointHandler()  # the item's own metadata: no step-level warning
    try:
        return set(handler.metadata(step_dir / STATE).keys())
    finally:
        handler.close()


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves damaged steps out of the manager's folder (kept for inspection, never deleted)."""
    if distributed.is_primary():
        aside = pathlib.Path(manager.directory).parent / DAMAGED_DIR
        aside.mkdir(exist_ok=True)
        for step in steps:
            target, n = aside / str(step), 1
            while target.exists():
                target, n = aside / f"{step}.{n}", n + 1
            shutil.move(_step_dir(manager, step), target)
            logging.warning("Moved damaged checkpoint %d to %s.", step, target)
    distributed.barrier("wdam_set_aside")
    manager.reload()


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
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    *,
    allow_change: bool = False,
    write: bool = True,
) -> None:
    """Records the run's config in ``workdir`` (read back by :func:`read_config`).

    A workdir that already holds a config is resumed only with the same one, except for the
    fields in :data:`RESUMABLE_PREFIXES`; otherwise :class:`ConfigMismatchError` names the
    differing fields. ``allow_change`` accepts any change; the previous config is then kept as
    ``config.<n>.json`` beside the new one. ``write=False`` only checks (the processes other
    than the first of a multi-host run).
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
        if not write:
            return
        if blocking:
            n = 1
            while (workdir / f"config.{n}.json").exists():
                n += 1
            atomic_write_text(workdir / f"config.{n}.json", path.read_text())
            logging.warning("Config changed in %s (%s); previous kept as config.%d.json.",
                            workdir, ", ".join(blocking), n)  # fmt: skip
    if write:
        atomic_write_text(path, config.to_json(indent=2, sort_keys=True))


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config recorded in ``workdir`` (lists back as tuples)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(
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
