"""Co-location: serve a bursty inference trace under a TPOT SLO while a LoRA finetune job trains in the slack,
under every scheduling policy, in one process on the same trace.

(Its co-location figures are withdrawn from the README until a later redesign; the script still measures them.)

The trace (`configs/traces/colocation-small.csv`, read with `harli_jax.replay.trace.load_trace`, which starts it
at 0 s; `--write-trace` writes one with the package's seeded generator, `synthesize("gamma")`): Gamma-renewal
arrivals with a coefficient of variation > 1 (bursts and lulls), chat-like lengths (prompt lognormal, mean ~100
tokens; output lognormal, mean ~45 tokens) that fit the engine's context. Prompts are random token ids
(`Trace.to_requests`, seeded), every request decodes exactly its `output_tokens` (EOS ignored).

1. The SLO base, measured ONCE before any policy runs, after `common.wait_for_quiet`, with its load: the trace
   on a decode-only engine without a finetune job; its peak concurrent decode batch and the solo decode step
   there (median latency of the decode-only steps -- no prefill tokens -- at that batch); SLO =
   `--slo-multiples` x that step, the same for every policy. If other processes took more than
   `--max-other-share` of the CPUs meanwhile, the SLO is marked invalid, and so is every ratio.
   The same run gives the slack the trace leaves (below).
2. Then every run, in a seeded random order per round (`--rounds`, recorded), through `common.interleave`
   (each attempt with its load, repeated up to `--max-retries` times after waiting for quiet when other
   processes took more than `--max-other-share`, else marked invalid). Each policy run is a fresh `Engine`
   over the same weights (EngineConfig(policy=..., tpot_slo_ms=..., calibration_dir=<temp dir>)) with a fresh
   `engine.finetune(FinetuneJob(total_steps=huge, eval_interval=0))` of the default (embedded) task at the
   micro-batch shape `--micro-rows x --micro-seq-len`:
   - standalone: the finetune job alone on its own engine (no requests), `handle.wait(max_steps=1)` for about
     `--standalone-seconds`; trained tokens/s over its wall time (the harvest ratio's denominator);
   - decode-only: the trace with training only while no request runs;
   - temporal-K (K = `--temporal-k` inference steps, then K one-layer micro-steps), SLO-blind;
   - static: one chunk of L layers after every inference step, for L in `--static-sweep`; per SLO the largest L
     with >= 99% request-level TPOT attainment (valid runs only) is what a careful operator would configure (0 =
     decode-only if none does). The SLO-blind runs are the same whatever the SLO: each runs once and is scored
     at every SLO;
   - harli, once per SLO (its budget depends on the SLO), and per `--harli-variants`.
3. At the end, a drift check: the synthetic solo decode step (`Engine.time_decode_step`) at the peak batch,
   against the same measurement in the SLO base run.

Per policy and SLO (the median over the run's valid attempts): request-level TPOT attainment
(GenerationOutput.tpot <= SLO), token-level attainment (gaps between consecutive tokens <= SLO), TBT P50/P90/P99,
TTFT P50/P99, decode tokens/s, finetune trained tokens/s during the serve (split into co-located micro-steps and
idle training, `engine.idle_training`), harvest ratio (÷ standalone) and harvest ÷ the slack the trace leaves at
that SLO, reclaims, abandoned micro-batches (`handle.progress()`), predictor error
(`engine.predictor.error_report()`) and refits (`engine.predictor.fit_seconds`), scheduler overhead (sum of
decision_time ÷ sum of windows = inference step + training after it), windows that trained, and where the
SLO-violating token gaps come from. Per SLO: harli's finetune tokens/s ÷ the best baseline that meets 99%
attainment, computed only from valid runs and a valid SLO.

"Slack the trace leaves" at SLO S, from the SLO base run: (idle time + sum over inference steps of
max(0, S - step latency)) ÷ (idle time + sum of max(S, step latency)) -- the share of device time a co-locator
could train if it stretched every inference step to exactly the SLO, keeping the same schedule (no margin).

Writes bench/results/colocation-<device>.json (or into --out; a --quick run writes only with --out).

    python bench/colocation.py                       # small.yaml, the bundled trace, SLO 1.5x and 3x
    python bench/colocation.py --quick --out /tmp/bench   # smoke run: tiny.yaml, a short generated trace
    python bench/colocation.py --write-trace         # regenerate configs/traces/colocation-small.csv and exit
    python bench/colocation.py --policies harli,decode-only --slo-multiples 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import numpy as np
from common import say

from harli_jax import Engine, EngineConfig, FinetuneJob
from harli_jax.model.loader import load_model
from harli_jax.replay.report import percentile, to_ms
from harli_jax.replay.trace import Trace, load_trace, synthesize, write_trace
from harli_jax.runtime.request import FinishedEvent, FinishReason, GenerationOutput

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO / "configs/traces/colocation-small.csv"
TARGETS = {"attainment_min": 0.99, "vs_best_baseline_min": 1.6, "harvest_of_slack_min": 0.8, "mape_max": 0.05,
           "under_prediction_max": 0.01, "overhead_max": 0.02}
ALL_POLICIES = ("decode-only", "temporal-K", "static", "harli")


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model YAML (default configs/models/small.yaml)")
    parser.add_argument("--trace", default=None, help=f"trace CSV (default {DEFAULT_TRACE.relative_to(REPO)})")
    parser.add_argument("--slo-multiples", type=float_list, default=None,
                        help="SLOs as multiples of the solo decode step at the peak batch (default 1.5,3; 3 quick)")
    parser.add_argument("--policies", default=",".join(ALL_POLICIES),
                        help="comma separated subset of " + ",".join(ALL_POLICIES) + " (decode-only always runs)")
    parser.add_argument("--static-sweep", type=int_list, default=None,
                        help="static layers per window to sweep (default 1,2,4,... up to the model's layers)")
    parser.add_argument("--temporal-k", type=int, default=2, help="temporal-K: K inference steps, K micro-steps")
    parser.add_argument("--micro-rows", type=int, default=1, help="finetune micro-batch rows (default 1)")
    parser.add_argument("--micro-seq-len", type=int, default=None, help="finetune micro-batch tokens per row "
                        "(default 64; 32 with --quick)")
    parser.add_argument("--standalone-seconds", type=float, default=None,
                        help="approximate length of each standalone finetune measurement (default 20; 1 quick)")
    parser.add_argument("--max-batch", type=int, default=None, help="engine batch (default 16; 4 quick)")
    parser.add_argument("--prefill-chunk", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=None, help="engine context (default 256; 128 quick)")
    parser.add_argument("--page-buckets", type=int_list, default=None, help="pages per sequence buckets "
                        "(default 4,8,16; 8 quick)")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts, the generated trace and the order of "
                        "the runs per round")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds: attempts per run (default 1)")
    parser.add_argument("--harli-variants", default=None,
                        help="extra harli runs per SLO with EngineConfig overrides, e.g. 'bank_cap=0;slo_margin=0.2' "
                             "(';' between variants, ',' between fields of one; default bank_cap=0: no banked "
                             "slack, an ablation of the bank; '' for none, the --quick default); extra rows")
    parser.add_argument("--calibrate-baselines", action="store_true",
                        help="also calibrate the predictor on the SLO-blind runs (their predictor error is then "
                             "reported; costs a calibration sweep per run)")
    parser.add_argument("--dump", default=None, help="directory for each run's raw step records and token times "
                        "(JSON lines, for offline analysis)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny.yaml, a short generated trace, one SLO")
    common.add_arguments(parser)
    # The trace generator.
    parser.add_argument("--write-trace", action="store_true", help="write the trace CSV (to --trace) and exit")
    parser.add_argument("--requests", type=int, default=None, help="generated trace: requests (default 135)")
    parser.add_argument("--rate", type=float, default=None, help="generated trace: mean arrivals/s (default 1.5)")
    parser.add_argument("--cv", type=float, default=2.0, help="generated trace: coefficient of variation of the "
                        "inter-arrival times (Gamma renewal process; > 1 is bursty)")
    parser.add_argument("--prompt-mean", type=float, default=None, help="generated trace: mean prompt tokens "
                        "(default 100; 40 quick)")
    parser.add_argument("--output-mean", type=float, default=None, help="generated trace: mean output tokens "
                        "(default 45; 16 quick)")
    args = parser.parse_args()
    quick = dict(model=REPO / "configs/models/tiny.yaml", micro_seq_len=32, standalone_seconds=1.0, max_seq_len=128,
                 max_batch=4, page_buckets=[8], requests=10, rate=6.0, prompt_mean=40.0, output_mean=16.0,
                 slo_multiples=[3.0], harli_variants="")
    full = dict(model=REPO / "configs/models/small.yaml", micro_seq_len=64, standalone_seconds=20.0, max_seq_len=256,
                max_batch=16, page_buckets=[4, 8, 16], requests=135, rate=1.5, prompt_mean=100.0, output_mean=45.0,
                slo_multiples=[1.5, 3.0], harli_variants="bank_cap=0")
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.policies = [p for p in args.policies.split(",") if p]
    unknown = set(args.policies) - set(ALL_POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {ALL_POLICIES}")
    if not args.slo_multiples or min(args.slo_multiples) <= 0:
        parser.error("--slo-multiples must be positive")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


# The trace -------------------------------------------------------------------------------------------------


def generated_trace(args) -> Trace:
    """The trace of the generator flags: `synthesize("gamma", ...)`, shrunk to fit the engine's context."""
    return synthesize("gamma", num_requests=args.requests, rate=args.rate, cv=args.cv, seed=args.seed,
                      prompt_mean=args.prompt_mean, output_mean=args.output_mean).rescale(max_context=args.max_seq_len)


