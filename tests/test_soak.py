"""bench/soak.py: the CI soak (`--quick`: tiny.yaml, 45 s of randomized traffic with 3x bursts, aborts and
disconnects through `harli serve` while a fine-tuning job trains), and the checks it is held to, shown to catch a
lost request, a leaked page, a growing RSS and a job whose progress goes back on a summary made to have them.

The CI soak asserts nothing about timing (the TPOT attainment it measures on a shared CPU is reported, not
checked): every request is accounted for (finished, aborted, disconnected or refused; none lost or in error) and
the server's counters agree (less at most the disconnected requests, which a client may drop before the server
took them), no KV page is owned once the server is idle, the job's trained tokens only grow, and
the server's RSS grows by less than RSS_BOUND from the warm-up sample (at 15% of the traffic) to the last idle one.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import soak  # noqa: E402  (bench/soak.py)

# The full run's target is 5% over 30 minutes. A 45-s run has more noise than trend: the warm-up sample comes 7 s
# into the traffic, when the allocator, the HTTP server's buffers, the job's state file and its served checkpoints
# have not reached their working size yet (four runs on a 2-core CPU measured 1.4-2.0%, about 15-22 MB of a 1.1 GB
# server). 10% still catches a leak that matters: ~100 KB kept per request over the run's 900-1700 requests.
RSS_BOUND = 0.10


def problems(summary: dict) -> list[str]:
    """What the CI soak must not show; empty when it passes."""
    found = []
    requests = summary["requests"]
    if requests["lost"] or requests["error"]:
        found.append(f"{requests['lost']} lost and {requests['error']} failed requests")
    if requests["accounted_for"] != requests["sent"]:
        found.append(f"{requests['sent'] - requests['accounted_for']} requests not accounted for")
    if not summary["server_counted"]["consistent"]:
        found.append(f"the server counted {summary['server_counted']['total']} requests, the client sent "
                     f"{requests['sent']} and disconnected {requests['disconnected']}")
    pages = summary["idle"]["metrics"]["pages"]
    if pages.get("kv") != 0:
        found.append(f"{pages.get('kv')} KV pages owned when idle")
    growth = summary["rss_mb"]["growth"]
    if growth is None or growth >= RSS_BOUND:
        found.append(f"RSS growth {growth} after warm-up")
    job = summary["job"]
    if not job["monotone"] or not job["trained_tokens_max"]:
        found.append(f"job progress not monotone or none: {job}")
    return found


def test_soak_quick(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "soak.py"), "--quick", "--records", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-5000:]
    data = json.loads((tmp_path / f"soak-{soak.common.device_name()}.json").read_text())
    assert data["benchmark"] == "soak" and (tmp_path / f"soak-{soak.common.device_name()}.png").stat().st_size
    summary = data["summary"]
    assert problems(summary) == [], summary
    requests = summary["requests"]
    assert requests["finished"] > 0 and requests["by_kind"]["abort"]["aborted"] > 0, requests
    assert requests["by_kind"]["disconnect"]["disconnected"] > 0, requests
    assert summary["server_exit"]["stopped_cleanly"], data["server_stderr_tail"]
    assert summary["idle"]["metrics"]["num_requests_running"] == summary["idle"]["metrics"]["num_requests_waiting"] == 0
    phases = [s["phase"] for s in data["samples"]]
    assert {"calibrate", "traffic", "idle"} <= set(phases) and any(s["burst"] for s in data["samples"])
    assert len(data["records"]) == requests["sent"] and data["calibration"]["rate"] > 0


def _records(outcomes: list[str]) -> list[dict]:
    return [{"phase": "traffic", "kind": "stream", "burst": i % 2 == 0, "sent": float(i), "end": i + 0.5,
             "tpot": 0.01, "max_gap": 0.03, **({"outcome": o} if o else {})} for i, o in enumerate(outcomes)]


def _samples(rss: list[float], tokens: list[int]) -> list[dict]:
    return [{"t": 10.0 * i, "phase": "traffic", "traffic_t": 10.0 * i, "rss_mb": r,
             "metrics": {"pages": {"kv": 0, "lease": 0, "free": 100}}, "job_file_bytes": 2000,
             "job": {"status": "running", "trained_tokens": n}} for i, (r, n) in enumerate(zip(rss, tokens,
                                                                                              strict=True))]


def _idle(kv: int, success: dict, refused: int) -> dict:
    pages = {"kv": kv, "lease": 0, "free": 100 - kv}
    return {"metrics": {"pages": pages, "success": success, "requests_refused_total": refused,
                        "num_requests_running": 0, "num_requests_waiting": 0, "engine_thread_compiles_total": 0,
                        "itl_buckets": {"0.01": 90, "0.025": 100, "0.05": 100, "+Inf": 100}},
            "after_cancel": {"job_status": "cancelled", "metrics": {"pages": pages}}}


def test_the_checks_pass_a_clean_summary_and_catch_a_leak_a_lost_request_rss_growth_and_a_job_going_back():
    clean = soak.summarize(_records(["finished", "refused", "finished", "finished"]),
                           _samples([1000, 1000, 1010, 1020], [10, 20, 30, 40]),
                           _idle(0, {"length": 3}, 1), slo_s=0.02, warmup=0.15, duration=30.0)
    assert problems(clean) == [] and all(t["met"] for t in clean["targets"].values())
    assert clean["rss_mb"]["warmup"] == 1000 and clean["rss_mb"]["growth"] == pytest.approx(0.02)
    assert clean["attainment"]["burst"] == {"timed": 2, "attainment": 1.0, "tpot_p50_ms": 10.0}
    assert clean["pages_after_cancel"]["all_free"] and clean["pages_after_cancel"]["capacity"] == 100

    # One request never answered, 3 KV pages left, RSS up 30%, the job's tokens going back.
    broken = soak.summarize(_records(["finished", None, "finished", "finished"]),
                            _samples([1000, 1000, 1200, 1300], [10, 30, 20, 40]),
                            _idle(3, {"length": 3}, 0), slo_s=0.02, warmup=0.15, duration=30.0)
    found = problems(broken)
    assert found[0] == "1 lost and 0 failed requests" and "1 requests not accounted for" in found
    assert not broken["pages_after_cancel"]["all_free"]
    assert "3 KV pages owned when idle" in found and any(p.startswith("RSS growth 0.3") for p in found)
    assert any(p.startswith("job progress not monotone") for p in found)
    assert not any(broken["targets"][name]["met"] for name in ("lost_requests", "kv_pages_idle", "rss_growth",
                                                                "job_progress_monotone"))
    # The server counting a request the client did not send, or missing one the client did not give up on early.
    for outcomes, success, message in [
            (["finished"] * 3, {"length": 3, "abort": 1}, "the server counted 4 requests, the client sent 3 and "
                                                           "disconnected 0"),
            (["finished", "finished", "aborted"], {"length": 2}, "the server counted 2 requests, the client sent 3 "
                                                                 "and disconnected 0")]:
        summary = soak.summarize(_records(outcomes), _samples([1000, 1000], [1, 2]), _idle(0, success, 0),
                                 slo_s=0.02, warmup=0.15, duration=30.0)
        assert problems(summary) == [message]
    early = soak.summarize(_records(["finished", "disconnected"]), _samples([1000, 1000], [1, 2]),
                           _idle(0, {"length": 1}, 0), slo_s=0.02, warmup=0.15, duration=30.0)
    assert problems(early) == [] and early["server_counted"]["unseen"] == 1


def test_the_job_start_gap_and_record_targets_catch_what_they_bound():
    records = _records(["finished"] * 4)
    records[2].update(tpot=0.05, max_gap=0.2)  # of the two requests running as a job starts, one misses the SLO
    samples = _samples([1000, 1000, 1000, 1000], [10, 20, 30, 40])
    samples[-1]["job_file_bytes"] = soak.JOB_FILE_MAX + 1  # a record that grew
    summary = soak.summarize(records, samples, _idle(0, {"length": 4}, 0), slo_s=0.02, warmup=0.15, duration=30.0,
                             job_starts=[{"created": 2.2, "job_id": "ftjob-b"}])
    targets = summary["targets"]
    assert summary["attainment"]["job_starts"]["timed"] == 2 and not targets["job_start_attainment"]["met"]
    assert targets["attainment"]["value"] == 0.75 and not targets["attainment"]["met"]
    assert targets["longest_gap"]["value"] == 0.2 and not targets["longest_gap"]["met"]
    assert not targets["job_record_bytes"]["met"]
    assert targets["server_gaps_over_cap"]["met"] and targets["engine_thread_compiles"]["met"]
    idle = _idle(0, {"length": 4}, 0)
    idle["metrics"].update(engine_thread_compiles_total=2, itl_buckets={"0.025": 90, "0.05": 97, "+Inf": 100})
    targets = soak.summarize(records, samples, idle, slo_s=0.02, warmup=0.15, duration=30.0)["targets"]
    assert targets["server_gaps_over_cap"]["value"] == 3 and not targets["server_gaps_over_cap"]["met"]
    assert not targets["engine_thread_compiles"]["met"]
    # Two jobs in turn: each one's tokens only grow, though the second starts from zero.
    samples = _samples([1000] * 4, [10, 20, 0, 5])
    for i, s in enumerate(samples):
        s["job"]["id"] = "ftjob-a" if i < 2 else "ftjob-b"
    assert soak.summarize(_records(["finished"]), samples, _idle(0, {"length": 1}, 0), slo_s=0.02, warmup=0.15,
                          duration=30.0)["job"]["monotone"]
