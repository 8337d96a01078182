"""The benchmark scripts: the interleaving helper of bench/common.py (no model), and a --quick run of each script
in a subprocess whose JSON must hold real content (every attempt with its load and validity, figures that are
the medians of the valid attempts, ratios made of those figures, one SLO for every co-location policy)."""

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import common  # noqa: E402  (bench/common.py)


class ScriptedMeter:
    """A LoadMeter stand-in: the share it reports for an attempt is the next one scripted for the side that ran."""

    def __init__(self, script: dict[str, list], running: list[str]):
        self.script, self.running = script, running

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        side = self.running[-1]
        shares = self.script.get(side, [])
        self.record = {"other_processes_cpu_share": shares.pop(0) if shares else 0.0}
        return False


def sides_calling(names, running: list[str], values=None):
    def make(name):
        def run():
            running.append(name)
            return {"value": values[name].pop(0)} if values else {"value": 1.0}
        return run
    return {name: make(name) for name in names}


def quiet_log(*_):
    pass


# bench/common.py ---------------------------------------------------------------------------------------------


def test_interleave_randomizes_the_order_per_round_and_records_it():
    running: list[str] = []
    names = ["ours", "hf", "copy", "other"]
    cmp = common.interleave(sides_calling(names, running), 6, seed=3, max_share=0.1, max_retries=2,
                            meter=ScriptedMeter({}, running), log=quiet_log)
    assert len(cmp["order"]) == 6 and all(sorted(o) == sorted(names) for o in cmp["order"])
    assert [n for o in cmp["order"] for n in o] == running  # the recorded order is the order they ran in
    assert [a["side"] for a in cmp["attempts"]] == running
    assert len({tuple(o) for o in cmp["order"]}) > 1  # not one fixed order
    assert cmp["seed"] == 3 and cmp["rounds"] == 6
    def order(seed):
        ran: list[str] = []
        return common.interleave(sides_calling(names, ran), 6, seed=seed, max_share=0.1, max_retries=2,
                                 meter=ScriptedMeter({}, ran), log=quiet_log)["order"]

    assert order(3) == cmp["order"]  # seeded
    assert order(4) != cmp["order"]


def test_interleave_repeats_a_loaded_attempt_then_marks_it_invalid():
    running: list[str] = []
    script = {"loaded": [0.5, 0.6, 0.7], "once": [0.3, 0.05], "unknown": [None, None, None], "quiet": [0.1]}
    cmp = common.interleave(sides_calling(script, running), 1, seed=0, max_share=0.1, max_retries=2,
                            meter=ScriptedMeter(script, running), log=quiet_log)
    by_side = {s: [a for a in cmp["attempts"] if a["side"] == s] for s in script}
    assert [a["valid"] for a in by_side["loaded"]] == [False, False, False]  # 1 + max_retries tries, all kept
    assert [a["try"] for a in by_side["loaded"]] == [0, 1, 2]
    assert [a["valid"] for a in by_side["once"]] == [False, True]  # repeated once, then valid: no more tries
    assert [a["valid"] for a in by_side["unknown"]] == [False, False, False]  # an unmeasured load is not valid
    assert [a["valid"] for a in by_side["quiet"]] == [True]  # at the threshold is within it
    assert running.count("loaded") == 3 and running.count("once") == 2 and running.count("quiet") == 1
    for a in cmp["attempts"]:
        assert "other_processes_cpu_share" in a["load"] and isinstance(a["valid"], bool) and "result" in a
    assert [a["load"]["other_processes_cpu_share"] for a in by_side["loaded"]] == [0.5, 0.6, 0.7]


def test_figures_are_medians_over_valid_attempts_and_ratios_need_both():
    running: list[str] = []
    values = {"a": [1.0, 100.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0], "c": [7.0, 8.0, 9.0, 10.0, 11.0, 12.0]}
    script = {"a": [0.0, 0.9, 0.0, 0.0], "b": [0.0, 0.0, 0.0], "c": [0.9] * 6}
    cmp = common.interleave(sides_calling(values, running, values), 3, seed=1, max_share=0.1, max_retries=1,
                            meter=ScriptedMeter(script, running), log=quiet_log)
    a, b = common.figure(cmp, "a", "value"), common.figure(cmp, "b", "value")
    assert a == {"median": 3.0, "valid_attempts": 3, "attempts": 4}  # 100.0 ran under load: left out
    assert b == {"median": 4.0, "valid_attempts": 3, "attempts": 3}
    assert common.figure(cmp, "a", lambda r: 2 * r["value"])["median"] == 6.0
    assert common.ratio(a["median"], b["median"]) == {"value": 0.75, "valid": True}
    c = common.figure(cmp, "c", "value")  # always loaded: no figure, and no ratio with it
    assert c == {"median": None, "valid_attempts": 0, "attempts": 6}
    assert common.ratio(c["median"], b["median"]) == {"value": None, "valid": False}
    assert common.ratio(a["median"], c["median"]) == {"value": None, "valid": False}
    assert [r["value"] for r in common.valid_results(cmp, "a")] == [1.0, 3.0, 5.0]


