"""One progress reporter for every long loop (training steps, PatchCore features and coreset,
FMAS images): ``what done/total unit, rate, ETA``.

Pure Python on purpose: ``synthesis/progress.py`` is a byte-identical copy (the synthesis stage
never imports ``wdam_jax``), and ``tests/test_layering.py`` checks that the copies agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or infinite: unknown yet
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Logs ``what: done/total unit (rate unit/s, elapsed, ETA) note``.

    Args:
      what: what is being done (``"train"``, ``"bottle/plain coreset"``).
      total: units of work in all.
      unit: their name (``"steps"``, ``"images"``).
      every: log at most every this many seconds (the last unit is always logged); 0 logs each.
      done: units already done before this process started (a resumed run); the rate counts
        only the units done here.
      log: where lines go (default: the ``logging`` module's root logger, which absl shares).
    """

    def __init__(
        self,
        what: str,
        total: int,
        *,
        unit: str = "items",
        every: float = 10.0,
        done: int = 0,
        log: Callable[[str], None] | None = None,
    ):
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.log = log or logging.getLogger().info
        self.restart(done)

    def restart(self, done: int) -> None:
        """Counts the rate from ``done`` units now (e.g. after a first, compiling, step)."""
        self.start_done, self.start_time = done, time.perf_counter()
        self.last_time = float("-inf")

    def line(self, done: int, note: str = "") -> str:
        """The progress line for ``done`` units."""
        elapsed = time.perf_counter() - self.start_time
        run = done - self.start_done
        rate = run / elapsed if run > 0 and elapsed > 0 else float("nan")
        eta = (self.total - done) / rate if rate == rate and rate > 0 else float("nan")
        rate_text = "?" if rate != rate else f"{rate:.3g}"
        text = (
            f"{self.what}: {done}/{self.total} {self.unit} ({rate_text} {self.unit}/s, "
            f"elapsed {_duration(elapsed)}, ETA {_duration(eta)})"
        )
        return f"{text} {note}".rstrip()

    def update(self, done: int, note: str = "", *, force: bool = False) -> bool:
        """Logs the line if ``every`` seconds passed, at the end or if ``force``; True if logged."""
        now = time.perf_counter()
        if not force and done < self.total and now - self.last_time < self.every:
            return False
        self.last_time = now
        self.log(self.line(done, note))
        return True
