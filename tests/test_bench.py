"""The benchmark scripts: the interleaving helper of bench/common.py (no model), and a --quick run of each script
in a subprocess whose JSON must hold real content (every attempt with its load and validity, figures that are
the medians of the valid attempts, ratios made of those figures, one SLO for every co-location policy)."""

import json
import math
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


def test_colocation_quick(tmp_path):
    data = run_script("colocation", tmp_path, "--max-other-share", "1.0")
    slo, cmp = data["slo"], data["comparison"]
    runs = set(data["runs"])
    assert runs == {"decode-only", "temporal-2", "static-1", "static-2", "harli@3.0x"}
    check_comparison(cmp, runs | {"standalone"})
    assert data["policy_order"] == cmp["order"]
    # One SLO, measured once before any run, with its load, and every policy held to it.
    assert slo["valid"] is True and "other_processes_cpu_share" in slo["load"] and slo["solo_decode_step_ms"] > 0
    assert slo["slo_ms"] == {"3.0x": pytest.approx(3.0 * slo["solo_decode_step_ms"], abs=2e-3)}
    assert data["runs"]["harli@3.0x"]["slo_ms"] == pytest.approx(slo["slo_ms"]["3.0x"], abs=1e-3)
    assert {p["slo_ms"] for a in cmp["attempts"] if a["side"] != "standalone"
            for p in a["result"]["per_slo"].values()} == {slo["slo_ms"]["3.0x"]}
    entry = data["summary"]["3.0x"]
    assert entry["slo_ms"] == slo["slo_ms"]["3.0x"] and entry["slo_valid"] is True
    standalone = valid_median(cmp, "standalone", lambda r: r["tokens_per_s"])
    assert close(data["standalone_finetune"]["tokens_per_s"], standalone) and standalone > 0
    for row in entry["table"].values():
        label = row["run"]
        assert row["valid_attempts"] == 1
        for key in ("attainment", "finetune_tokens_per_s"):
            assert close(row[key], valid_median(cmp, label, lambda r, k=key: r["per_slo"]["3.0x"][k]))
        assert math.isclose(row["harvest_ratio"], row["finetune_tokens_per_s"] / standalone)
    best = entry["best_baseline"]
    ratio = entry["harli_vs_best_baseline"]
    assert ratio["valid"] == (best is not None)
    if best:
        assert entry["table"][best]["attainment"] >= data["targets"]["attainment_min"]
        assert math.isclose(ratio["value"], entry["table"]["harli"]["finetune_tokens_per_s"]
                            / entry["table"][best]["finetune_tokens_per_s"])
    for a in cmp["attempts"]:
        if a["side"] != "standalone":
            fig = a["result"]["figures"]
            assert fig["requests"] == data["trace"]["requests"] and "serve_load" in fig and "setup_load" in fig
            assert fig["finetune"]["idle_tokens"] <= fig["finetune"]["trained_tokens"]


def test_paged_attention_quick(tmp_path):
    data = run_script("paged_attention", tmp_path)
    rows = data["results"]
    assert {r["impl"] for r in rows} == {"reference", "pallas"}
    assert {(r["batch"], r["context"]) for r in rows} == {(1, 64), (1, 200), (3, 64), (3, 200)}
    for r in rows:  # bf16 inputs against float64 attention over the same pages: within bf16 rounding
        assert r["checked_sequences"] == r["batch"] and r["dense_f64_max_abs"] > 0.1
        assert 0.0 < r["max_abs_err_vs_dense_f64"] < 1e-2 and r["seconds"] > 0


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


def test_layer_weights_quick(tmp_path):
    data = run_script("layer_weights", tmp_path, "--max-other-share", "1.0")
    variants = ("stacked-scan", "stacked-static-slices", "per-layer-arrays")
    check_comparison(data["comparison"], {f"{v}@{b}" for v in variants for b in (1, 2)} | {"copy"})
    assert data["same_tokens"] == {"1": True, "2": True}
    assert [row["batch"] for row in data["results"]] == [1, 2]
    for row in data["results"]:
        assert all(row[v]["valid_attempts"] == 2 and row[v]["median"] > 0 for v in variants)
        assert row["vs_stacked_scan"]["per-layer-arrays"]["value"] == pytest.approx(
            row["per-layer-arrays"]["median"] / row["stacked-scan"]["median"])
    copy = valid_median(data["comparison"], "copy", lambda r: r["bytes_per_s"])
    assert data["memory_floor_s"] == pytest.approx(data["config"]["weight_bytes"] / copy)