def generated_comment(trace: Trace, args) -> str:
    """How `generated_trace` made `trace`: the command that regenerates it, and what came out."""
    stats = trace_stats(trace)
    command = (f"python bench/colocation.py --write-trace --requests {args.requests} --rate {args.rate} "
               f"--cv {args.cv} --prompt-mean {args.prompt_mean} --output-mean {args.output_mean} "
               f"--max-seq-len {args.max_seq_len} --seed {args.seed}")
    return (f"Generated by `{command}` (harli_jax.replay.trace.synthesize): Gamma-renewal arrivals (mean "
            f"{args.rate}/s, CV {args.cv}), prompt and output tokens lognormal (means {args.prompt_mean} and "
            f"{args.output_mean}), shrunk to fit a {args.max_seq_len}-token context (Trace.rescale). Realized: "
            f"{len(trace)} requests over {trace.duration:.0f} s ({stats['mean_rate_per_s']:.2f}/s, inter-arrival CV "
            f"{stats['interarrival_cv']:.2f}, at most {stats['arrivals_per_5s_max']} arrivals in a 5 s window). "
            f"Prompts are random token ids drawn by the benchmark (Trace.to_requests, seed {args.seed}).")


def trace_stats(trace: Trace) -> dict:
    arrivals = np.array([r.arrival for r in trace.requests])
    gaps = np.diff(arrivals)
    prompts = np.array([r.prompt_tokens for r in trace.requests])
    outputs = np.array([r.output_tokens for r in trace.requests])
    # Arrivals per 5 s window: the burstiness a reader can see.
    bins = np.bincount((arrivals // 5).astype(int))
    return {"requests": len(trace), "duration_s": trace.duration,
            "mean_rate_per_s": len(trace) / trace.duration if trace.duration else None,
            "interarrival_cv": float(np.std(gaps) / np.mean(gaps)) if len(gaps) > 1 else None,
            "arrivals_per_5s_max": int(bins.max()), "arrivals_per_5s_empty_windows": int(np.sum(bins == 0)),
            "prompt_tokens": {"mean": float(prompts.mean()), "p50": float(np.median(prompts)),
                              "p90": percentile(prompts, 90), "max": int(prompts.max())},
            "output_tokens": {"mean": float(outputs.mean()), "p50": float(np.median(outputs)),
                              "p90": percentile(outputs, 90), "max": int(outputs.max())},
            "prompt_over_output_tokens": float(prompts.sum() / outputs.sum())}


# Helpers ---------------------------------------------------------------------------------------------------


def harli_variants(text: str) -> list[tuple[str, dict]]:
    """'bank_cap=0;slo_margin=0.2,bank_cap=0.5' -> [("bank_cap=0", {...}), ("slo_margin=0.2,bank_cap=0.5", {...})]."""
    out = []
    for variant in filter(None, (v.strip() for v in text.split(";"))):
        fields = {}
        for item in variant.split(","):
            key, value = item.split("=")
            fields[key.strip()] = float(value)
        out.append((variant, fields))
    return out


def engine_config(args, policy: str, slo_ms: float | None, calib_dir: str, **extra) -> EngineConfig:
    return EngineConfig(max_batch=args.max_batch, prefill_chunk=args.prefill_chunk, max_seq_len=args.max_seq_len,
                        page_buckets=tuple(args.page_buckets), policy=policy, tpot_slo_ms=slo_ms,
                        temporal_k=args.temporal_k, calibration_dir=calib_dir, compile_threads=os.cpu_count() or 1,
                        **extra)


def finetune_job(args) -> FinetuneJob:
    return FinetuneJob(total_steps=10**9, eval_interval=0, micro_batch_rows=args.micro_rows,
                       seq_len=args.micro_seq_len, seed=args.seed)


# The SLO base and the standalone finetune -------------------------------------------------------------------


def serve_trace(engine: Engine, trace: Trace, args, label: str, progress=None) -> tuple[list, list, float]:
    """Serves the trace in real time; (outputs, the step records of the serve, wall seconds)."""
    requests = trace.to_requests(engine.cfg.vocab_size, seed=args.seed)
    first_record = len(engine.step_records)
    outputs: list[GenerationOutput] = []
    start = last_print = time.perf_counter()
    for event in engine.serve(requests):
        if isinstance(event, FinishedEvent):
            outputs.append(event.output)
        now = time.perf_counter()
        if now - last_print >= 15:
            last_print = now
            say(f"  [{label}] {now - start:6.1f}s: {len(outputs)}/{len(requests)} finished"
                + (f", {progress()} finetune tokens" if progress else ""))
    wall = time.perf_counter() - start
    bad = [o for o in outputs if o.finish_reason is not FinishReason.LENGTH]
    if bad or len(outputs) != len(requests):
        raise RuntimeError(f"[{label}] {len(outputs)} outputs for {len(requests)} requests; "
                           f"unexpected: {[(o.request_id, o.finish_reason, o.error) for o in bad[:3]]}")
    return outputs, engine.step_records[first_record:], wall


def measure_slo_base(engine: Engine, args, trace: Trace) -> tuple[dict, dict]:
    """The trace on a decode-only engine without a finetune job: the solo decode step at its peak concurrent
    decode batch, and the synthetic solo step there (for the drift check); also the run itself (for the slack)."""
    outputs, records, wall = serve_trace(engine, trace, args, "slo base")
    peak = max(r.decode_seqs for r in records)
    base, info = solo_decode_step(records, peak)
    synthetic = engine.time_decode_step(peak)
    return ({"solo_decode_step_s": base, **info, "synthetic_solo_step_ms": to_ms(synthetic, 3),
             "serve_wall_s": wall},
            {"wall_s": wall, "records": records, "outputs": outputs})


def measure_standalone(handle, seconds: float) -> dict:
    """Trained tokens/s of the job alone (the engine has no requests: `wait` trains in single programs)."""
    handle.wait(max_steps=1)  # warm: the first update after the previous attempt
    start_tokens, start = handle.progress().tokens, time.perf_counter()
    steps = 0
    while time.perf_counter() - start < seconds:
        handle.wait(max_steps=1)
        steps += 1
    wall = time.perf_counter() - start
    tokens = handle.progress().tokens - start_tokens
    return {"optimizer_steps": steps, "trained_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "microbatch_s": wall / steps, "trained_tokens_per_microbatch": tokens / steps,
            "job_tokens_per_s_running_time": handle.progress().tokens_per_s}


# One policy run --------------------------------------------------------------------------------------------


def run_policy(model, args, trace: Trace, policy: str, slo_ms: float | None, label: str, **extra) -> dict:
    calib_dir = tempfile.mkdtemp(prefix="harli-colocation-calib-")
    config = engine_config(args, policy, slo_ms, calib_dir, **extra)
    with common.LoadMeter() as setup_load:
        t0 = time.perf_counter()
        engine = Engine(model, config)
        handle = engine.finetune(finetune_job(args))
        setup_s = time.perf_counter() - t0
    before = handle.progress()
    idle_before = dataclasses.replace(engine.idle_training)
    predictor = engine.predictor  # the calibration may have replaced it; the serve does not
    fits_before = len(predictor.fit_seconds)
    say(f"  [{label}] serving {len(trace)} requests (setup {setup_s:.1f}s, load {os.getloadavg()[0]:.2f})")
    with common.LoadMeter() as serve_load:
        outputs, records, wall = serve_trace(engine, trace, args, label,
                                             lambda: handle.progress().tokens - before.tokens)
    after, idle = handle.progress(), engine.idle_training
    predictor_state = {"step_margin": predictor.step_margin, "micro_margin": predictor.micro_margin,
                       "window_margin": predictor.window_margin, "window_coef": list(predictor.window_coef),
                       "micro_mean_ms": {f"{k}:{n}": to_ms(v, 3)
                                         for (k, n), v in sorted(predictor.micro_mean.items())}}
    run = {"label": label, "policy": policy, "slo_ms": slo_ms, **extra,
           "setup_s": setup_s, "wall_s": wall, "serve_load": serve_load.record, "setup_load": setup_load.record,
           "outputs": outputs, "records": records, "finetune_tokens": after.tokens - before.tokens,
           "alone": {"calls": idle.calls - idle_before.calls, "seconds": idle.seconds - idle_before.seconds,
                     "tokens": idle.tokens - idle_before.tokens},
           "abandoned_microbatches": after.abandoned_microbatches - before.abandoned_microbatches,
           "reclaims": engine.arena.table.reclaims, "predictor_error": predictor.error_report(),
           "predictor": predictor_state, "predictor_fit_s": list(predictor.fit_seconds)[fits_before:],
           "optimizer_steps": after.step - before.step}
    handle.stop()
    say(f"  [{label}] done in {wall:.1f}s: {run['finetune_tokens']} finetune tokens "
        f"({run['alone']['tokens']} idle), {len(records)} inference steps, "
        f"{sum(1 for r in records if r.train)} windows trained")
    return run


def dump_run(directory: Path, run: dict, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{name}.jsonl").open("w") as f:
        for r in run["records"]:
            f.write(json.dumps({"record": dataclasses.asdict(r)}) + "\n")
        for o in run["outputs"]:
            f.write(json.dumps({"output": {"id": o.request_id, "arrival": o.arrival_time, "prompt": len(o.prompt_ids),
                                           "token_times": list(o.token_times)}}) + "\n")


# Metrics ---------------------------------------------------------------------------------------------------


def busy_intervals(outputs: list[GenerationOutput]) -> float:
    """Seconds during which at least one request was in the system (arrival to last token)."""
    spans = sorted((o.arrival_time, o.token_times[-1]) for o in outputs if o.token_times)
    total, cur_start, cur_end = 0.0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def host_between(records) -> dict:
    gaps = np.array([b.start - (a.end + a.train_time) for a, b in zip(records[:-1], records[1:], strict=True)])
    gaps = gaps[gaps < 0.05]
    return {"mean": to_ms(float(gaps.mean()), 3) if len(gaps) else None, "p99": to_ms(percentile(gaps, 99), 3),
            "total_s": float(gaps.sum())}


def slo_independent(run: dict) -> dict:
    """Figures of a run that do not depend on the SLO."""
    outputs, records, wall = run["outputs"], run["records"], run["wall_s"]
    gaps = np.concatenate([np.diff(o.token_times) for o in outputs if len(o.token_times) > 1])
    ttft = np.array([o.ttft for o in outputs if o.ttft is not None])
    tpots = [o.tpot for o in outputs]
    decode_tokens = sum(len(o.token_ids) for o in outputs)
    infer_time = sum(r.latency for r in records)
    train_time = sum(r.train_time for r in records)
    decision = sum(r.decision_time for r in records)
    window_time = sum(r.window for r in records)
    trained = [r for r in records if r.train]
    co_tokens = run["finetune_tokens"] - run["alone"]["tokens"]
    busy = busy_intervals(outputs)
    peak = max((r.decode_seqs for r in records), default=0)
    out = {
        "wall_s": wall,
        "setup_s": run["setup_s"],
        "requests": len(outputs),
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": decode_tokens / wall,
        "tbt_ms": {"p50": to_ms(percentile(gaps, 50), 3), "p90": to_ms(percentile(gaps, 90), 3),
                   "p99": to_ms(percentile(gaps, 99), 3), "max": to_ms(float(gaps.max()), 3)},
        "ttft_ms": {"p50": to_ms(percentile(ttft, 50), 3), "p99": to_ms(percentile(ttft, 99), 3)},
        "tpot_ms": {"p50": to_ms(percentile(tpots, 50), 3), "p99": to_ms(percentile(tpots, 99), 3),
                    "max": to_ms(max(tpots), 3)},
        "finetune": {
            "trained_tokens": run["finetune_tokens"],
            "tokens_per_s": run["finetune_tokens"] / wall,
            "colocated_tokens": co_tokens,
            "colocated_tokens_per_s": co_tokens / wall,
            # engine.idle_training: each call is one single-program micro-batch, or the rest of a micro-batch in
            # flight when requests ran out (in one micro-step per phase, over however many layers are left).
            "idle_tokens": run["alone"]["tokens"],
            "idle_s": run["alone"]["seconds"],
            "idle_calls": run["alone"]["calls"],
            "idle_call_ms_mean": (to_ms(run["alone"]["seconds"] / run["alone"]["calls"], 3) if run["alone"]["calls"]
                                  else None),
            "optimizer_steps": run["optimizer_steps"],
            # Co-located micro-step efficiency: tokens per second of micro-step time.
            "micro_step_tokens_per_s": co_tokens / train_time if train_time else None,
        },
        "reclaims": run["reclaims"],
        "abandoned_microbatches": run["abandoned_microbatches"],
        "windows": len(records),
        "windows_trained": len(trained),
        "micro_steps": sum(len(r.train) for r in records),
        "scheduler_overhead": decision / window_time if window_time else None,
        "decision_time_us": {"mean": 1e6 * decision / len(records) if records else None,
                             "p99": 1e6 * percentile([r.decision_time for r in records], 99) if records else None},
        "predictor_refits": {"count": len(run["predictor_fit_s"]),
                             "mean_ms": (to_ms(statistics.mean(run["predictor_fit_s"]), 3) if run["predictor_fit_s"]
                                         else None),
                             "max_ms": to_ms(max(run["predictor_fit_s"]), 3) if run["predictor_fit_s"] else None,
                             "total_s": sum(run["predictor_fit_s"])},
        "time_breakdown_s": {"inference_steps": infer_time, "colocated_micro_steps": train_time,
                             "idle_training": run["alone"]["seconds"], "decision": decision,
                             "predictor_refits": sum(run["predictor_fit_s"]),
                             "other_host": wall - infer_time - train_time - run["alone"]["seconds"] - decision
                             - sum(run["predictor_fit_s"])},
        # Host time between windows outside the policy's decision (engine bookkeeping, starting micro-batches,
        # predictor observations; idle sleeps excluded by taking only gaps under 50 ms), per window.
        "host_between_windows_ms": host_between(records),
        "busy_s": busy,
        "idle_s": wall - busy,
        "peak_decode_batch": peak,
        "prefill_steps": sum(1 for r in records if r.prefill_tokens),
        "serve_load": run["serve_load"],
        "setup_load": run["setup_load"],
    }
    if trained:
        budgets = [r.budget for r in trained if r.budget is not None and math.isfinite(r.budget)]
        out["trained_windows"] = {
            "micro_steps_per_window": sum(len(r.train) for r in trained) / len(trained),
            "train_ms_mean": to_ms(statistics.mean(r.train_time for r in trained), 3),
            "budget_ms_mean": to_ms(statistics.mean(budgets), 3) if budgets else None,
            "budget_used_by_actual": sum(r.train_time for r in trained) / sum(budgets) if budgets else None,
            "budget_used_by_predicted": sum(r.predicted for r in trained) / sum(budgets) if budgets else None,
            "over_budget_share": float(np.mean([r.train_time > r.budget for r in trained])) if budgets else None,
        }
    if run["policy"] == "harli":
        finite = [r for r in records if r.budget is not None and math.isfinite(r.budget)]
        out["harli_windows"] = {
            "budget_positive_share": float(np.mean([r.budget > 0 for r in finite])) if finite else None,
            "budget_ms_p50": to_ms(percentile([r.budget for r in finite], 50), 3) if finite else None,
            "budget_ms_p90": to_ms(percentile([r.budget for r in finite], 90), 3) if finite else None,
            "inference_step_ms_p50": to_ms(percentile([r.latency for r in records], 50), 3),
        }
        out["predictor"] = {**run["predictor_error"], **run["predictor"]}
    elif run["predictor_error"].get("windows") and run["slo_ms"]:
        out["predictor"] = {**run["predictor_error"], **run["predictor"]}
    return out


def per_slo(run: dict, slo: float) -> dict:
    """Figures of a run scored at SLO `slo` (seconds); the harvest ratios are added once the standalone figure is
    known."""
    outputs, records = run["outputs"], run["records"]
    tpots = np.array([o.tpot for o in outputs])
    gaps_all = [np.diff(o.token_times) for o in outputs if len(o.token_times) > 1]
    gaps = np.concatenate(gaps_all)
    ft_tps = run["finetune_tokens"] / run["wall_s"]
    # Where the SLO-violating gaps come from: the inference step that ended the gap (prefill in it or not) and
    # whether the window before it (same request's previous token) trained.
    by_end = {r.end: r for r in records}
    causes = {"prefill_in_step": 0, "training_in_window": 0, "both": 0, "neither": 0}
    for o in outputs:
        for a, b in zip(o.token_times[:-1], o.token_times[1:], strict=True):
            if b - a <= slo:
                continue
            step, prev = by_end.get(b), by_end.get(a)
            prefill = bool(step and step.prefill_tokens)
            trained = bool(prev and prev.train)
            causes["both" if prefill and trained else "prefill_in_step" if prefill
                   else "training_in_window" if trained else "neither"] += 1
    out = {
        "slo_ms": to_ms(slo, 3),
        "attainment": float(np.mean(tpots <= slo)),
        "token_attainment": float(np.mean(gaps <= slo)),
        # How close requests ride to the SLO: a policy that spends every banked millisecond ends near 1.0.
        "tpot_over_slo": {"p50": float(np.median(tpots / slo)), "p90": percentile(tpots / slo, 90),
                          "max": float(tpots.max() / slo),
                          "share_in_0.9_to_1.0": float(np.mean((tpots > 0.9 * slo) & (tpots <= slo)))},
        "violating_gaps": causes,
        "finetune_tokens_per_s": ft_tps,
    }
    return out


def solo_decode_step(records, peak: int) -> tuple[float, dict]:
    """Median latency of the decode-only steps (no prefill tokens) at the peak batch; widened to the nearest
    batches below until at least 5 steps are in."""
    pure = [r for r in records if r.prefill_tokens == 0 and r.decode_seqs > 0]
    low = peak
    chosen = [r for r in pure if r.decode_seqs >= low]
    while len(chosen) < 5 and low > 1:
        low -= 1
        chosen = [r for r in pure if r.decode_seqs >= low]
    lat = [r.latency for r in chosen]
    return statistics.median(lat), {"peak_decode_batch": peak, "batches_used": [low, peak], "steps": len(lat),
                                    "median_ms": to_ms(statistics.median(lat), 3),
                                    "p90_ms": to_ms(percentile(lat, 90), 3),
                                    "buckets": sorted({f"{r.bucket_seqs}x{r.bucket_pages}p" for r in chosen})}


def slack_share(run: dict, slo: float) -> float:
    """Share of device time an SLO-tight co-locator could train, keeping the decode-only run's schedule."""
    idle = run["wall_s"] - sum(r.latency for r in run["records"])
    idle = max(idle, 0.0)
    free = idle + sum(max(0.0, slo - r.latency) for r in run["records"])
    total = idle + sum(max(slo, r.latency) for r in run["records"])
    return free / total


def dispatch_probe(reps: int = 200) -> dict:
    """The fixed cost of one synchronized device call: a jitted add on a tiny array, then block_until_ready
    (every training micro-step pays at least this once)."""
    f = jax.jit(lambda x: x + 1)
    x = jax.numpy.zeros(8)
    f(x).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return {"p50_us": 1e6 * statistics.median(times), "p10_us": 1e6 * percentile(times, 10)}


def micro_path(means: dict, layers: int, single_microbatch_s: float | None) -> dict:
    """A whole micro-batch on the micro-step path, per chunk size, from the engine's calibrated micro-step means
    (`micro_mean_ms` of a run's predictor), against the single program's micro-batch time (standalone)."""
    out = {}
    c = 1
    while c <= layers:
        n = layers // c
        kinds = [f"forward:{c}"] * (n - 1) + [f"forward+loss:{c}"] + [f"backward:{c}"] * (n - 1) + \
            [f"backward+commit:{c}"]
        if all(means.get(k) is not None and math.isfinite(means[k]) for k in kinds):
            total = sum(means[k] for k in kinds) / 1e3
            out[str(c)] = {"microbatch_ms": to_ms(total, 3), "micro_steps": len(kinds),
                           "vs_single_program_time": total / single_microbatch_s if single_microbatch_s else None}
        c *= 2
    return out


# Scoring ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    policy: str
    slo_ms: float | None  # the engine's tpot_slo_ms (None: SLO-blind without calibration)
    scored_at: tuple[float, ...]  # the SLO multiples the run is scored at
    extra: dict = dataclasses.field(default_factory=dict)  # EngineConfig overrides


TABLE_KEYS = ("attainment", "token_attainment", "tbt_p99_ms", "ttft_p50_ms", "ttft_p99_ms", "decode_tokens_per_s",
              "finetune_tokens_per_s", "colocated_tokens_per_s", "reclaims", "abandoned", "overhead",
              "windows_trained", "mape", "under_prediction_rate", "other_cpu_share")


def table_row(attempt: dict, key: str) -> dict:
    """One attempt's figures for the summary table at SLO `key` (e.g. "3.0x")."""
    fig, s = attempt["result"]["figures"], attempt["result"]["per_slo"][key]
    pred = fig.get("predictor", {})
    return {"attainment": s["attainment"], "token_attainment": s["token_attainment"],
            "tbt_p99_ms": fig["tbt_ms"]["p99"], "ttft_p50_ms": fig["ttft_ms"]["p50"],
            "ttft_p99_ms": fig["ttft_ms"]["p99"],
            "decode_tokens_per_s": fig["decode_tokens_per_s"], "finetune_tokens_per_s": s["finetune_tokens_per_s"],
            "colocated_tokens_per_s": fig["finetune"]["colocated_tokens_per_s"], "reclaims": fig["reclaims"],
            "abandoned": fig["abandoned_microbatches"], "overhead": fig["scheduler_overhead"],
            "windows_trained": fig["windows_trained"], "mape": pred.get("mape"),
            "under_prediction_rate": pred.get("under_prediction_rate") if pred.get("windows") else None,
            "other_cpu_share": attempt["load"]["other_processes_cpu_share"]}


def median_row(attempts: list[dict], key: str) -> dict:
    """The table row of a run at SLO `key`: each figure's median over the run's valid attempts (None without)."""
    rows = [table_row(a, key) for a in attempts if a["valid"]]
    out: dict = {"valid_attempts": len(rows), "attempts": len(attempts)}
    for k in TABLE_KEYS:
        values = [r[k] for r in rows if r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = statistics.median(values) if values else None
    return out


def summarize_slo(m: float, slo: float, plan: dict[str, Run], comparison: dict, args, standalone_tps: float | None,
                  slack: float, slo_valid: bool) -> dict:
    key = f"{m}x"
    rows = {label: median_row([a for a in comparison["attempts"] if a["side"] == label], key)
            for label, run in plan.items() if m in run.scored_at}
    for row in rows.values():
        harvest = common.ratio(row["finetune_tokens_per_s"], standalone_tps)["value"]
        row["harvest_ratio"] = harvest
        row["harvest_of_slack"] = common.ratio(harvest, slack)["value"]
    sweep = {run.extra["static_layers"]: rows[label]["attainment"] for label, run in plan.items()
             if run.policy == "static" and rows[label]["valid_attempts"]}
    meeting = [layers for layers, a in sweep.items() if a >= TARGETS["attainment_min"]]
    static_choice = max(meeting) if meeting else 0
    candidates = {"decode-only": "decode-only"}
    if f"temporal-{args.temporal_k}" in plan:
        candidates["temporal-K"] = f"temporal-{args.temporal_k}"
    if sweep:
        candidates["static"] = f"static-{static_choice}" if static_choice else "decode-only"
    variants = [(f"harli[{v}]", f"harli[{v}]@{key}") for v, _ in harli_variants(args.harli_variants)]
    table = {name: {"run": label, **rows[label]} for name, label in
             [*candidates.items(), ("harli", f"harli@{key}"), *variants] if label in rows}
    # Only valid runs compete: a baseline without a valid attempt cannot be the best one.
    baselines = {k: v for k, v in table.items() if not k.startswith("harli") and v["valid_attempts"]}
    ok = {k: v for k, v in baselines.items() if v["attainment"] >= TARGETS["attainment_min"]}
    best = max(ok, key=lambda k: ok[k]["finetune_tokens_per_s"]) if ok else None
    entry = {"slo_ms": to_ms(slo, 3), "slo_valid": slo_valid, "slack_share": slack, "static_sweep_attainment": sweep,
             "static_choice_layers": static_choice, "best_baseline": best, "table": table}
    if "harli" not in table:
        return entry
    h = table["harli"]

    def vs(numerator, denominator) -> dict:
        r = common.ratio(numerator, denominator)
        if not slo_valid:
            return {"value": None, "valid": False, "why": "the SLO base was measured under load"}
        if not r["valid"]:
            r["why"] = "no valid run on one side" if h["valid_attempts"] else "harli has no valid run"
        return r

    entry["harli_vs_best_baseline"] = vs(h["finetune_tokens_per_s"],
                                         ok[best]["finetune_tokens_per_s"] if best else None)
    entry["harli_colocated_vs_best_baseline_colocated"] = vs(
        h["colocated_tokens_per_s"], ok[best]["colocated_tokens_per_s"] if best else None)
    # Relaxed: a baseline whose attainment is within 1 point of decode-only's (the trace's own prefill
    # interference, without any training) -- meaningful where no policy can reach 99% at this SLO.
    decode_only = table["decode-only"]
    if decode_only["valid_attempts"]:
        floor = decode_only["attainment"] - 0.01
        ok_relaxed = {k: v for k, v in baselines.items() if v["attainment"] >= floor}
        best_relaxed = max(ok_relaxed, key=lambda k: ok_relaxed[k]["finetune_tokens_per_s"])
        entry["relaxed"] = {"attainment_floor": floor, "best_baseline": best_relaxed,
                            "harli_meets_floor": h["attainment"] >= floor if h["valid_attempts"] else None,
                            "harli_vs_best_baseline": vs(h["finetune_tokens_per_s"],
                                                         ok_relaxed[best_relaxed]["finetune_tokens_per_s"])}
    ratio = entry["harli_vs_best_baseline"]
    entry["targets"] = None if not h["valid_attempts"] else {
        "attainment": h["attainment"] >= TARGETS["attainment_min"],
        "vs_best_baseline": ratio["valid"] and ratio["value"] >= TARGETS["vs_best_baseline_min"],
        "harvest_of_slack": (h["harvest_of_slack"] or 0) >= TARGETS["harvest_of_slack_min"],
        "mape": (h["mape"] if h["mape"] is not None else math.inf) <= TARGETS["mape_max"],
        "under_prediction": (h["under_prediction_rate"] if h["under_prediction_rate"] is not None else math.inf)
        <= TARGETS["under_prediction_max"],
        "overhead": (h["overhead"] or 0) <= TARGETS["overhead_max"]}
    return entry


def print_summary(summary: dict, slo: dict) -> None:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    say("\n" + "=" * 132)
    for key, entry in summary.items():
        say(f"SLO {key} = {entry['slo_ms']:.1f} ms (solo decode step {slo['solo_decode_step_ms']:.1f} ms at peak batch "
            f"{slo['peak_decode_batch']}{'' if slo['valid'] else ', INVALID: measured under load'}); slack share "
            f"{entry['slack_share']:.2f}; static sweep {entry['static_sweep_attainment']} -> "
            f"{entry['static_choice_layers']}")
        say(f"{'policy':<18} {'run':<23} {'valid':>5} {'attain':>7} {'tok-att':>7} {'TBTp99':>8} {'TTFTp99':>8} "
            f"{'dec t/s':>8} {'ft t/s':>8} {'co t/s':>8} {'harvest':>7} {'h/slack':>7} {'recl':>5} {'aband':>5} "
            f"{'ovhd%':>6} {'trained':>7} {'MAPE':>6} {'under':>6} {'other%':>6}")
        for name, t in entry["table"].items():
            say(f"{name:<18} {t['run']:<23} {t['valid_attempts']:>2}/{t['attempts']:<2} "
                f"{f(t['attainment'], '7.3f')} {f(t['token_attainment'], '7.3f')} {f(t['tbt_p99_ms'], '8.1f')} "
                f"{f(t['ttft_p99_ms'], '8.1f')} {f(t['decode_tokens_per_s'], '8.1f')} "
                f"{f(t['finetune_tokens_per_s'], '8.1f')} {f(t['colocated_tokens_per_s'], '8.1f')} "
                f"{f(t['harvest_ratio'], '7.3f')} {f(t['harvest_of_slack'], '7.3f')} {f(t['reclaims'], '5.0f')} "
                f"{f(t['abandoned'], '5.0f')} {f(t['overhead'] and 100 * t['overhead'], '6.2f')} "
                f"{f(t['windows_trained'], '7.0f')} {f(t['mape'], '6.3f')} {f(t['under_prediction_rate'], '6.3f')} "
                f"{f(t['other_cpu_share'] and 100 * t['other_cpu_share'], '6.1f')}")
        if "harli_vs_best_baseline" in entry:
            r = entry["harli_vs_best_baseline"]
            say(f"harli / best baseline meeting 99% ({entry['best_baseline']}): "
                + (f"{r['value']:.2f}x" if r["valid"] else f"invalid ({r.get('why')})")
                + f"; targets {entry['targets']}")
        say("")


# Main ------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    settings = common.comparison_settings(args)
    trace_path = Path(args.trace) if args.trace else DEFAULT_TRACE
    if args.write_trace:
        trace = generated_trace(args)
        write_trace(trace, trace_path, generated_comment(trace, args))
        say(f"wrote {trace_path}: {trace_stats(trace)}")
        return
    if args.quick and not args.trace:
        trace = generated_trace(args)
        trace_source = {"generated": dict(requests=args.requests, rate=args.rate, cv=args.cv,
                                          prompt_mean=args.prompt_mean, output_mean=args.output_mean,
                                          seed=args.seed)}
    else:
        trace = load_trace(trace_path, strict=True)
        trace_source = {"path": str(trace_path.relative_to(REPO) if trace_path.is_relative_to(REPO) else trace_path),
                        "comment": trace.comment}
    stats = trace_stats(trace)
    say(f"colocation: {args.model}, trace {trace_source.get('path', 'generated')} ({stats['requests']} requests over "
        f"{stats['duration_s']:.0f}s), micro-batch {args.micro_rows}x{args.micro_seq_len}, "
        f"SLO multiples {args.slo_multiples}, load {[round(x, 2) for x in os.getloadavg()]}")
    model = load_model(args.model, seed=args.seed)
    cfg = model.cfg
    static_sweep = args.static_sweep or [1 << i for i in range(cfg.num_layers.bit_length())
                                         if 1 << i <= cfg.num_layers]
    if max(r.prompt_tokens + r.output_tokens for r in trace.requests) > args.max_seq_len:
        raise SystemExit(f"the trace has requests longer than --max-seq-len {args.max_seq_len}")
    if min(r.output_tokens for r in trace.requests) < 2:
        raise SystemExit("every request of the trace needs at least 2 output tokens (for a TPOT)")

    # 1. The SLO base: once, on a quiet machine, before any policy runs; every policy is held to it.
    say("SLO base (the trace, decode only, no finetune job):")
    base_engine = Engine(model, engine_config(args, "decode-only", None, tempfile.mkdtemp(prefix="harli-colocation-")))
    quiet = common.wait_for_quiet(args.max_other_share, settings["quiet_timeout"], settings["quiet_sample"], say)
    with common.LoadMeter() as slo_load:
        base_info, base_run = measure_slo_base(base_engine, args, trace)
    del base_engine
    gc.collect()
    share = slo_load.record["other_processes_cpu_share"]
    slo_valid = share is not None and share <= args.max_other_share
    base = base_info.pop("solo_decode_step_s")
    slos = {m: m * base for m in args.slo_multiples}
    slacks = {m: slack_share(base_run, s) for m, s in slos.items()}
    say(f"  solo decode step at the peak batch {base_info['peak_decode_batch']}: {base * 1e3:.2f} ms -> SLOs "
        + ", ".join(f"{m}x = {s * 1e3:.2f} ms" for m, s in slos.items())
        + f" (other processes {share}: {'valid' if slo_valid else 'INVALID'})")
    del base_run

    # 2. Every run, in a random order per round.
    calib_slo = slos[min(slos)] * 1e3 if args.calibrate_baselines else None
    blind = tuple(args.slo_multiples)
    plan: dict[str, Run] = {"decode-only": Run("decode-only", None, blind)}
    if "temporal-K" in args.policies:
        plan[f"temporal-{args.temporal_k}"] = Run("temporal-K", calib_slo, blind)
    if "static" in args.policies:
        for layers in static_sweep:
            plan[f"static-{layers}"] = Run("static", calib_slo, blind, {"static_layers": layers})
    if "harli" in args.policies:
        for m, slo in slos.items():
            plan[f"harli@{m}x"] = Run("harli", slo * 1e3, (m,))
            for variant, overrides in harli_variants(args.harli_variants):
                plan[f"harli[{variant}]@{m}x"] = Run("harli", slo * 1e3, (m,), overrides)

    standalone_engine = Engine(model, engine_config(args, "decode-only", None,
                                                    tempfile.mkdtemp(prefix="harli-colocation-calib-")))
    standalone_handle = standalone_engine.finetune(finetune_job(args))
    dumped: dict[str, int] = {}

    def attempt(label: str) -> dict:
        run_plan = plan[label]
        say(f"{label}:")
        run = run_policy(model, args, trace, run_plan.policy, run_plan.slo_ms, label, **run_plan.extra)
        gc.collect()  # the run's engine
        if args.dump:
            dumped[label] = dumped.get(label, 0) + 1
            dump_run(Path(args.dump), run, f"{label}-attempt{dumped[label]}")
        return {"figures": slo_independent(run),
                "per_slo": {f"{m}x": per_slo(run, slos[m]) for m in run_plan.scored_at}}

    def describe(result: dict) -> str:
        if "tokens_per_s" in result:
            return f"standalone {result['tokens_per_s']:.1f} trained tokens/s"
        fig = result["figures"]
        return (f"{fig['finetune']['tokens_per_s']:.1f} finetune tokens/s, TPOT p99 {fig['tpot_ms']['p99']:.2f} ms, "
                f"wall {fig['wall_s']:.1f} s")

    sides = {"standalone": lambda: measure_standalone(standalone_handle, args.standalone_seconds),
             **{label: functools.partial(attempt, label) for label in plan}}
    comparison = common.interleave(sides, args.rounds, seed=args.seed, log=say, describe=describe,
                                   quiet_before_each=True, **settings)

    # 3. Drift: the synthetic solo decode step at the peak batch, now against the SLO base run's.
    with common.LoadMeter() as drift_load:
        drift_ms = to_ms(standalone_engine.time_decode_step(base_info["peak_decode_batch"]), 3)
    standalone = common.figure(comparison, "standalone", "tokens_per_s")
    standalone_microbatch = common.figure(comparison, "standalone", "microbatch_s")["median"]
    dispatch = dispatch_probe()

    slo = {"valid": slo_valid, "load": slo_load.record, "quiet_wait": quiet, "solo_decode_step_ms": to_ms(base, 3),
           **base_info, "slo_ms": {f"{m}x": to_ms(s, 3) for m, s in slos.items()},
           "definition": "median latency of decode-only steps (no prefill tokens) at the peak concurrent decode batch "
                         "of the trace served by a decode-only engine without a finetune job (widened to lower "
                         "batches until >= 5 steps); measured once, before any policy run",
           "drift_check": {"synthetic_solo_step_ms_end": drift_ms, "load": drift_load.record,
                           "end_over_start": common.ratio(drift_ms, base_info["synthetic_solo_step_ms"])["value"]}}
    summary = {f"{m}x": summarize_slo(m, s, plan, comparison, args, standalone["median"], slacks[m], slo_valid)
               for m, s in slos.items()}
    print_summary(summary, slo)
    median = "-" if standalone["median"] is None else f"{standalone['median']:.1f}"
    say(f"standalone finetune {median} trained tokens/s (median of {standalone['valid_attempts']} valid of "
        f"{standalone['attempts']}); run order per round {comparison['order']}")

    last_valid = {a["side"]: a["result"] for a in comparison["attempts"] if a["valid"] and a["side"] != "standalone"}
    payload = {
        "config": {"model": str(Path(args.model).relative_to(REPO)) if Path(args.model).is_relative_to(REPO)
                   else str(args.model),
                   "engine": {k: v for k, v in dataclasses.asdict(engine_config(args, "harli", None, "<temp>")).items()
                              if k not in ("policy", "tpot_slo_ms")},
                   "finetune_job": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in dataclasses.asdict(finetune_job(args)).items()},
                   "slo_multiples": args.slo_multiples, "static_sweep": static_sweep, "temporal_k": args.temporal_k,
                   "seed": args.seed, "rounds": args.rounds, "quick": args.quick,
                   "harli_variants": args.harli_variants, "standalone_seconds": args.standalone_seconds},
        "model": {"name": cfg.name, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "dtype": cfg.dtype,
                  "params": int(sum(x.size for x in jax.tree.leaves(model.params)))},
        "trace": {**trace_source, **stats},
        "targets": TARGETS,
        "slo": slo,
        "policy_order": comparison["order"],
        "runs": {label: {"policy": r.policy, "slo_ms": r.slo_ms, "scored_at": [f"{m}x" for m in r.scored_at],
                         **r.extra, "valid_attempts": len(common.valid_results(comparison, label)),
                         "attempts": sum(a["side"] == label for a in comparison["attempts"])}
                 for label, r in plan.items()},
        "standalone_finetune": {"tokens_per_s": standalone["median"], "microbatch_s": standalone_microbatch,
                                "valid_attempts": standalone["valid_attempts"], "attempts": standalone["attempts"],
                                "path": "single program per micro-batch (engine idle)"},
        "summary": summary,
        "analysis": {
            "dispatch_sync_probe": dispatch,
            "micro_path_vs_single_program": {
                label: micro_path(res["figures"]["predictor"]["micro_mean_ms"], cfg.num_layers, standalone_microbatch)
                for label, res in last_valid.items() if plan[label].policy == "harli"},
        },
        "comparison": comparison,
    }
    out = common.output_dir(args)
    if out is None:
        say("--quick without --out: no result file written")
        return
    say(f"wrote {common.write_result('colocation', payload, out)}")


if __name__ == "__main__":
    main()
