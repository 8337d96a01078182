"""Progress of long calls: visible on stderr unless the application configured the package's logger;
`JobHandle.wait` reports the job's progress."""

import logging
import subprocess
import sys

from conftest import REPO

SCRIPT = """
import logging, sys
if sys.argv[1] == "configured":
    logging.getLogger("harli_jax").setLevel(logging.WARNING)
from harli_jax import Engine, EngineConfig, FinetuneJob
engine = Engine.from_config("configs/models/tiny.yaml", EngineConfig(max_batch=1, max_seq_len=32, num_pages=8))
handle = engine.finetune(FinetuneJob(total_steps=2, eval_interval=0, micro_batch_rows=2, seq_len=32))
handle.progress_interval_s = 0.0
handle.wait()
"""


def _stderr(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_long_calls_report_progress_unless_logging_is_configured():
    shown = _stderr("plain")
    assert "harli_jax" in shown and "compiled" in shown and "step 2/2" in shown, shown
    assert "compiled" not in _stderr("configured")  # the application's level for the package holds


def test_wait_logs_the_jobs_progress(tiny_yaml, caplog):
    from harli_jax import Engine, EngineConfig, FinetuneJob

    engine = Engine.from_config(tiny_yaml, EngineConfig(max_batch=1, max_seq_len=32, num_pages=8), warmup=False)
    handle = engine.finetune(FinetuneJob(total_steps=3, eval_interval=0, micro_batch_rows=2, seq_len=32))
    handle.progress_interval_s = 0.0
    with caplog.at_level(logging.INFO, logger="harli_jax"):
        handle.wait()
    steps = [r.getMessage() for r in caplog.records if "trained tokens/s" in r.getMessage()]
    assert steps and steps[-1].startswith("finetune: step 3/3, loss ")
