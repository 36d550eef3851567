"""What every launcher shares: config files from anywhere, overrides checked before anything
runs, and user errors as one readable message (exit code 2) instead of a traceback.

``run(main)`` replaces ``absl.app.run(main)``:

- ``--config=configs/x.py[:arg]`` that does not exist relative to the working directory resolves
  against this package's own ``configs/`` (so the documented commands work from any directory);
- the argument after ``:`` must be one of the config file's ``VARIANTS`` (one message listing
  them otherwise, :func:`wdam_jax.errors.check_config_variant`);
- every ``--config.a.b=value`` override is checked against the config before absl parses it: an
  unknown field is named with the nearest valid one and the section's fields; a value of the
  wrong type is named with the type expected;
- a :class:`wdam_jax.errors.UserError` (bad config, data, weights or run directory) is printed
  as its message alone and the process exits with code 2; ``--verbose`` adds the traceback.

Relative paths inside configs (``data.root``, ``model.pretrained``, ...) are relative to the
working directory, as any command-line tool's are.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
import sys
import traceback
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
EXIT_USER_ERROR = 2


def resolve_config_path(value: str) -> str:
    """``path[:arg]`` with ``path`` made absolute: as given if it exists, else under the
    package's ``configs/`` (by its path after ``configs/``, or its bare file name)."""
    path, sep, arg = value.partition(":")
    if pathlib.Path(path).is_file():
        return value
    name = pathlib.Path(path)
    parts = name.parts
    relative = pathlib.Path(*parts[parts.index("configs") + 1 :]) if "configs" in parts else name
    for candidate in (CONFIGS_DIR / relative, CONFIGS_DIR / name.name):
        if candidate.is_file():
            return f"{candidate}{sep}{arg}"
    known = sorted(p.name for p in CONFIGS_DIR.glob("*.py") if not p.name.startswith("_"))
    raise _Usage(
        f"--config={value}: no such config file (looked in the working directory and in "
        f"{CONFIGS_DIR}). Known configs: {', '.join(known)}."
    )


class _Usage(Exception):
    pass


def _shown(path: str) -> str:
    """A config file as the user knows it: ``configs/x.py`` for the package's own."""
    resolved = pathlib.Path(path).resolve()
    if resolved.is_relative_to(CONFIGS_DIR.parent):
        return str(resolved.relative_to(CONFIGS_DIR.parent))
    return path


def _load_config(value: str) -> ml_collections.ConfigDict:
    """The config of ``path[:arg]``; an argument that is not one of the file's ``VARIANTS`` is a
    :class:`wdam_jax.errors.ConfigError` listing them (raised before ``get_config`` runs)."""
    from wdam_jax.errors import check_config_variant

    path, _, arg = value.partition(":")
    spec = importlib.util.spec_from_file_location("_wdam_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check_config_variant(_shown(path), getattr(module, "VARIANTS", None), arg)
    return module.get_config(arg or None)


def _expected_type(value) -> type | None:
    for kind in (bool, int, float, str, tuple):
        if isinstance(value, kind):
            return kind
    return None


def _check_value(field: str, current, text: str) -> str | None:
    kind = _expected_type(current)
    if kind is None or kind is str:
        return None
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if kind is bool and text.lower() in ("true", "false"):
            return None
        return f"--config.{field}={text}: expected {kind.__name__} (current value {current!r})."
    ok = (
        (kind is bool and isinstance(parsed, bool))
        or (kind is int and isinstance(parsed, int) and not isinstance(parsed, bool))
        or (kind is float and isinstance(parsed, int | float) and not isinstance(parsed, bool))
        or (kind is tuple and isinstance(parsed, tuple | list))
    )
    if not ok:
        return f"--config.{field}={text}: expected {kind.__name__} (current value {current!r})."
    return None


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str], flag: str) -> list[str]:
    """Problems with the ``--<flag>.a.b=value`` overrides in ``argv`` (empty if none)."""
    problems = []
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        field, has_value, text = arg[len(prefix) :].partition("=")
        node, walked = config, []
        for key in field.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                section = ".".join(walked) or "the config"
                near = difflib.get_close_matches(key, fields, n=1)
                hint = f" Did you mean {'.'.join([*walked, near[0]])}?" if near else ""
                problems.append(
                    f"--{flag}.{field}: {section} has no field {key!r}.{hint} "
                    f"Fields of {section}: {', '.join(fields)}."
                )
                break
            node = node[key]
            walked.append(key)
        else:
            if has_value and not isinstance(node, ml_collections.ConfigDict):
                problem = _check_value(field, node, text)
                if problem:
                    problems.append(problem)
    return problems


def prepare_argv(argv: Sequence[str], *, config_flag: str = "config") -> list[str]:
    """``argv`` with the config path resolved; raises on an unknown config argument (variant)
    and on unknown or mistyped overrides."""
    from wdam_jax.errors import ConfigError

    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{config_flag}="):
            value = resolve_config_path(arg.split("=", 1)[1])
            argv[i] = f"--{config_flag}={value}"
            try:
                config = _load_config(value)
            except ConfigError as e:
                raise _Usage(str(e)) from None
            problems = check_overrides(config, argv, config_flag)
            if problems:
                raise _Usage("\n".join(problems))
    return argv


def run(main: Callable[[list[str]], None], *, config_flag: str | None = "config") -> None:
    """``absl.app.run(main)`` with the checks and the error handling of the module docstring."""
    from wdam_jax.errors import UserError

    verbose = "--verbose" in sys.argv
    argv = [a for a in sys.argv if a != "--verbose"]
    try:
        if config_flag:
            argv = prepare_argv(argv, config_flag=config_flag)
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

    def guarded(args):
        try:
            main(args)
        except UserError as e:
            if verbose:
                traceback.print_exc()
            print(f"\nerror: {e}\n(--verbose shows the traceback)", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    app.run(guarded, argv=argv)


class CheckpointChoice:
    """``--step`` and ``--checkpoint=latest|best``: which checkpoint of a run a command reads."""

    def __init__(self):
        self._step = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
        self._which = flags.DEFINE_enum(
            "checkpoint",
            "latest",
            ["latest", "best"],
            "latest: the newest checkpoint (or --step); best: the one with the best validation "
            "score (runs with config.train.select_metric, e.g. DRAEM's).",
        )

    def resolve(self) -> dict[str, int | bool | None]:
        """``{"step": ..., "best": ...}`` for :func:`wdam_jax.runs.restore` and its callers."""
        best = self._which.value == "best"
        if best and self._step.value is not None:
            raise app.UsageError("Give --step or --checkpoint=best, not both.")
        return {"step": self._step.value, "best": best}
