"""The replay summary on hand-made outputs and steps: SLO attainment, latency percentiles and throughputs against
values worked out by hand (all times are exact binary fractions, so the comparisons at the SLO are exact); the
table, the explanation and the CSVs."""

import dataclasses

import pytest

from harli_jax.replay.report import (
    RunResult,
    explain,
    format_stages,
    format_table,
    percentile,
    summarize,
    to_ms,
    write_csvs,
)
from harli_jax.runtime.metrics import StepRecord
from harli_jax.runtime.request import FinishReason, GenerationOutput


def _out(rid, arrival, times, reason=FinishReason.LENGTH):
    return GenerationOutput(request_id=rid, prompt_ids=(1, 2, 3), token_ids=tuple(range(len(times))), text=None,
                            finish_reason=reason, arrival_time=arrival, first_token_time=times[0] if times else None,
                            token_times=tuple(times))


# TTFT (s)   gaps (s)                 TPOT (s)
# a: 0.25    0.125, 0.125, 0.125      0.125 (on the SLO)
# b: 0.5     0.0625, 0.25             0.15625
# c: 0.0625  -                        -  (one token)
# e: 0.5     0.125                    0.125
OUTPUTS = [
    _out("a", 0.0, [0.25, 0.375, 0.5, 0.625]),
    _out("b", 1.0, [1.5, 1.5625, 1.8125], FinishReason.STOP),
    _out("c", 2.0, [2.0625]),
    _out("r", 3.0, [], FinishReason.REJECTED),
    _out("e", 4.0, [4.5, 4.625], FinishReason.ABORTED),
]


def _step(index, start, end, train=(), train_time=0.0, decision_time=0.0, fused=""):
    return StepRecord(index=index, start=start, end=end, decode_seqs=1, prefill_seqs=0, prefill_tokens=0,
                      total_context=10, max_context=10, bucket_seqs=1, bucket_tokens=1, bucket_pages=1, preempted=0,
                      train=train, train_time=train_time, decision_time=decision_time, fused=fused)


# Windows 0.25 + 0.25 and 0.25; decisions 0.0625 + 0.03125 = 0.09375 over 0.75 s of windows. The second step
# carried a token chunk of 8 positions.
STEPS = [_step(0, 0.0, 0.25, ("forward:2",), 0.25, 0.0625), _step(1, 0.5, 0.75, (), 0.0, 0.03125, "tokens:8")]
STAGES = {"step": {"samples": 4, "mape": 0.25, "p99_ape": 0.5, "under_prediction_rate": 0.0},
          "fused": {"samples": 0},
          "window": {"samples": 3, "mape": 0.125, "p99_ape": 0.25, "under_prediction_rate": 0.5}}


def _run(**kw):
    base = dict(policy="harli", role="colocated", tpot_slo=0.125, tbt_slo=0.25, ttft_slo=None, outputs=OUTPUTS,
                steps=STEPS, wall_s=5.0, start=0.0, finetune_tokens=1000,
                loss_history=[{"step": 1, "loss": 2.5, "time_s": 1.0, "tokens": 500, "grad_norm": 0.5},
                              {"step": 2, "loss": 1.75, "time_s": 2.0, "tokens": 1000, "grad_norm": 0.25}],
                standalone_tokens_per_s=400.0,
                predictor={"windows": 3, "mape": 0.125, "under_prediction_rate": 0.5, "stages": STAGES},
                reclaims=2, abandoned=1, eval_before=(0.5, 0.0), eval_after=(0.25, 0.875))
    return RunResult(**{**base, **kw})


def test_request_level_attainment_counts_tpot_on_the_slo_and_single_tokens():
    s = summarize(_run())
    assert (s["requests"], s["rejected"]) == (5, 1)
    assert s["slo_attainment"] == 0.75  # a (on the SLO), c (no TPOT), e; b is over; r is not counted
    assert summarize(_run(tpot_slo=0.15625))["slo_attainment"] == 1.0
    assert summarize(_run(tpot_slo=0.1))["slo_attainment"] == 0.25  # only c
    assert s["tpot_slo_ms"] == 125.0 and s["tbt_slo_ms"] == 250.0


def test_ttft_slo_also_has_to_hold_when_set():
    assert summarize(_run(ttft_slo=0.25))["slo_attainment"] == 0.5  # a (on the TTFT SLO) and c
    assert summarize(_run(ttft_slo=0.5))["slo_attainment"] == 0.75  # b still fails its TPOT
    assert summarize(_run(ttft_slo=0.0625))["slo_attainment"] == 0.25  # only c
    assert summarize(_run(ttft_slo=0.01))["slo_attainment"] == 0.0