def test_load_meter_subtracts_this_process_from_the_machine(monkeypatch):
    # Machine busy at 0.6 of 2 CPUs, steal 0.1, this process 0.2 of them: other processes 0.4 of all CPUs.
    monkeypatch.setattr(common, "_cpu_seconds", lambda: (1.2 * time.perf_counter(), 0.2 * time.perf_counter(), 2))
    monkeypatch.setattr(common, "_own_cpu_seconds", lambda: 0.4 * time.perf_counter())
    with common.LoadMeter() as meter:
        time.sleep(0.2)
    record = meter.record
    assert record["other_processes_cpu_share"] == pytest.approx(0.4, abs=0.01)
    assert record["steal_share"] == pytest.approx(0.1, abs=0.01)
    assert record["own_cores_used"] == pytest.approx(0.4, abs=0.01) and record["cpus"] == 2


def test_load_meter_counts_the_processes_it_started_as_its_own():
    # A benchmark that runs its subject in subprocesses: one waited for inside the block, one still running at its
    # end; both busy for the whole block, so this side used about 1 CPU and nobody else did.
    import subprocess
    import sys

    spin = "import time\nend = time.time() + {}\nwhile time.time() < end: pass"
    with common.LoadMeter() as meter:
        subprocess.run([sys.executable, "-c", spin.format(1.0)], check=True)
        running = subprocess.Popen([sys.executable, "-c", spin.format(3.0)])
        time.sleep(1.0)
    running.wait()
    record = meter.record
    assert record["own_cores_used"] > 0.8, record
    assert record["other_processes_cpu_share"] < 0.2, record  # on 2 CPUs, the children were 0.5 of them


def test_load_meter_wait_for_quiet_and_write_result(tmp_path):
    with common.LoadMeter() as meter:
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            pass
    record = meter.record
    assert 0.0 <= record["other_processes_cpu_share"] <= 1.0 and record["steal_share"] >= 0.0
    assert record["own_cores_used"] > 0.5 and record["wall_s"] >= 0.3
    quiet = common.wait_for_quiet(1.0, 0.0, sample=0.05, log=quiet_log)
    assert quiet["quiet"] is True and len(quiet["shares"]) == 1 and quiet["max_share"] == 1.0
    never = common.wait_for_quiet(-1.0, 0.25, sample=0.05, log=quiet_log)  # nothing is that quiet: it waits, gives up
    assert never["quiet"] is False and never["waited_s"] >= 0.25 and len(never["shares"]) >= 4
    path = common.write_result("unit", {"x": 1}, tmp_path)
    data = json.loads(path.read_text())
    assert data["x"] == 1 and data["command"]["argv"] == sys.argv
    assert re.fullmatch("[0-9a-f]{40}", data["git"]["commit"]) and isinstance(data["git"]["dirty"], bool)
    load = data["machine_load"]
    assert "loadavg" in load["start"] and "loadavg" in load["end"]
    assert "other_processes_cpu_share" in load["whole_run"]


# The scripts, --quick -----------------------------------------------------------------------------------------


