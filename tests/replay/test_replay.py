"""`harli replay` end to end on the tiny model: the default comparison (harli and decode-only in the decode role)
held to one measured SLO, the colocated role with static's layers and cobatch's token budget chosen by the offline
sweep (with the program shapes given), the report files, a profiler session, an interrupted replay. The option
checks, the knobs' candidates and the sweep's choice run without an engine."""

import contextlib
import csv
import gzip
import io
import json
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO
from harli_jax.errors import ConfigError, HarliError
from harli_jax.replay import run as replay
from harli_jax.replay.options import build_parser, resolve_options
from harli_jax.replay.report import RunResult
from harli_jax.replay.trace import Trace, TraceRequest, synthesize, write_trace
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.request import FinishReason, GenerationOutput, Request

REQUESTS = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A short trace (its last request longer than the context: shrunk) and a replay config for a CPU (tolerant:
    harli keeps half the SLO as its margin)."""
    root = tmp_path_factory.mktemp("replay")
    trace = synthesize("poisson", num_requests=REQUESTS - 1, rate=20.0, seed=1, prompt_mean=20, output_mean=10)
    long = TraceRequest(trace.duration + 0.05, 150, 30)  # 180 tokens > the 128-token context
    path = write_trace(Trace((*trace.requests, long)), root / "trace.csv")
    config = root / "replay.yaml"
    config.write_text(f"model: {REPO / 'configs' / 'models' / 'tiny.yaml'}\n"
                      "max_batch: 4\nmax_seq_len: 128\nmicro_batch_rows: 2\nseq_len: 32\ntpot_slo: 100x\n"
                      "sweep_requests: 4\nfused_tokens: 8\nfused_layers: 1\nbatch_buckets: 4\nslo_margin: 0.5\n")
    return root, path, config


def _main(argv) -> tuple[int, str, str]:
    """`harli replay` with its stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = replay.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def decode_run(inputs):
    """The default replay (harli and decode-only, the decode role) with a profiler session."""
    root, trace, config = inputs
    out, profile = root / "decode", root / "profile"
    code, stdout, stderr = _main(["--config", str(config), "--trace", str(trace), "--out", str(out),
                                  "--profile", str(profile), "--export-adapter", str(root / "adapters")])
    assert code == 0, stderr
    return out, profile, stdout, stderr, json.loads((out / "summary.json").read_text())


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_default_replay_compares_harli_with_decode_only_in_the_decode_role(decode_run):
    out, profile, stdout, stderr, report = decode_run
    assert [s["policy"] for s in report["summary"]] == ["harli", "decode-only"]
    for s in report["summary"]:
        assert s["role"] == "decode" and s["requests"] == REQUESTS and s["rejected"] == 0
        assert s["slo_attainment"] >= 0.99, s
        assert s["tbt_attainment"] is not None and s["tbt_p99_ms"] is not None
    assert report["summary"][0]["finetune_tokens"] > 0
    assert report["setup"]["role"] == "decode" and report["setup"]["prefilled"] == REQUESTS
    # Only decode ran on the decoding engines: every prompt came with its K/V.
    for policy in ("harli", "decode-only"):
        steps = _rows(out / f"steps-{policy}.csv")
        assert steps and all(row["prefill_seqs"] == "0" for row in steps), policy
    for line in ("TPOT SLO ms", "TBT cap ms", "fused steps", "harli: hybrid", "decode-only: no training",
                 "harvest: finetune tokens/s during the replay"):
        assert line in stdout, line
    assert "prefill: prompts 12/12" in stderr
    # The job's held-out samples, scored on the base model once and after each policy's replay.
    assert "the finetune job's held-out samples on the base model" in stderr
    assert "exact before" in stdout and "exact after" in stdout
    for s in report["summary"]:
        assert 0 <= s["exact_match_before"] <= 1 and 0 <= s["exact_match_after"] <= 1
        assert s["eval_loss_after"] > 0 and s["eval_loss_before"] == report["summary"][0]["eval_loss_before"]
    harli, decode_only = report["summary"]
    assert decode_only["fused_steps"] == 0 and decode_only["fused_by_kind"] == {}
    assert harli["fused_steps"] == sum(harli["fused_by_kind"].values())
    assert set(harli["fused_by_kind"]) <= {"forward", "backward"}  # harli fuses windows, never token chunks
    kinds = {"forward", "backward", "backward+commit"}  # a window never ends the forward; the last slice commits
    fused = [row["fused"] for row in _rows(out / "steps-harli.csv") if row["fused"]]
    assert len(fused) == harli["fused_steps"] and all(f.split(":")[0] in kinds for f in fused)
    # The predictor's errors per stage, every key present; the windows' stage is the table's MAPE.
    stages = harli["predictor_stages"]
    assert list(stages) == ["step", "fused", "window"]
    assert all(set(e) == {"samples", "mape", "p99_ape", "under_prediction_rate"} for e in stages.values())
    assert stages["step"]["samples"] > 0 and stages["window"]["mape"] == harli["predictor_mape"]
    assert "harli: predictor step " in stdout


