"""Progress of long calls: visible on stderr unless the application configured the package's logger;
`JobHandle.wait` reports the job's progress."""

import io
import logging
import subprocess
import sys

from conftest import REPO
from harli_jax.logs import StatusLine

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
    assert steps and steps[-1].startswith("finetune: step 3/3  loss ")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_status_line_draws_a_bar_on_a_terminal_and_logs_elsewhere(caplog):
    screen = _Terminal()
    line = StatusLine("compiling", 4, stream=screen, always=True, tty_interval_s=0.0)
    details = []
    line.update(1, lambda: details.append(1) or "slow detail")
    line.update(4)
    line.close()
    assert screen.getvalue() == (f"\rcompiling [{'#' * 7}{'.' * 23}] 1/4  slow detail\033[K"
                                 f"\rcompiling [{'#' * 30}] 4/4\033[K\n")
    throttled = StatusLine("waiting", stream=_Terminal(), always=True, tty_interval_s=60.0)
    throttled.update(1)
    throttled.update(2, lambda: details.append(2) or "")  # within the interval: not drawn, detail not computed
    assert details == [1]
    with caplog.at_level(logging.INFO, logger="harli_jax"):
        StatusLine("job: step", 10, stream=io.StringIO()).update(3, "loss 1.0")
    assert [r.getMessage() for r in caplog.records] == ["job: step 3/10  loss 1.0"]
    quiet = _Terminal()
    with caplog.at_level(logging.WARNING, logger="harli_jax"):
        StatusLine("quiet", 2, stream=quiet).update(1)
    assert quiet.getvalue() == ""