def test_token_level_attainment_is_over_every_gap_against_the_tbt_cap():
    assert summarize(_run(tbt_slo=0.125))["tbt_attainment"] == 5 / 6  # 0.25 is the only gap over 0.125
    assert summarize(_run(tbt_slo=0.0625))["tbt_attainment"] == 1 / 6
    assert summarize(_run(tbt_slo=0.25))["tbt_attainment"] == 1.0
    assert summarize(_run(tpot_slo=0.01, tbt_slo=0.25))["tbt_attainment"] == 1.0  # not the TPOT SLO


def test_the_decode_role_counts_ttft_to_the_first_decode_token():
    """In the decode role the first token came with the K/V: TTFT runs to the second, the imported token is not
    a decoded one, and a one-token request has no TTFT."""
    s = summarize(_run(role="decode"))
    # TTFTs: a 0.375, b 0.5625, e 0.625 (c has one token); sorted, positions q * 2.
    assert s["ttft_p50_ms"] == pytest.approx(562.5) and s["ttft_p99_ms"] == pytest.approx(562.5 + 0.98 * 62.5)
    assert s["decode_tokens_per_s"] == (3 + 2 + 0 + 1) / 5.0
    assert summarize(_run(role="decode", ttft_slo=0.5))["slo_attainment"] == 0.5  # a and c (none to miss)
    assert s["tpot_p50_ms"] == summarize(_run())["tpot_p50_ms"]  # TPOT is over every token either way


def test_latency_percentiles():
    s = summarize(_run())
    # Gaps sorted: 0.0625, 0.125 x4, 0.25 (linear interpolation at position q * 5).
    assert s["tbt_p50_ms"] == pytest.approx(125.0)
    assert s["tbt_p90_ms"] == pytest.approx(187.5)  # position 4.5: halfway between 0.125 and 0.25
    assert s["tbt_p99_ms"] == pytest.approx(125.0 + 0.95 * 125.0)
    # TPOTs sorted: 0.125, 0.125, 0.15625 (positions q * 2).
    assert s["tpot_p50_ms"] == pytest.approx(125.0)
    assert s["tpot_p99_ms"] == pytest.approx(125.0 + 0.98 * 31.25)
    # TTFTs sorted: 0.0625, 0.25, 0.5, 0.5 (positions q * 3).
    assert s["ttft_p50_ms"] == pytest.approx(375.0)
    assert s["ttft_p99_ms"] == pytest.approx(500.0)


def test_percentile_and_milliseconds_helpers():
    values = [0.25, 0.0625, 0.125, 0.125]  # sorted: 0.0625, 0.125, 0.125, 0.25 (positions q / 100 * 3)
    assert percentile(values, 50) == 0.125
    assert percentile(values, 90) == pytest.approx(0.125 + 0.7 * 0.125)
    assert (percentile(values, 0), percentile(values, 100)) == (0.0625, 0.25)
    assert percentile([], 50) is None
    assert to_ms(0.0125) == 12.5 and to_ms(None) is None and to_ms(None, 3) is None
    assert to_ms(0.0123456789, 3) == 12.346 and to_ms(0.0123456789) == pytest.approx(12.3456789)


def test_rejected_requests_count_nowhere_but_in_rejected():
    waited = dataclasses.replace(OUTPUTS[3], first_token_time=3.5, token_times=(3.5, 4.5), token_ids=(7, 8))
    s = summarize(_run(outputs=OUTPUTS[:3] + [waited] + OUTPUTS[4:]))
    assert s == summarize(_run())
    only_rejected = summarize(_run(outputs=[OUTPUTS[3]]))
    assert (only_rejected["requests"], only_rejected["rejected"]) == (1, 1)
    for key in ("slo_attainment", "tbt_attainment", "tbt_p50_ms", "tpot_p99_ms", "ttft_p50_ms"):
        assert only_rejected[key] is None, key
    assert only_rejected["decode_tokens_per_s"] == 0.0
    aborted = [_out("x", 0.0, [], FinishReason.ABORTED)]  # served but no token: meets no TTFT SLO
    assert summarize(_run(outputs=aborted))["slo_attainment"] == 1.0
    assert summarize(_run(outputs=aborted, ttft_slo=10.0))["slo_attainment"] == 0.0


