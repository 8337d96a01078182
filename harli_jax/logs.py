"""The package's log ("harli_jax"): long calls (engine construction, calibration, `JobHandle.wait`) report
progress there at INFO, and as a status line with a progress bar on a terminal (StatusLine). Unless the
application set that logger's level or gave it handlers, the first engine sends its messages to stderr at
`HARLI_LOG_LEVEL` (default INFO), and not on to the root logger (some dependencies configure the root logger
when imported, so its state says nothing of the application's wish)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

LOGGER = "harli_jax"
BAR = 30  # characters of a progress bar


def show_progress() -> None:
    """Sends the package's messages to stderr, unless the application configured the package's logger."""
    log = logging.getLogger(LOGGER)
    if log.handlers or log.level != logging.NOTSET:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("harli_jax %(asctime)s %(message)s", datefmt="%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(os.environ.get("HARLI_LOG_LEVEL", "INFO").upper())
    log.propagate = False


class StatusLine:
    """The progress of a call that blocks: on a terminal one line rewritten in place (with a bar when the total is
    known) at most every `tty_interval_s`; elsewhere a log message every `interval_s`. Silent when the package's
    logger is not enabled for INFO, unless `always`."""

    def __init__(self, label: str, total: int | None = None, *, interval_s: float = 10.0,
                 tty_interval_s: float = 0.5, stream: TextIO | None = None, always: bool = False):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = tty_interval_s if self.tty else interval_s
        self.enabled = always or logging.getLogger(LOGGER).isEnabledFor(logging.INFO)
        self.always = always
        self._last = -float("inf")
        self._drawn = False

    def update(self, done: int, detail: str | Callable[[], str] = "", force: bool = False) -> None:
        """Shows `done` (and `detail`, called only when the line is drawn) if the interval has passed."""
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        detail = detail() if callable(detail) else detail
        count = f"{done}/{self.total}" if self.total else f"{done}"
        if self.tty and self.total:
            filled = min(BAR, BAR * done // self.total)
            count = f"[{'#' * filled}{'.' * (BAR - filled)}] {count}"
        line = f"{self.label} {count}" + (f"  {detail}" if detail else "")
        if self.tty:
            print(f"\r{line}\033[K", end="", file=self.stream, flush=True)
            self._drawn = True
        elif self.always:
            print(line, file=self.stream, flush=True)
        else:
            logging.getLogger(LOGGER).info("%s", line)

    def close(self) -> None:
        """Ends the line on a terminal."""
        if self._drawn:
            print(file=self.stream, flush=True)
            self._drawn = False
