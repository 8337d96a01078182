"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import jax
import jaxlib

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    """The first device's kind as a file-name-safe slug, e.g. "nvidia-h100-80gb-hbm3" or "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def write_result(name: str, payload: dict) -> Path:
    """Writes `payload` with the machine, JAX version and date to bench/results/<name>-<device>.json."""
    record = {
        "benchmark": name,
        "machine": {
            "node": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
            "backend": jax.default_backend(),
        },
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **payload,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{device_name()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
