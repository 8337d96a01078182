"""The package's log ("harli_jax"): long calls (engine construction, calibration, `JobHandle.wait`) report
progress there at INFO. Unless the application set that logger's level or gave it handlers, the first engine
sends its messages to stderr at `HARLI_LOG_LEVEL` (default INFO), and not on to the root logger (some
dependencies configure the root logger when imported, so its state says nothing of the application's wish)."""

from __future__ import annotations

import logging
import os

LOGGER = "harli_jax"


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