def test_throughputs_harvest_and_overhead():
    s = summarize(_run())
    assert s["decode_tokens_per_s"] == 10 / 5.0  # 4 + 3 + 1 + 2 generated tokens
    assert s["finetune_tokens"] == 1000 and s["finetune_tokens_per_s"] == 200.0
    assert s["harvest_ratio"] == 0.5
    assert s["scheduler_overhead"] == 0.125
    assert (s["windows_with_training"], s["steps"]) == (1, 2)
    assert (s["fused_steps"], s["fused_by_kind"]) == (1, {"tokens": 1})
    assert s["final_loss"] == 1.75 and s["finetune_steps"] == 2 and s["standalone_tokens_per_s"] == 400.0
    assert (s["predictor_mape"], s["predictor_under_prediction"]) == (0.125, 0.5)
    assert (s["reclaims"], s["abandoned_microbatches"], s["wall_s"], s["interrupted"]) == (2, 1, 5.0, False)
    assert summarize(_run(standalone_tokens_per_s=None))["harvest_ratio"] is None
    assert summarize(_run(standalone_tokens_per_s=0.0))["harvest_ratio"] is None
    empty = summarize(_run(steps=[], wall_s=0.0, loss_history=[], predictor={"windows": 0}))
    assert (empty["decode_tokens_per_s"], empty["finetune_tokens_per_s"], empty["scheduler_overhead"]) == (0, 0, 0)
    assert (empty["final_loss"], empty["predictor_mape"], empty["predictor_under_prediction"]) == (None, None, None)


def test_fused_steps_by_kind_and_the_predictor_per_stage():
    steps = [_step(i, i, i + 0.5, fused=f) for i, f in enumerate(["tokens:8", "", "backward+commit:1",
                                                                    "tokens+last:16"])]
    s = summarize(_run(steps=steps))
    assert (s["fused_steps"], s["fused_by_kind"]) == (3, {"backward": 1, "tokens": 2})
    stages = s["predictor_stages"]
    assert stages["step"] == STAGES["step"] and stages["window"] == STAGES["window"]
    assert stages["fused"] == {"samples": 0, "mape": None, "p99_ape": None, "under_prediction_rate": None}
    nan = summarize(_run(predictor={"stages": {"step": {"samples": 2, "mape": float("nan")}}}))["predictor_stages"]
    assert nan["step"]["mape"] is None and nan["window"]["samples"] == 0  # no NaN in summary.json
    lines = format_stages([s, summarize(_run(policy="decode-only", steps=[], predictor={}))]).splitlines()
    assert lines == ["harli: predictor step 25.0% MAPE, 0.0% under (4); window 12.5% MAPE, 50.0% under (3); "
                     "fused steps backward 1, tokens 2"]  # decode-only: nothing scored, nothing fused


def test_format_table_has_units_and_the_slo_and_a_dash_for_missing_values():
    full = summarize(_run())
    bare = summarize(_run(policy="static", outputs=[OUTPUTS[3]], standalone_tokens_per_s=None,
                          predictor={"mape": float("nan")}, eval_after=None))
    lines = format_table([full, bare]).splitlines()
    assert lines[0].split("  ") == [
        "policy", "TPOT SLO ms", "TPOT ok", "TPOT p99 ms", "TBT cap ms", "TBT ok", "TBT p99 ms", "TTFT p50 ms",
        "decode tok/s", "finetune tok/s", "harvest", "reclaims", "fused steps", "pred MAPE", "exact before",
        "exact after"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["harli", "125.0", "75.0%", "155.6", "250.0", "100.0%", "243.8", "375.0", "2", "200",
                                "50.0%", "2", "1", "12.5%", "0%", "88%"]
    assert lines[3].split() == ["static", "125.0", "-", "-", "250.0", "-", "-", "-", "0", "200", "-", "2", "1", "-",
                                "0%", "-"]
    assert len({len(line) for line in lines}) == 1  # columns aligned, to the right
    assert lines[2].endswith("  88%") and lines[3].endswith(" -")
    assert (full["exact_match_before"], full["exact_match_after"], full["eval_loss_after"]) == (0.0, 0.875, 0.25)
    assert bare["exact_match_after"] is None and bare["eval_loss_before"] == 0.5


def test_explain_names_each_policy_the_role_and_harvest():
    lines = explain(["harli", "decode-only", "cobatch", "new-policy"], "decode").splitlines()
    assert lines[0].startswith("harli: ") and lines[1].startswith("decode-only: no training")
    assert lines[0].startswith("harli: hybrid: finetune work fused into decode steps")
    assert lines[2].startswith("cobatch: FlexLLM's token-level co-serving") and "swept offline" in lines[2]
    assert lines[3] == "new-policy: see harli_jax.runtime.colocation"
    assert lines[4].startswith("decode role: ") and lines[5].startswith("harvest: ") and "fused steps" in lines[5]


def test_csvs_per_policy(tmp_path):
    write_csvs(_run(), tmp_path)
    loss = (tmp_path / "loss-harli.csv").read_text().splitlines()
    assert loss == ["step,time_s,loss,grad_norm,tokens", "1,1.0,2.5,0.5,500", "2,2.0,1.75,0.25,1000"]
    requests = (tmp_path / "requests-harli.csv").read_text().splitlines()
    assert requests[0].startswith("request_id,arrival_s") and len(requests) == 1 + len(OUTPUTS)
    assert len((tmp_path / "steps-harli.csv").read_text().splitlines()) == 1 + len(STEPS)