def test_every_policy_is_held_to_the_one_slo_measured_before_them(decode_run):
    *_, stderr, report = decode_run
    slo = report["slo"]
    assert slo["tpot_slo_ms"] == pytest.approx(100 * slo["solo_decode_step_ms"])
    assert slo["tbt_slo_ms"] == pytest.approx(2 * slo["tpot_slo_ms"])  # the TBT cap's default
    assert 1 <= slo["solo_batch"] <= 4 and slo["solo_gaps"] >= 3
    assert report["environment"]["tpot_slo_ms"] == slo["tpot_slo_ms"]
    assert {s["tpot_slo_ms"] for s in report["summary"]} == {slo["tpot_slo_ms"]}
    assert {s["tbt_slo_ms"] for s in report["summary"]} == {slo["tbt_slo_ms"]}
    assert stderr.count("solo decode step at the peak batch") == 1


def test_the_report_files_and_the_profile(decode_run):
    out, profile, _, stderr, report = decode_run
    for name in ("timeline-harli.png", "timeline-decode-only.png", "comparison.png", "requests-harli.csv",
                 "steps-decode-only.csv", "loss-harli.csv", "loss-decode-only.csv"):
        assert (out / name).stat().st_size > 0, name
    assert report["trace"]["shrunk_to_fit"] == 1 and f"1 of {REQUESTS} requests shrunk" in stderr
    # The predictor's calibrations are kept beside the compilation cache (the next replay loads them), not per run.
    assert not (out / "calibration").exists()
    assert list((Path(jax.config.jax_compilation_cache_dir) / "harli-calibration").glob("predictor-*.json"))
    traces = list((profile / "harli").rglob("*.trace.json.gz"))
    assert traces, "no profiler trace written"
    assert b"inference" in gzip.open(traces[0]).read()


def test_each_policys_trained_adapter_is_exported(decode_run):
    out, *_ = decode_run
    for policy in ("harli", "decode-only"):
        directory = out.parent / "adapters" / policy
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "tiny" and config["peft_type"] == "LORA"
        weights = safetensors.numpy.load_file(str(directory / "adapter_model.safetensors"))
        trained = any(k.endswith("lora_B.weight") and np.abs(v).max() > 0 for k, v in weights.items())
        assert trained or policy != "harli"  # B starts at zero: harli trained (decode-only may not have)


def test_the_finetune_job_follows_a_finite_schedule(decode_run):
    out, *_, report = decode_run
    total = report["setup"]["finetune_total_steps"]
    assert 2 <= total < 10**6
    loss = _rows(out / "loss-harli.csv")
    assert list(loss[0]) == ["step", "time_s", "loss", "grad_norm", "tokens"]
    steps = [int(row["step"]) for row in loss]
    assert steps == sorted(steps) and steps[-1] <= total and all(float(row["grad_norm"]) >= 0 for row in loss)
    harli = report["summary"][0]
    assert harli["finetune_total_steps"] == total and harli["finetune_steps"] == steps[-1]


