"""The replay harness: inference traces (formats, rescaling, synthetic generators), `harli replay` (a trace
with a finetune job under one or several policies, on fresh engines), and its report (metrics, CSVs, plots).
It drives the engine through its public API: `replay -> runtime`."""

from harli_jax.replay.report import RunResult, format_table, summarize
from harli_jax.replay.run import main
from harli_jax.replay.trace import Trace, load_trace, synthesize, write_trace

__all__ = ["RunResult", "Trace", "format_table", "load_trace", "main", "summarize", "synthesize", "write_trace"]
