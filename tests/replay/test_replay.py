"""`harli replay`: a comparison of two policies in one invocation, the report files, a profiler session, and an
interrupted replay."""

import gzip
import json

import pytest

from harli_jax.replay import run as replay
from harli_jax.replay.trace import synthesize, write_trace


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    trace = write_trace(synthesize("poisson", num_requests=12, rate=12.0, seed=1, prompt_mean=20, output_mean=8),
                        root / "trace.csv")
    config = root / "replay.yaml"
    config.write_text("max_batch: 4\nmax_seq_len: 128\nmicro_batch_rows: 2\nseq_len: 32\ntpot_slo: 20x\n")
    return root, trace, config


def test_two_policies_one_comparison_with_plots_and_profile(small_run, capsys):
    root, trace, config = small_run
    out, profile = root / "out", root / "profile"
    code = replay.main(["--config", str(config), "--trace", str(trace), "--policy", "harli,decode-only",
                        "--out", str(out), "--profile", str(profile)])
    assert code == 0
    table = capsys.readouterr().out
    assert "harli" in table and "decode-only" in table and "SLO ok" in table
    report = json.loads((out / "summary.json").read_text())
    assert [s["policy"] for s in report["summary"]] == ["harli", "decode-only"]
    for s in report["summary"]:
        assert s["requests"] == 12 and s["slo_attainment"] is not None and s["finetune_tokens"] > 0
    for name in ("timeline-harli.png", "timeline-decode-only.png", "comparison.png", "requests-harli.csv",
                 "steps-decode-only.csv"):
        assert (out / name).stat().st_size > 0, name
    traces = list((profile / "harli").rglob("*.trace.json.gz"))
    assert traces, "no profiler trace written"
    assert b"inference" in gzip.open(traces[0]).read()


def test_interrupted_replay_writes_a_partial_report_and_a_checkpoint(small_run, monkeypatch, capsys):
    root, trace, config = small_run
    serve = replay.Engine.serve

    def interrupted(self, requests, **kwargs):
        for i, event in enumerate(serve(self, requests, **kwargs)):
            if i == 20:
                raise KeyboardInterrupt
            yield event

    monkeypatch.setattr(replay.Engine, "serve", interrupted)
    out = root / "interrupted"
    assert replay.main(["--config", str(config), "--trace", str(trace), "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and str(out / "checkpoint-harli") in err
    report = json.loads((out / "summary.json").read_text())
    assert report["summary"][0]["interrupted"] and report["summary"][0]["requests"] < 12
    assert any((out / "checkpoint-harli").iterdir())


def test_bad_options_are_clear_errors(small_run, capsys):
    root, trace, config = small_run
    assert replay.main(["--trace", str(trace), "--policy", "fifo", "--out", str(root / "x")]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert replay.main(["--trace", str(trace), "--tpot-slo", "fast", "--out", str(root / "y")]) == 2
    assert "--tpot-slo must look like" in capsys.readouterr().err
    assert replay.main(["--trace", str(root / "nope.csv"), "--out", str(root / "z")]) == 2
    assert "trace file not found" in capsys.readouterr().err