def test_the_colocated_role_with_static_and_cobatch_knobs_chosen_by_the_sweep(inputs):
    root, trace, config = inputs
    out = root / "colocated"
    code, stdout, stderr = _main(["--config", str(config), "--trace", str(trace), "--out", str(out), "--role",
                                  "colocated", "--policy", "static,cobatch", "--max-requests", "8",
                                  "--fused-tokens", "8", "--fused-layers", "1", "--batch-buckets", "2",
                                  "--prefill-chunk", "8", "--prefill-interval", "3"])
    assert code == 0, stderr
    report = json.loads((out / "summary.json").read_text())
    static, cobatch = report["summary"]
    assert static["role"] == "colocated" and static["requests"] == 8 and report["setup"]["prefilled"] == 0
    steps = _rows(out / "steps-static.csv")
    assert any(int(row["prefill_seqs"]) for row in steps)  # prompts prefilled here
    # A mixed step was measured; every engine paced prompt chunks (8 tokens: prompts take several) beside
    # decoding requests to one in 3 steps.
    assert report["slo"]["mixed_step_ms"] > 0 and report["slo"]["prefill_interval"] == 3
    assert report["slo"]["mixed_step"]["chunk"] == 8 and "prefill paced to a chunk every 3 steps" in stderr
    chunk = [int(row["prefill_tokens"]) > 1 for row in steps]
    paced = [i for i, row in enumerate(steps) if chunk[i] and int(row["decode_seqs"])]
    assert paced and all(i >= 2 and not chunk[i - 1] and not chunk[i - 2] for i in paced), paced
    assert report["options"]["fused_tokens"] == [8] and report["options"]["batch_buckets"] == [2]
    static_sweep, cobatch_sweep = report["sweeps"]
    assert static_sweep["policy"] == "static" and static_sweep["field"] == "static_layers"
    assert static_sweep["requests"] == 4
    assert set(static_sweep["attainment"]) <= {"1", "2"} and static_sweep["chosen"] in (0, 1, 2)
    assert static["settings"] == {"static_layers": static_sweep["chosen"]}
    # cobatch's budget: 2 rows x the one fused chunk of 8 is 16, which leaves no room beside a decoded token, so
    # the one candidate is the most a step can use, 4 decoded + 16 fused tokens.
    assert cobatch_sweep["policy"] == "cobatch" and cobatch_sweep["field"] == "cobatch_tokens"
    assert list(cobatch_sweep["attainment"]) == ["20"] and cobatch_sweep["chosen"] in (1, 20)
    assert cobatch["settings"] == {"cobatch_tokens": cobatch_sweep["chosen"]}
    fused = {row["fused"] for row in _rows(out / "steps-cobatch.csv")} - {""}
    assert fused <= {"tokens:8", "tokens+last:8", "backward:1", "backward+commit:1"}
    assert cobatch["fused_steps"] == sum(cobatch["fused_by_kind"].values())
    assert static["fused_steps"] == 0
    for line in ("static: a fixed number of layers", "cobatch: FlexLLM's token-level co-serving", "colocated role"):
        assert line in stdout, line


def test_interrupted_replay_writes_a_partial_report_and_a_checkpoint(inputs, monkeypatch):
    root, trace, config = inputs
    serve = Engine.serve

    def interrupted(*args, **kwargs):
        for i, event in enumerate(serve(*args, **kwargs)):
            if i == 20:
                raise KeyboardInterrupt
            yield event

    monkeypatch.setattr(Engine, "serve", interrupted)
    out = root / "interrupted"
    code, _, stderr = _main(["--config", str(config), "--trace", str(trace), "--out", str(out), "--policy", "harli"])
    assert code == 130
    assert "interrupted" in stderr and str(out / "checkpoint-harli") in stderr
    report = json.loads((out / "summary.json").read_text())
    assert report["summary"][0]["interrupted"] and report["summary"][0]["requests"] < REQUESTS
    assert any((out / "checkpoint-harli").iterdir())


