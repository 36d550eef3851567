"""Errors a user can fix (config, data, weights, run directory), as opposed to bugs.

The launchers (``launch/cli.py``) print a :class:`UserError` as one readable message and exit
with code 2, without a traceback (``--verbose`` shows it). Each message names the file or the
config field, the value, and what fixes or disables it.
"""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """A problem in what the user gave us, with its fix in the message."""


class ConfigError(UserError, ValueError):
    """A config field with a value that cannot work."""


class InputsError(UserError):
    """Several problems found by a run's up-front check, reported together."""

    def __init__(self, problems: Sequence[str], *, what: str = "this run"):
        self.problems = list(problems)
        lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.problems, start=1))
        super().__init__(
            f"{len(self.problems)} problem(s) with the inputs of {what}; nothing was written:\n"
            f"{lines}"
        )


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or a run needs) is not there; the message says which and
    how to make it."""


def check_config_variant(config_file: str, variants: Sequence[str] | None, arg: str | None) -> None:
    """The one check of a config file's argument (``--config=<file>:<arg>``), for every launcher
    and every run a config names (``launch/cli.py``, ``wdam_jax.experiment``).

    Args:
      config_file: the file as shown to the user (``configs/patchcore.py``).
      variants: the file's ``VARIANTS``: the arguments it accepts, ``""`` for none; the order of
        comma-separated parts does not matter (``"published,demo"`` = ``"demo,published"``).
        None (a config file of the user's without ``VARIANTS``): anything is passed on.
      arg: the argument given (None or ``""`` for none).

    Raises:
      ConfigError: ``arg`` is not a variant; the message lists the variants that exist.
    """
    import difflib

    if variants is None:
        return

    def parts(text: str | None) -> frozenset[str]:
        return frozenset(p.strip() for p in (text or "").split(",") if p.strip())

    if parts(arg) in {parts(v) for v in variants}:
        return
    near = difflib.get_close_matches(arg or "", [v for v in variants if v], n=1)
    hint = f" Did you mean {config_file}:{near[0]}?" if near else ""
    shown = ", ".join(
        f"{config_file}:{v}" if v else f"{config_file} (no argument)" for v in variants
    )
    raise ConfigError(
        f"--config={config_file}:{arg}: {config_file} has no variant {arg!r}.{hint} "
        f"Its variants: {shown}."
    )
