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