def run_script(name: str, out: Path, *flags: str) -> dict:
    command = [sys.executable, str(REPO / "bench" / f"{name}.py"), "--quick", "--out", str(out), *flags]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300, cwd=REPO)
    files = list(out.glob(f"{name}-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["benchmark"] == name and data["command"]["argv"][1:] == command[2:]
    assert set(data["machine_load"]) == {"start", "end", "whole_run"}
    return data


def check_comparison(cmp: dict, sides: set[str]) -> None:
    """Every round runs every side, the order is recorded, every attempt has its load and a validity that
    follows the threshold."""
    assert len(cmp["order"]) == cmp["rounds"] and all(set(o) == sides and len(o) == len(sides) for o in cmp["order"])
    for a in cmp["attempts"]:
        share = a["load"]["other_processes_cpu_share"]
        assert isinstance(a["valid"], bool) and a["valid"] == (share is not None and share <= cmp["max_other_share"])
    for r in range(cmp["rounds"]):  # within a round the sides ran in the recorded order (repeats stay together)
        ran = [a["side"] for a in cmp["attempts"] if a["round"] == r]
        assert [s for i, s in enumerate(ran) if i == 0 or ran[i - 1] != s] == cmp["order"][r]


def valid_median(cmp: dict, side: str, get) -> float | None:
    values = [get(a["result"]) for a in cmp["attempts"] if a["side"] == side and a["valid"]]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def close(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9))


def test_decode_quick(tmp_path):
    data = run_script("decode", tmp_path)  # the default load threshold: valid or not, the JSON must add up
    cmp = data["comparison"]
    assert cmp["rounds"] == 2 and data["config"]["batches"] == [1, 2]
    check_comparison(cmp, {"ours@1", "ours@2", "hf@1", "hf@2", "copy", "copy_weight_sized", "prefill-ours",
                           "prefill-hf"})
    ours = {r["batch"]: r for r in data["ours"]}
    hf = {r["batch"]: r for r in data["hf"]}
    assert set(ours) == set(hf) == {1, 2}
    for row in data["ratios_ours_over_hf"]:
        b = row["batch"]
        o = valid_median(cmp, f"ours@{b}", lambda r: r["decode_tokens_per_s"])
        h = valid_median(cmp, f"hf@{b}", lambda r: r["decode_tokens_per_s"])
        assert close(ours[b]["decode_tokens_per_s"], o) and close(hf[b]["decode_tokens_per_s"], h)
        assert row["valid"] == (o is not None and h is not None)
        assert close(row["decode"], o / h if row["valid"] else None)
        assert 0.0 <= row["greedy_tokens_equal_share"] <= 1.0
    for a in cmp["attempts"]:
        if a["side"].startswith("ours"):
            assert a["result"]["decode_tokens_per_s"] > 0 and 0.0 <= a["result"]["pack_s_total"] < a["result"]["wall_s"]
    floor = data["memory_floor"]
    bandwidth = valid_median(cmp, "copy", lambda r: r["bytes_per_s"])
    assert close(floor["copy_bytes_per_s"], bandwidth)
    step = ours[1]["decode_step_median_s"]
    assert floor["valid"] == (bandwidth is not None and step is not None)
    if floor["valid"]:
        assert math.isclose(floor["step_over_floor"], step / (floor["weight_bytes"] / bandwidth))
    prefill = data["prefill"]
    o, h = (valid_median(cmp, f"prefill-{s}", lambda r: r["prefill_tokens_per_s"]) for s in ("ours", "hf"))
    assert prefill["valid"] == (o is not None and h is not None)
    assert close(prefill["ratio_ours_over_hf"], o / h if prefill["valid"] else None)
    for a in cmp["attempts"]:
        if a["side"] == "prefill-ours":
            assert math.isclose(a["result"]["prefill_tokens_per_s"], 4 * 24 / a["result"]["wall_s"])
    for b in (1, 2):
        share = valid_median(cmp, f"ours@{b}", lambda r: r["host_share_of_decode_step"])
        assert close(data["host_share_of_decode_step"]["by_batch"][str(b)], share) and (share is None or share > 0)


def test_finetune_quick(tmp_path):
    data = run_script("finetune", tmp_path, "--max-other-share", "1.0")  # every attempt valid: real ratios
    cmp = data["comparison"]
    modes = {"single", "single-remat", "micro-1", "micro-2"}
    assert set(data["results"]) == modes and data["reference"] == {"headline": "single", "secondary": "single-remat"}
    check_comparison(cmp, modes)
    assert cmp["rounds"] == 2 and all(a["valid"] for a in cmp["attempts"])
    trained = data["microbatch"]["trained_tokens"]
    assert all(a["result"]["trained_tokens"] == trained for a in cmp["attempts"])
    res = data["results"]
    single, remat = res["single"]["seconds_median"], res["single-remat"]["seconds_median"]
    for name, r in res.items():
        assert r["valid_attempts"] == 2 and close(r["seconds_median"], valid_median(cmp, name, lambda x: x["seconds"]))
        assert math.isclose(r["throughput_vs_single"], single / r["seconds_median"])
        assert math.isclose(r["throughput_vs_single_remat"], remat / r["seconds_median"])
        assert math.isclose(r["trained_tokens_per_s"], trained / r["seconds_median"])
    assert res["single"]["throughput_vs_single"] == 1.0 and res["single"]["remat"] is False
    assert res["single-remat"]["remat"] is True and res["micro-1"]["layers_per_chunk"] == 1
    assert "load" in data["programs"] and all("load" in b for b in data["micro_step_breakdown"].values())


def test_fused_quick(tmp_path):
    data = run_script("fused", tmp_path, "--max-other-share", "1.0")  # every attempt valid: real figures
    cmp, summary = data["comparison"], data["summary"]
    sides = {"rows:1", "rows:8", "rows:32"} | {side for b in (1, 2) for side in (
        f"decode:{b}", f"fused:{b}:tokens:8", f"fused:{b}:forward:1", f"fused:{b}:backward:1")}
    sides |= {f"micro:{kind}:{n}" for kind in ("forward", "backward") for n in data["sizes"]["layers"]}
    check_comparison(cmp, sides | {"micro:tokens:8"})
    assert all(a["valid"] for a in cmp["attempts"]) and summary["registration_s"] > 0

    def ms(side):
        return valid_median(cmp, side, lambda r: r) * 1e3

    layers, tokens = data["model"]["layers"], 32  # one row of 32 positions (--quick)
    assert all(close(summary["row_cost_ms"][str(n)], ms(f"rows:{n}")) for n in (1, 8, 32))
    micro = summary["micro_step_per_token_layer_ms"]
    assert close(micro["forward:1"], ms("micro:forward:1") / tokens)
    assert close(micro["tokens:8"], ms("micro:tokens:8") / (8 * layers))
    for b in ("1", "2"):
        row = summary["per_decode_batch"][b]
        chunk, window, backward = (row["fused"][k] for k in ("tokens:8", "forward:1", "backward:1"))
        assert close(row["decode_step_ms"], ms(f"decode:{b}"))
        assert math.isclose(chunk["per_token_layer_ms"], (ms(f"fused:{b}:tokens:8") - ms(f"decode:{b}")) / (8 * layers))
        assert math.isclose(chunk["vs_layer_micro_forward"], chunk["per_token_layer_ms"] / micro["forward:1"])
        assert math.isclose(window["per_token_layer_ms"], (ms(f"fused:{b}:forward:1") - ms(f"decode:{b}")) / tokens)
        assert math.isclose(window["vs_layer_micro_forward"], window["per_token_layer_ms"] / micro["forward:1"])
        assert math.isclose(backward["per_token_layer_ms"], (ms(f"fused:{b}:backward:1") - ms(f"decode:{b}")) / tokens)


def test_colocation_quick(tmp_path):
    from harli_jax.runtime.colocation import POLICIES

    data = run_script("colocation", tmp_path, "--max-other-share", "1.0")
    assert [(r["trace"], r["role"]) for r in data["results"]] == [("generated.csv", "decode"),
                                                                  ("generated.csv", "colocated")]
    for r in data["results"]:
        # One SLO base per trace and role, measured once before any run, with its load.
        base = r["slo_base"]
        assert base["valid"] is True and "other_processes_cpu_share" in base["load"] and base["solo_decode_step_ms"] > 0
        assert r["setup"]["prefilled"] == (r["trace_stats"]["requests"] if r["role"] == "decode" else 0)
        assert (base["mixed_step_ms"] is None) == (r["role"] == "decode")  # measured where prompts prefill here
        (key,) = r["slos"]
        entry = r["slos"][key]
        assert key == "3x" and entry["slo"]["tpot_slo_ms"] == pytest.approx(3 * base["solo_decode_step_ms"])
        cmp = entry["comparison"]
        check_comparison(cmp, set(POLICIES))
        # Every policy held to that SLO, static with the layers its sweep chose, cobatch with its token budget.
        assert {a["result"]["tpot_slo_ms"] for a in cmp["attempts"]} == {entry["slo"]["tpot_slo_ms"]}
        sweeps = {s["policy"]: s for s in entry["sweeps"]}  # in the order of --policy (POLICIES)
        assert list(sweeps) == [p for p in POLICIES if p in ("static", "cobatch")]
        static, cobatch = sweeps["static"], sweeps["cobatch"]
        assert entry["settings"]["static"] == {"static_layers": static["chosen"]} and static["requests"] == 4
        assert entry["settings"]["cobatch"] == {"cobatch_tokens": cobatch["chosen"]} and cobatch["requests"] == 4
        assert list(cobatch["attainment"]) == ["20"]  # 4 decoded + 2 rows x the one fused chunk of 8 (--quick)
        for policy, row in entry["table"].items():
            assert row["valid_attempts"] == 1
            for k in ("slo_attainment", "finetune_tokens_per_s", "harvest_ratio", "fused_steps"):
                assert close(row[k], valid_median(cmp, policy, lambda res, k=k: res[k]))
            for stage in ("step", "fused", "window"):
                mape = valid_median(cmp, policy, lambda res, s=stage: res["predictor_stages"][s]["mape"])
                assert close(row["predictor_stages"][stage]["mape"], mape)
        # The ablation: harli without fused steps, never a baseline; harli's tokens/s over it is reported.
        assert entry["table"]["harli-temporal"]["fused_steps"] == 0 and entry["best_baseline"] != "harli-temporal"
        fused = entry["fused_vs_temporal"]
        assert fused["valid"] and close(fused["value"], entry["table"]["harli"]["finetune_tokens_per_s"]
                                        / entry["table"]["harli-temporal"]["finetune_tokens_per_s"])
        assert entry["table"]["decode-only"]["fused_steps"] == 0
        best, ratio = entry["best_baseline"], entry["harli_vs_best_baseline"]
        assert ratio["valid"] == (best is not None)
        if best:
            assert entry["table"][best]["slo_attainment"] >= data["targets"]["attainment_min"]
            assert math.isclose(ratio["value"], entry["table"]["harli"]["finetune_tokens_per_s"]
                                / entry["table"][best]["finetune_tokens_per_s"])


def test_colocation_help_and_bad_flags(capsys):
    import colocation

    with pytest.raises(SystemExit) as done:
        colocation.parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(f in out for f in ("--role", "--slo", "--fused-tokens", "--fused-layers",
                                                           "--batch-buckets"))
    for flags, message in [(["--slo", "0x"], "--slo must be positive"),
                           (["--fused-tokens", "12"], "fused_tokens [12] must each be seq_len (64) halved"),
                           (["--trace", "configs/traces/default.csv,nope.csv"], "--trace not found: nope.csv")]:
        with pytest.raises(SystemExit) as done:
            colocation.parse_args(flags)
        assert done.value.code == 2 and message in capsys.readouterr().err, flags


def test_serve_hands_the_server_the_replays_engine_and_times_what_the_client_saw(tmp_path):
    """bench/serve.py's two pieces that decide its figures, without a server: the engine YAML `harli serve` is
    started with is the replay's engine, and the HTTP side's TPOT / attainment / throughput follow the replay's
    definitions over the chunk times the client received."""
    import serve

    from harli_jax.runtime.config import EngineConfig

    config = EngineConfig(max_batch=8, batch_buckets=(4, 8), fused_tokens=(8,), tpot_slo_ms=12.5,
                          prefill_interval=3, max_loras=1, policy="harli")
    assert EngineConfig.from_yaml(serve.engine_yaml(config, tmp_path / "e.yaml")) == config
    results = [{"sent": 0.0, "chunks": [0.1, 0.2, 0.3], "tokens": 3},  # TPOT 0.1
               {"sent": 1.0, "chunks": [1.2, 1.5], "tokens": 4},  # TPOT 0.1: 4 tokens, two of them without text
               {"sent": 2.0, "chunks": [2.5, 3.5], "tokens": 2},  # TPOT 1.0
               {"sent": 3.0, "chunks": [3.1], "tokens": 1}]  # one token: no TPOT
    row = serve.http_summary(results, tpot_slo=0.15, wall=10.0, trained=500)
    assert row["requests"] == 4 and row["timed"] == 3 and row["slo_attainment"] == pytest.approx(2 / 3)
    assert row["tpot_p50_ms"] == pytest.approx(100.0) and row["ttft_p50_ms"] == pytest.approx(150.0)
    assert row["finetune_tokens_per_s"] == 50.0


def test_paged_attention_quick(tmp_path):
    data = run_script("paged_attention", tmp_path)
    rows = data["results"]
    assert {r["impl"] for r in rows} == {"reference", "pallas"}
    assert {(r["batch"], r["context"]) for r in rows} == {(1, 64), (1, 200), (3, 64), (3, 200)}
    for r in rows:  # bf16 inputs against float64 attention over the same pages: within bf16 rounding
        assert r["checked_sequences"] == r["batch"] and r["dense_f64_max_abs"] > 0.1
        assert 0.0 < r["max_abs_err_vs_dense_f64"] < 1e-2 and r["seconds"] > 0
    assert data["copy_bandwidth"]["distinct_output"] is True and data["copy_bandwidth"]["bytes_per_s"] > 0
    # The ragged step: 3 sequences, 1 or 3 of them with an 8-token chunk, the others a decode token, 5 padding rows.
    ragged = data["ragged"]["results"]
    assert {r["impl"] for r in ragged} == {"reference", "pallas"}
    assert {(r["prefill_seqs"], r["context"]) for r in ragged} == {(1, 64), (3, 64)}
    for r in ragged:
        assert r["tokens"] == 8 * r["prefill_seqs"] + r["decode_seqs"] + 5 and r["decode_seqs"] == 3 - r["prefill_seqs"]
        assert r["checked_sequences"] == [0, 1, 2] and r["padding_rows_zero"] is True
        assert r["dense_f64_max_abs"] > 0.1 and 0.0 < r["max_abs_err_vs_dense_f64"] < 1e-2
        assert r["seconds"] > 0 and r["bytes_per_s"] > 0 and r["flops_per_s"] > 0
        if r["impl"] == "pallas":  # interpreted on a CPU
            assert r["interpret"] is True and r["max_abs_err_vs_reference"] < 2e-2
            assert r["bytes_if_each_query_block_rereads"] >= r["bytes"]
        else:
            assert r["long_rows"] == r["prefill_seqs"]


def test_paged_attention_ragged_oracle_cost_and_checked_sequences():
    import jax
    import numpy as np
    import paged_attention as pa  # bench/paged_attention.py

    from harli_jax.kernels import ragged_paged_attention_reference

    # In float32 the float64 oracle and the reference agree to rounding: the oracle's causal window is right.
    args = pa.parse_args("cpu", ["--quick", "--dtype", "float32", "--ragged-pad", "3"])
    case = pa.make_ragged_inputs(args, 2, 40, jax.random.key(1))
    starts = np.asarray(case[4])
    assert starts.tolist() == [0, 8, 16, 17] and case[0].shape[0] == 20
    oracle = pa.ragged_dense_f64(*case, [0, 1, 2])
    out = np.asarray(jax.jit(ragged_paged_attention_reference, static_argnames=("max_query", "long_rows"))(
        *case, max_query=8, long_rows=2))
    for b in range(3):
        np.testing.assert_allclose(out[starts[b]:starts[b + 1]], oracle[b], atol=2e-6, rtol=0)
    assert not np.allclose(oracle[0][0], oracle[0][-1], atol=1e-3)  # the chunk's queries see different keys
    # 4 * head_dim FLOPs per (query head, visible key): queries at positions 38 and 39 of a 40-token context.
    one = pa.parse_args("cpu", ["--quick", "--ragged-batch", "1", "--ragged-prefill", "1", "--ragged-chunk", "2",
                                "--ragged-pad", "0"])
    assert pa.ragged_cost(one, 1, 40)[1] == 4 * one.head_dim * one.q_heads * (39 + 40)
    assert pa.ragged_checked_sequences(32, 8, 8) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert pa.ragged_checked_sequences(32, 32, 8) == list(range(8))  # no decode sequence: all chunked
    assert pa.ragged_checked_sequences(32, 0, 8) == list(range(8))
    assert pa.ragged_checked_sequences(3, 1, 0) == [0, 1, 2]


def test_finetune_accuracy_quick(tmp_path):
    data = run_script("finetune_accuracy", tmp_path)
    (run,) = data["runs"]
    assert run["steps"] == 20 and run["trained_tokens"] > 0
    assert run["eval_loss_after"] < run["eval_loss_before"]
    for side in ("base", "tuned"):
        scored = run[side]
        assert scored["scored"] == 20 and scored["exact_match"] == scored["correct"] / 20
    assert data["summary"]["tuned_exact_match_max"] == run["tuned"]["exact_match"]
    assert "other_processes_cpu_share" in data["load"]


def test_compile_time_quick(tmp_path):
    data = run_script("compile_time", tmp_path)
    cold, warm = data["engine"]["cold_cache"], data["engine"]["warm_cache"]
    assert cold["programs"] == warm["programs"] == 2 * len(cold["batch_buckets"]) * len(cold["page_buckets"])
    assert data["engine"]["warm_over_cold"] == warm["engine_init_s"] / cold["engine_init_s"]
    abstract = data["abstract"]
    assert abstract["layers"] == 2 and abstract["dtype"] == "bfloat16" and abstract["weight_bytes"] > 0
    assert abstract["decode"]["tokens"] == abstract["batch"] and abstract["mixed"]["tokens"] == abstract["batch"] + 64
    assert all(abstract[k]["compile_s"] > 0 and abstract[k]["lower_s"] > 0 for k in ("decode", "mixed"))


def test_layer_weights_quick(tmp_path):
    data = run_script("layer_weights", tmp_path, "--max-other-share", "1.0")
    variants = ("stacked-scan", "stacked-static-slices", "per-layer-arrays")
    check_comparison(data["comparison"], {f"{v}@{b}" for v in variants for b in (1, 2)} | {"copy"})
    assert data["same_tokens"] == {"1": True, "2": True} and data["token_agreement"] == {"1": 1.0, "2": 1.0}
    assert data["config"]["variants"] == list(variants) and data["config"]["xla_flags_label"] == ""
    assert set(data["programs"]) == {f"{v}@{b}" for v in variants for b in (1, 2)}
    for key, program in data["programs"].items():
        assert program["compile_s"] > 0 and program["lower_s"] > 0 and program["first_attempt_s"] > 0
        if key.startswith("per-layer-arrays"):  # nothing in the engine's step has a weight's shape but the weights
            assert program["hlo"]["weight_shaped_fusion_output"] == 0
            assert program["hlo"]["weight_shaped_dynamic_slice"] == 0 and program["hlo"]["weight_shaped_copy"] == 0
    assert [row["batch"] for row in data["results"]] == [1, 2]
    for row in data["results"]:
        assert all(row[v]["valid_attempts"] == 2 and row[v]["median"] > 0 for v in variants)
        assert row["vs_stacked_scan"]["per-layer-arrays"]["value"] == pytest.approx(
            row["per-layer-arrays"]["median"] / row["stacked-scan"]["median"])
    copy = valid_median(data["comparison"], "copy", lambda r: r["bytes_per_s"])
    assert data["memory_floor_s"] == pytest.approx(data["config"]["weight_bytes"] / copy)
    for row in data["results"]:
        assert row["memory_floor_with_kv_s"] == pytest.approx(row["step_read_bytes"] / copy)
        assert row["kv_read_bytes"] == row["batch"] * 40 * 2 * 2 * 2 * 16 * 4  # context x layers x K,V x heads x dim


def test_layer_weights_selected_variants_under_a_label(tmp_path):
    """A labelled run of some variants (the GPU check's second process) in bfloat16 writes its own file."""
    command = [sys.executable, str(REPO / "bench" / "layer_weights.py"), "--quick", "--out", str(tmp_path),
               "--max-other-share", "1.0", "--dtype", "bfloat16", "--variants", "stacked-scan", "per-layer-arrays",
               "--batches", "2", "--compile-threads", "2", "--xla-flags-label", "dsf"]
    env = {**os.environ, "XLA_FLAGS": "--xla_gpu_enable_dynamic_slice_fusion=true"}  # a GPU flag XLA:CPU accepts
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    (path,) = tmp_path.glob("*.json")
    assert path.name.startswith("layer_weights-dsf-")
    data = json.loads(path.read_text())
    assert data["config"]["dtype"] == "bfloat16" and data["config"]["variants"] == ["stacked-scan", "per-layer-arrays"]
    assert data["config"]["xla_flags"] == env["XLA_FLAGS"] and data["config"]["compile_threads"] == 2
    assert set(data["programs"]) == {"stacked-scan@2", "per-layer-arrays@2"}
    (row,) = data["results"]
    assert set(row["vs_stacked_scan"]) == {"per-layer-arrays"} and row["per-layer-arrays"]["median"] > 0


def test_layer_weights_hlo_counts():
    import layer_weights  # bench/layer_weights.py

    from harli_jax.model import ModelConfig

    cfg = ModelConfig.from_yaml(REPO / "configs/models/tiny.yaml")  # hidden 64, MLP 128, 4 heads of 16, 2 KV heads
    text = "\n".join([
        "  %dynamic-slice.1 = f32[64,128]{1,0} dynamic-slice(f32[2,64,128]{2,1,0} %p, s32[] %i, s32[] %z, s32[] %z)",
        "  %fusion.2 = f32[128,64]{1,0} fusion(f32[2,128,64]{2,1,0} %q, s32[] %i), kind=kLoop, calls=%fused",
        "  ROOT %copy.3 = f32[64,32]{1,0} copy(f32[64,32]{0,1} %r)",
        "  %fusion.4 = f32[1,128]{1,0} fusion(f32[1,64]{1,0} %x, f32[64,128]{1,0} %w), kind=kOutput",
        '  %c = f32[1,128]{1,0} custom-call(), backend_config={"name":"dynamic_address_computation"}',
    ])
    counts = layer_weights.hlo_counts(text, cfg)
    assert counts["weight_shaped_dynamic_slice"] == 1 and counts["weight_shaped_fusion_output"] == 1
    assert counts["weight_shaped_copy"] == 1 and counts["address_computation_mentions"] == 1


# bench/gpu_check.sh -------------------------------------------------------------------------------------------


def run_gpu_check(tmp_path, **env) -> tuple[subprocess.CompletedProcess, dict]:
    environ = {k: v for k, v in os.environ.items() if k not in ("OUT", "XLA_FLAGS")}
    environ.update(GPU_CHECK_SMOKE="1", GPU_CHECK_RESULTS=str(tmp_path), PYTHON=sys.executable, TMPDIR=str(tmp_path),
                   **env)
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=environ)
    assert done.returncode == 0, done.stdout + done.stderr
    (summary,) = tmp_path.glob("gpu_check-*.json")  # -unknown-device.json when the device part did not run
    return done, json.loads(summary.read_text())


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