# Checks before anything compiles -----------------------------------------------------------------------------


BAD_OPTIONS = [
    (["--policy", "fifo"], "unknown policy fifo"),
    (["--policy", "harli,harli"], "policy harli named more than once"),
    (["--role", "prefill"], "--role must be one of decode, colocated"),
    (["--tpot-slo", "fast"], "--tpot-slo must look like"),
    (["--tpot-slo", "0ms"], "--tpot-slo must be positive, got '0ms'"),
    (["--tbt-slo", "0x"], "--tbt-slo must be positive"),
    (["--ttft-slo", "2x"], "--ttft-slo takes a time ('500ms'), not a multiple"),
    (["--max-requests", "0"], "--max-requests must be positive, got '0'"),
    (["--max-requests", "2.5"], "--max-requests must be an integer, got '2.5'"),
    (["--rate-scale", "0"], "--rate-scale must be positive"),
    (["--rate-scale", "-2"], "--rate-scale must be positive"),
    (["--time-scale", "0"], "--time-scale must be positive"),
    (["--duration", "-1"], "--duration must be positive"),
    (["--duration", "soon"], "--duration must be a number, got 'soon'"),
    (["--max-batch", "abc"], "--max-batch must be an integer, got 'abc'"),
    (["--sweep-requests", "-1"], "--sweep-requests must be non-negative"),
    (["--finetune-steps", "0"], "--finetune-steps must be positive"),
    (["--prefill-interval", "0", "--role", "colocated"], "--prefill-interval must be positive, got '0'"),
    (["--prefill-interval", "2"], "--prefill-interval paces prefill on the decoding engine: it applies to --role "
                                  "colocated"),
    (["--prefill-chunk", "-8"], "--prefill-chunk must be positive"),
    (["--fused-tokens", "8,x"], "--fused-tokens must be positive integers, comma-separated, got '8,x'"),
    (["--fused-tokens", "12"], "fused_tokens [12] must each be seq_len (32) halved 0 to 3 times"),
    (["--fused-layers", "0"], "--fused-layers must be positive integers"),
    (["--batch-buckets", "2,9"], "SchedulerConfig.batch_buckets must lie in [1, max_batch=4]"),
    (["--trace", "nope.csv"], "--trace not found: nope.csv"),
    (["--model", "nope.yaml"], "--model not found"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_OPTIONS, ids=[" ".join(f) for f, _ in BAD_OPTIONS])
def test_a_bad_option_fails_at_once_and_leaves_no_run_directory(inputs, flags, message):
    root, trace, config = inputs
    out = root / "never"
    started = time.perf_counter()
    code, _, stderr = _main(["--config", str(config), "--trace", str(trace), "--out", str(out), *flags])
    assert code == 2 and message in stderr, stderr
    assert stderr.startswith("harli replay: error:")
    assert not out.exists()
    assert time.perf_counter() - started < 5  # before any model is built or program compiled


def test_options_resolve_from_defaults_config_and_flags(inputs):
    root, trace, config = inputs
    options = resolve_options(build_parser().parse_args(["--config", str(config), "--max-batch", "8"]))
    assert options["policies"] == ["harli", "decode-only"] and options["role"] == "decode"
    assert options["max_batch"] == 8 and options["max_seq_len"] == 128  # the flag over the file over the default
    assert str(options["slo"]["tpot_slo"]) == "100x" and options["slo"]["tbt_slo"] is None
    assert options["slo"]["ttft_slo"] is None and options["sweep_requests"] == 4
    assert (options["fused_tokens"], options["fused_layers"], options["batch_buckets"]) == ((8,), (1,), (4,))
    assert options["slo_margin"] == 0.5 and replay.engine_config(options, "harli", root).colocation.slo_margin == 0.5
    lists = root / "lists.yaml"
    lists.write_text(f"{config.read_text()}fused_tokens: [4, 8]\nfused-layers: 1\nbatch_buckets: '2,4'\n")
    options = resolve_options(build_parser().parse_args(["--config", str(lists), "--fused-tokens", "16"]))
    assert (options["fused_tokens"], options["fused_layers"], options["batch_buckets"]) == ((16,), (1,), (2, 4))
    engine = replay.engine_config(options, "cobatch", root, cobatch_tokens=20)
    assert engine.colocation.fused_tokens == (16,) and engine.colocation.fused_layers == (1,)
    assert engine.scheduler.batch_buckets == (2, 4) and engine.colocation.cobatch_tokens == 20
    bad = root / "bad.yaml"
    bad.write_text("max_batch: 4\nbatch_size: 8\n")
    with pytest.raises(ConfigError, match=r"unknown replay option\(s\) \['batch_size'\]"):
        resolve_options(build_parser().parse_args(["--config", str(bad)]))
    bad.write_text("max_batch: many\n")
    with pytest.raises(ConfigError, match="--max-batch must be an integer, got 'many'"):
        resolve_options(build_parser().parse_args(["--config", str(bad)]))


def test_a_run_that_fails_after_its_directory_was_made_removes_it(inputs, monkeypatch):
    root, trace, config = inputs

    def failing(*args, **kwargs):
        raise HarliError("the device went away")

    monkeypatch.setattr(replay, "prepare", failing)
    out = root / "failed"
    code, _, stderr = _main(["--config", str(config), "--trace", str(trace), "--out", str(out)])
    assert code == 2 and "the device went away" in stderr and not out.exists()
    kept = root / "kept"
    (kept / "mine").mkdir(parents=True)  # a directory the run did not make stays
    assert _main(["--config", str(config), "--trace", str(trace), "--out", str(kept)])[0] == 2
    assert (kept / "mine").is_dir()


# The offline sweep, on made-up runs --------------------------------------------------------------------------


def _result(policy, tpots, slo=0.01):
    outputs = [GenerationOutput(request_id=f"r{i}", prompt_ids=(1,), token_ids=(1, 2), text=None,
                                finish_reason=FinishReason.LENGTH, arrival_time=0.0, first_token_time=0.0,
                                token_times=(0.0, t)) for i, t in enumerate(tpots)]
    return RunResult(policy=policy, role="decode", tpot_slo=slo, tbt_slo=2 * slo, ttft_slo=None, outputs=outputs,
                     steps=[], wall_s=1.0, start=0.0, finetune_tokens=0, loss_history=[],
                     standalone_tokens_per_s=None, predictor={}, reclaims=0, abandoned=0)


@pytest.mark.parametrize(("misses_from", "chosen", "tried"), [(3, 2, [1, 2, 3]), (1, 0, [1]), (9, 4, [1, 2, 3, 4])])
def test_the_sweep_takes_the_largest_value_that_keeps_the_slo(monkeypatch, tmp_path, misses_from, chosen, tried):
    ran = []

    def fake_run(setup, policy, slo, out, *, settings, requests, name, checkpoint, score):
        (value,) = settings.values()
        ran.append((value, len(requests), checkpoint or score))
        return _result(policy, [0.02 if value >= misses_from else 0.005] * len(requests))

    monkeypatch.setattr(replay, "run_policy", fake_run)
    setup = replay.Setup(model=None, trace=Trace(()), requests=[Request([1], request_id=f"r{i}") for i in range(10)],
                         prefilled={}, options={}, solo=None, standalone=None, prefill_s=0.0,
                         mixed=None, base_eval=None)
    knob = replay.Knob("static_layers", (1, 2, 3, 4), fallback=0)
    result = replay.sweep(setup, "static", knob, slo=None, out=tmp_path, requests=6)
    assert result.chosen == chosen and list(result.attainment) == tried
    assert [r for r, *_ in ran] == tried and all(n == 6 and not ckpt for _, n, ckpt in ran)
    assert result.as_dict()["attainment"] == {str(v): (0.0 if v >= misses_from else 1.0) for v in tried}


def test_the_slo_base_runs_in_the_page_bucket_of_the_longest_request(tiny_yaml):
    # The solo and mixed steps are measured with every sequence at the trace's longest context (capped so their
    # decoded tokens fit the engine's): the page bucket decode-only runs its peak in. A request as long as the
    # context once made the mixed step's requests too long to submit.
    from harli_jax.model.loader import load_model
    from harli_jax.runtime.config import EngineConfig

    engine = Engine(load_model(tiny_yaml), EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=16,
                                                        page_buckets=(2, 8), num_pages=64, compile_threads=2))
    trace = Trace((TraceRequest(0.0, 10, 4), TraceRequest(0.1, 100, 27)))  # the second fills the context
    solo, mixed = replay.measure_slo_base(engine, trace, seed=0, role="colocated")
    assert solo.context == 128 - replay.SOLO_GAPS - replay.MIXED_CHUNKS and solo.bucket_pages == 8
    assert solo.bucket_seqs >= solo.batch and solo.seconds > 0 and mixed is not None and mixed.seconds > 0


