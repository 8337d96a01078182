"""`harli replay` at its defaults, as the README's main command runs it: the real model (`smollm2`), the bundled
trace, the SLO of the preset (no multiplied SLO, no widened margin) and the default finetune job (the JSON
extraction task). Both policies keep the SLO, and the adapter trained while serving answers more of the job's
held-out samples exactly than the base model does."""

import contextlib
import io
import json

from harli_jax.replay import run as replay


def test_the_default_replay_keeps_the_slo_while_the_adapter_learns(tmp_path):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = replay.main(["--out", str(tmp_path / "run")])
    assert code == 0, stderr.getvalue()
    report = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert report["options"]["model"] == "smollm2" and report["trace"]["requests"] == 30
    assert [s["policy"] for s in report["summary"]] == ["harli", "decode-only"]
    for s in report["summary"]:
        assert s["requests"] == 30 and s["rejected"] == 0
        assert s["slo_attainment"] >= 0.99, s
        assert s["exact_match_before"] <= 0.2
    harli = report["summary"][0]
    assert harli["finetune_tokens"] > 0 and harli["exact_match_after"] > harli["exact_match_before"]
    assert "exact after" in stdout.getvalue()