def test_gpu_check_smoke_runs_every_part(tmp_path):
    done, summary = run_gpu_check(tmp_path)
    status = {p["part"]: p["status"] for p in summary["parts"]}
    assert status == {"install": "skipped (smoke run: the checkout's environment as it is)", "device": "ok",
                      "kernel-tests": "ok", "paged-attention": "ok", "layer-weights": "ok",
                      "layer-weights-dsf": "ok", "fused": "ok"}
    assert summary["not_ok"] == [] and "gpu_check: all parts ok" in done.stdout
    assert summary["tests"]["kernel-tests"]["tests"] > 0 and summary["tests"]["kernel-tests"]["failed"] == []
    for name in ("paged_attention", "layer_weights", "layer_weights-dsf", "fused"):
        assert json.loads((tmp_path / f"{name}-cpu.json").read_text())["benchmark"] == name
    assert json.loads((tmp_path / "fused-cpu.json").read_text())["model"]["dtype"] == "bfloat16"
    assert set(summary["fused"]["vs_micro_step"]) == {"1", "2"}  # the --quick decode batches
    assert {row["impl"] for row in summary["paged_attention_ragged"]} == {"pallas", "reference"}
    assert [row["batch"] for row in summary["layer_weights"]] == [1, 2]
    assert all(row["stacked-scan+dsf"] > 0 and row["per-layer-arrays"] > 0 for row in summary["layer_weights"])
    assert (tmp_path / "gpu_check-cpu-logs.tar.gz").stat().st_size > 0