@pytest.mark.parametrize(("options", "candidates"), [
    (dict(max_batch=16, micro_batch_rows=1, seq_len=64), (16, 24)),  # a chunk of 8: the default
    (dict(max_batch=16, micro_batch_rows=1, seq_len=64, fused_tokens=(8, 16)), (16, 32)),
    (dict(max_batch=128, micro_batch_rows=1, seq_len=64), (16, 32, 64, 128, 136)),
    (dict(max_batch=8, micro_batch_rows=4, seq_len=64, fused_tokens=(8, 32)), (64, 128, 136)),
])
def test_the_knobs_candidates_ascend_from_the_least_that_trains_to_the_most_a_step_uses(options, candidates):
    from harli_jax.model.config import ModelConfig

    cfg = ModelConfig.from_yaml(Path(__file__).parents[2] / "configs" / "models" / "small.yaml")  # 8 layers
    knob = replay.KNOBS["cobatch"](cfg, options)
    assert (knob.field, knob.candidates, knob.fallback) == ("cobatch_tokens", candidates, 1)
    assert replay.KNOBS["static"](cfg, options).candidates == (1, 2, 4, 8)


def test_the_decode_role_refuses_prompt_kv_beyond_half_the_available_memory(monkeypatch):
    from harli_jax.model.config import ModelConfig

    cfg = ModelConfig.from_yaml(Path(__file__).parents[2] / "configs" / "models" / "tiny.yaml")  # 8 KiB a page
    trace = Trace((TraceRequest(0.0, 20, 4), TraceRequest(1.0, 40, 4)))  # 2 + 3 pages
    monkeypatch.setattr(replay, "available_memory", lambda: 2**20)
    assert replay.check_prefill_memory(trace, cfg, 16) == 5 * 8192
    monkeypatch.setattr(replay, "available_memory", lambda: 2**16)
    with pytest.raises(ConfigError, match=r"2 requests need 0.04 MiB, more than 50% of the 0.06 MiB available"):
        replay.check_prefill_memory(trace, cfg, 16)


@pytest.mark.parametrize(("tpot", "decode", "mixed", "interval"), [
    (20.0, 10.0, 30.0, 2), (25.0, 10.0, 100.0, 6), (25.0, 10.0, 101.0, 7),
    (20.0, 10.0, 20.0, 1),  # a mixed step within the SLO by itself: no pacing
    (10.0, 12.0, 50.0, 1),  # decode alone misses the SLO: pacing cannot help
])
def test_prefill_interval_is_the_fewest_steps_that_keep_the_mean_gap_within_the_slo(tpot, decode, mixed, interval):
    assert replay.prefill_interval_for(tpot, decode, mixed) == interval
    if decode < tpot < mixed:
        def mean(n):
            return (mixed + (n - 1) * decode) / n
        assert mean(interval) <= tpot < mean(interval - 1)