def test_gpu_check_skips_what_the_budget_cannot_hold(tmp_path):
    start = time.perf_counter()
    done, summary = run_gpu_check(tmp_path, GPU_CHECK_BUDGET_S="45")
    assert time.perf_counter() - start < 60
    status = {p["part"]: p["status"] for p in summary["parts"]}
    assert all(status[p] == "skipped (budget)" for p in ("device", "kernel-tests", "paged-attention",
                                                           "layer-weights", "layer-weights-dsf", "fused"))
    assert "gpu_check: NOT OK: device (skipped (budget))" in done.stdout


def test_tensor_parallel_quick(tmp_path):
    data = run_script("tensor_parallel", tmp_path, "--max-other-share", "1.0", "--runs", "2")
    cmp = data["comparison"]
    programs = ["decode@1", "mixed"]
    check_comparison(cmp, {f"tp{tp}/{name}" for tp in (1, 2) for name in programs})
    assert data["config"]["devices"] == 4 and data["config"]["emulated"] is True
    one, two = data["table"]
    assert (one["tp"], two["tp"]) == (1, 2)
    assert two["arena_per_device"] * 2 == two["arena_total"] == one["arena_total"] == one["arena_per_device"]
    assert one["weights_per_device"] == one["weights_total"] == two["weights_total"] > two["weights_per_device"]
    for row in (one, two):
        for name in programs:
            median = valid_median(cmp, f"tp{row['tp']}/{name}", lambda r: r["seconds"])
            assert close(row[name]["step_s"]["median"], median) and median > 0
            assert close(row[name]["relative_to_first_degree"]["value"],
                         median / valid_median(cmp, f"tp1/{name}", lambda r: r["seconds"]))
    assert two["decode_program_per_device"]["argument_bytes"] < one["decode_program_per_device"]["argument_bytes"]


def test_overload_quick(tmp_path):
    data = run_script("overload", tmp_path, "--no-finetune", "--rounds", "2")
    check_comparison(data["comparison"], {"admission", "all-admitted"})
    for attempt in data["comparison"]["attempts"]:
        result = attempt["result"]
        assert result["finished"] + result["refused"] == result["requests"] == 12 and result["lost"] == 0
        assert result["kv_pages_after"] == 0 and result["finetune_tokens"] == 0
    assert data["sustainable_rate"] > 0 and data["tpot_slo_s"] == pytest.approx(3 * data["solo_decode_step_s"])
    assert set(data["summary"]) == {"admission", "all-admitted"}
