"""Co-location: serve a bursty inference trace under a TPOT SLO while a LoRA finetune job trains in the slack,
under every scheduling policy, one after another in one process on the same trace.

The trace (`configs/traces/colocation-small.csv`, written by `--write-trace` with the seeded generator below):
Gamma-renewal arrivals with a coefficient of variation > 1 (bursts and lulls), chat-like lengths (prompt
lognormal, mean ~100 tokens; output lognormal, mean ~45 tokens), both clipped to the engine's context. Prompts
are random token ids (seeded per request), every request decodes exactly its `output_tokens` (EOS ignored).

Runs, each on a fresh `Engine` over the same weights (EngineConfig(policy=..., tpot_slo_ms=...,
calibration_dir=<temp dir>)), with a fresh `engine.finetune(FinetuneJob(total_steps=huge, eval_interval=0))`
of the default (embedded) task at the micro-batch shape `--micro-rows x --micro-seq-len`:

1. standalone: the finetune job alone (no requests), `handle.wait(max_steps=N)`; trained tokens/s over its
   wall time. Measured at the start and again at the end (the mean is the harvest ratio's denominator).
2. decode-only: the trace with training only while no request runs. Its step records give the trace's peak
   concurrent decode batch and the solo decode step there (median latency of the decode-only steps -- no
   prefill tokens -- at that batch); SLO = `--slo-multiples` x that step.
3. temporal-K (K = `--temporal-k` inference steps, then K one-layer micro-steps), SLO-blind.
4. static: one chunk of L layers after every inference step, for L in `--static-sweep`; per SLO the largest L
   with >= 99% request-level TPOT attainment is what a careful operator would configure (0 = decode-only if
   none does). The SLO-blind runs (2-4) are the same whatever the SLO, so each runs once and is scored at
   every SLO.
5. harli, once per SLO (its budget depends on the SLO).

Per policy and SLO: request-level TPOT attainment (GenerationOutput.tpot <= SLO), token-level attainment (gaps
between consecutive tokens <= SLO), TBT P50/P90/P99, TTFT P50/P99, decode tokens/s, finetune trained tokens/s
during the serve (split into co-located micro-steps and idle single-program training), harvest ratio (÷
standalone) and harvest ÷ the slack the trace leaves at that SLO, reclaims, abandoned micro-batches, predictor
error (`engine.predictor.error_report()`), scheduler overhead (sum of decision_time ÷ sum of windows =
inference step + training after it), windows that trained, and where the SLO-violating token gaps come from.
Per SLO: harli's finetune tokens/s ÷ the best baseline that meets 99% attainment.

"Slack the trace leaves" at SLO S, from the decode-only run: (idle time + sum over inference steps of
max(0, S - step latency)) ÷ (idle time + sum of max(S, step latency)) -- the share of device time a co-locator
could train if it stretched every inference step to exactly the SLO, keeping the same schedule (no margin).

Writes bench/results/colocation-<device>.json (machine, JAX version, date, `uptime` load per run).

    python bench/colocation.py                       # small.yaml, the bundled trace, SLO 1.5x and 3x
    python bench/colocation.py --quick               # smoke run: tiny.yaml, a short generated trace, no file
    python bench/colocation.py --write-trace         # regenerate configs/traces/colocation-small.csv and exit
    python bench/colocation.py --policies harli,decode-only --slo-multiples 3
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from common import write_result

from harli_jax import Engine, EngineConfig, FinetuneJob, SamplingParams
from harli_jax.model.loader import load_model
from harli_jax.runtime.request import FinishedEvent, FinishReason, GenerationOutput, Request

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO / "configs/traces/colocation-small.csv"
TARGETS = {"attainment_min": 0.99, "vs_best_baseline_min": 1.6, "harvest_of_slack_min": 0.8, "mape_max": 0.05,
           "under_prediction_max": 0.01, "overhead_max": 0.02}
ALL_POLICIES = ("decode-only", "temporal-K", "static", "harli")


def say(message: str) -> None:
    print(message, flush=True)


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model YAML (default configs/models/small.yaml)")
    parser.add_argument("--trace", default=None, help=f"trace CSV (default {DEFAULT_TRACE.relative_to(REPO)})")
    parser.add_argument("--slo-multiples", type=float_list, default=[1.5, 3.0],
                        help="SLOs as multiples of the solo decode step at the peak batch (default 1.5,3)")
    parser.add_argument("--policies", default=",".join(ALL_POLICIES),
                        help="comma separated subset of " + ",".join(ALL_POLICIES) + " (decode-only always runs)")
    parser.add_argument("--static-sweep", type=int_list, default=None,
                        help="static layers per window to sweep (default 1,2,4,... up to the model's layers)")
    parser.add_argument("--temporal-k", type=int, default=2, help="temporal-K: K inference steps, K micro-steps")
    parser.add_argument("--micro-rows", type=int, default=1, help="finetune micro-batch rows (default 1)")
    parser.add_argument("--micro-seq-len", type=int, default=None, help="finetune micro-batch tokens per row "
                        "(default 64; 32 with --quick)")
    parser.add_argument("--standalone-seconds", type=float, default=None,
                        help="approximate length of each standalone finetune measurement (default 20; 3 quick)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--prefill-chunk", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=None, help="engine context (default 256; 128 quick)")
    parser.add_argument("--page-buckets", type=int_list, default=None, help="pages per sequence buckets "
                        "(default 4,8,16; 4,8 quick)")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and the generated trace")
    parser.add_argument("--harli-variants", default="bank_cap=0",
                        help="extra harli runs per SLO with EngineConfig overrides, e.g. 'bank_cap=0;slo_margin=0.2' "
                             "(';' between variants, ',' between fields of one; default bank_cap=0: no banked slack, an ablation of the "
                             "bank; '' for none); reported as extra rows")
    parser.add_argument("--quiet-share", type=float, default=0.1,
                        help="before each run, wait until other processes use at most this share of the CPU "
                             "(default 0.1; 1 disables)")
    parser.add_argument("--quiet-timeout", type=float, default=600.0, help="longest wait for quiet, seconds")
    parser.add_argument("--calibrate-baselines", action="store_true",
                        help="also calibrate the predictor on the SLO-blind runs (their predictor error is then "
                             "reported; costs a calibration sweep per run)")
    parser.add_argument("--dump", default=None, help="directory for each run's raw step records and token times "
                        "(JSON lines, for offline analysis)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny.yaml, a short generated trace; writes no result unless --write")
    parser.add_argument("--write", action="store_true", help="write the result file even with --quick")
    # The trace generator.
    parser.add_argument("--write-trace", action="store_true", help="write the trace CSV (to --trace) and exit")
    parser.add_argument("--requests", type=int, default=None, help="generated trace: requests (default 50)")
    parser.add_argument("--rate", type=float, default=None, help="generated trace: mean arrivals/s (default 0.5)")
    parser.add_argument("--cv", type=float, default=2.0, help="generated trace: coefficient of variation of the "
                        "inter-arrival times (Gamma renewal process; > 1 is bursty)")
    parser.add_argument("--prompt-mean", type=float, default=None, help="generated trace: mean prompt tokens "
                        "(default 100; 40 quick)")
    parser.add_argument("--output-mean", type=float, default=None, help="generated trace: mean output tokens "
                        "(default 45; 16 quick)")
    args = parser.parse_args()
    quick = dict(model=REPO / "configs/models/tiny.yaml", micro_seq_len=32, standalone_seconds=3.0, max_seq_len=128,
                 page_buckets=[4, 8], requests=24, rate=4.0, prompt_mean=40.0, output_mean=16.0)
    full = dict(model=REPO / "configs/models/small.yaml", micro_seq_len=64, standalone_seconds=20.0, max_seq_len=256,
                page_buckets=[4, 8, 16], requests=50, rate=0.5, prompt_mean=100.0, output_mean=45.0)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.policies = [p for p in args.policies.split(",") if p]
    unknown = set(args.policies) - set(ALL_POLICIES)
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}; choose from {ALL_POLICIES}")
    if not args.slo_multiples or min(args.slo_multiples) <= 0:
        parser.error("--slo-multiples must be positive")
    return args


# The trace -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TraceRow:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def generate_trace(requests: int, rate: float, cv: float, prompt_mean: float, output_mean: float,
                   max_seq_len: int, seed: int) -> list[TraceRow]:
    """A seeded bursty chat-like trace.

    Arrivals: a Gamma renewal process, inter-arrival times ~ Gamma(shape = 1/cv^2, scale = cv^2/rate) (mean
    1/rate, coefficient of variation cv; cv > 1 gives bursts separated by lulls), first arrival at 0.5 s.
    Prompt tokens ~ lognormal (sigma 0.6, mean `prompt_mean`), output tokens ~ lognormal (sigma 0.3, mean
    `output_mean`); outputs clipped to [8, max_seq_len / 3], prompts to [8, max_seq_len - output].
    """
    rng = np.random.default_rng([seed, 2511])
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, cv**2 / rate, requests)
    arrivals = 0.5 + np.concatenate([[0.0], np.cumsum(gaps[1:])])

    def lognormal(mean, sigma, n):
        return rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)

    outputs = np.clip(np.rint(lognormal(output_mean, 0.3, requests)), 8, max_seq_len // 3).astype(int)
    prompts = np.rint(lognormal(prompt_mean, 0.6, requests)).astype(int)
    prompts = np.clip(prompts, 8, max_seq_len - outputs)
    return [TraceRow(round(float(a), 4), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs, strict=True)]


def write_trace(path: Path, rows: list[TraceRow], args) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = trace_stats(rows)
    command = (f"python bench/colocation.py --write-trace --requests {args.requests} --rate {args.rate} "
               f"--cv {args.cv} --prompt-mean {args.prompt_mean} --output-mean {args.output_mean} "
               f"--max-seq-len {args.max_seq_len} --seed {args.seed}")
    with path.open("w", newline="") as f:
        f.write(f"# Generated by `{command}` (bench/colocation.py generate_trace): Gamma-renewal arrivals "
                f"(mean {args.rate}/s, CV {args.cv}), prompt tokens lognormal (mean {args.prompt_mean}, sigma 0.6), "
                f"output tokens lognormal (mean {args.output_mean}, sigma 0.3), clipped to a {args.max_seq_len}-token "
                f"context. Realized: {len(rows)} requests over {rows[-1].arrival_s:.0f} s "
                f"({stats['mean_rate_per_s']:.2f}/s, inter-arrival CV {stats['interarrival_cv']:.2f}, at most "
                f"{stats['arrivals_per_5s_max']} arrivals in a 5 s window). Prompts are random token ids drawn by the "
                f"benchmark (seed {args.seed}, per request).\n")
        writer = csv.writer(f)
        writer.writerow(["arrival_s", "prompt_tokens", "output_tokens"])
        for r in rows:
            writer.writerow([f"{r.arrival_s:.4f}", r.prompt_tokens, r.output_tokens])


def read_trace(path: Path) -> tuple[list[TraceRow], str]:
    lines = path.read_text().splitlines()
    comment = " ".join(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
    body = [line for line in lines if line.strip() and not line.startswith("#")]
    rows = [TraceRow(float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
            for r in csv.DictReader(body)]
    return sorted(rows, key=lambda r: r.arrival_s), comment


def trace_stats(rows: list[TraceRow]) -> dict:
    gaps = np.diff([r.arrival_s for r in rows])
    prompts = np.array([r.prompt_tokens for r in rows])
    outputs = np.array([r.output_tokens for r in rows])
    # Arrivals per 5 s window: the burstiness a reader can see.
    bins = np.bincount((np.array([r.arrival_s for r in rows]) // 5).astype(int))
    return {"requests": len(rows), "duration_s": rows[-1].arrival_s, "mean_rate_per_s": len(rows) / rows[-1].arrival_s,
            "interarrival_cv": float(np.std(gaps) / np.mean(gaps)) if len(gaps) > 1 else None,
            "arrivals_per_5s_max": int(bins.max()), "arrivals_per_5s_empty_windows": int(np.sum(bins == 0)),
            "prompt_tokens": {"mean": float(prompts.mean()), "p50": float(np.median(prompts)),
                              "p90": float(np.percentile(prompts, 90)), "max": int(prompts.max())},
            "output_tokens": {"mean": float(outputs.mean()), "p50": float(np.median(outputs)),
                              "p90": float(np.percentile(outputs, 90)), "max": int(outputs.max())},
            "prompt_over_output_tokens": float(prompts.sum() / outputs.sum())}


def make_requests(rows: list[TraceRow], vocab: int, seed: int) -> list[Request]:
    out = []
    for i, r in enumerate(rows):
        rng = np.random.default_rng([seed, i])
        prompt = rng.integers(3, vocab, r.prompt_tokens).tolist()
        out.append(Request(prompt, SamplingParams(max_tokens=r.output_tokens, ignore_eos=True), arrival=r.arrival_s,
                           request_id=f"trace-{i}"))
    return out


# Machine load ----------------------------------------------------------------------------------------------


class LoadMeter:
    """Load average and the CPU share other processes used while a phase ran (/proc/stat minus our own)."""

    @staticmethod
    def _snapshot():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6)) / tick
        return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime

    def __enter__(self):
        self.start = self._snapshot()
        self.load_before = [round(x, 2) for x in os.getloadavg()]
        return self

    def __exit__(self, *exc):
        end = self._snapshot()
        self.record = {"loadavg_before": self.load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        if self.start and end:
            wall = end[0] - self.start[0]
            other = (end[1] - self.start[1]) - (end[2] - self.start[2])
            self.record["other_processes_cpu_share"] = round(max(other, 0.0) / (wall * (os.cpu_count() or 1)), 3)
        return False


def other_cpu_share(seconds: float) -> float | None:
    """The CPU share (of all cores) other processes use over `seconds` while this one sleeps."""
    meter = LoadMeter()
    with meter:
        time.sleep(seconds)
    return meter.record.get("other_processes_cpu_share")


def wait_for_quiet(max_share: float, timeout: float, sample: float = 5.0) -> dict:
    """Waits (up to `timeout` s) until other processes use at most `max_share` of the CPU over two consecutive
    `sample`-second windows: the machine is shared, and a run under a neighbour's load is not comparable with
    one without."""
    start = time.perf_counter()
    shares = []
    while True:
        shares.append(other_cpu_share(sample))
        quiet = len(shares) >= 2 and all(x is not None and x <= max_share for x in shares[-2:])
        waited = time.perf_counter() - start
        if quiet or waited >= timeout or shares[-1] is None:
            return {"waited_s": round(waited, 1), "quiet": quiet, "last_shares": shares[-2:]}
        if len(shares) % 6 == 0:
            say(f"  waiting for a quiet machine: other processes use {shares[-1]:.0%} of the CPU "
                f"({waited:.0f}s so far)")


# Helpers ---------------------------------------------------------------------------------------------------


def pct(values, q) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def ms(x: float | None) -> float | None:
    return None if x is None else round(1e3 * x, 3)


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


# Standalone finetune ---------------------------------------------------------------------------------------


def measure_standalone(handle, seconds: float) -> dict:
    """Trained tokens/s of the job alone (the engine has no requests: `wait` trains in single programs)."""
    handle.wait(max_steps=2)  # warm: the first updates after compilation
    runner = handle._runner
    start_tokens, start = handle.progress().tokens, time.perf_counter()
    steps = 0
    while time.perf_counter() - start < seconds:
        handle.wait(max_steps=1)
        steps += 1
    wall = time.perf_counter() - start
    tokens = handle.progress().tokens - start_tokens
    return {"optimizer_steps": steps, "trained_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "microbatch_s": wall / steps, "trained_tokens_per_microbatch": tokens / steps,
            "job_tokens_per_s_running_time": runner.progress().tokens_per_s}


# One policy run --------------------------------------------------------------------------------------------


def run_policy(model, args, rows: list[TraceRow], policy: str, slo_ms: float | None, label: str,
               **extra) -> dict:
    calib_dir = tempfile.mkdtemp(prefix="harli-colocation-calib-")
    config = engine_config(args, policy, slo_ms, calib_dir, **extra)
    with LoadMeter() as load:
        t0 = time.perf_counter()
        engine = Engine(model, config)
        handle = engine.finetune(finetune_job(args))
        setup_s = time.perf_counter() - t0
        runner = handle._runner
        # Instrumentation (instance attributes of this engine only): training done while no request runs.
        alone = {"time": 0.0, "tokens": 0, "calls": 0, "durations": []}
        original_alone = engine._train_alone

        def counted_alone():
            t, n = time.perf_counter(), runner.tokens
            original_alone()
            alone["time"] += time.perf_counter() - t
            alone["durations"].append(time.perf_counter() - t)
            alone["tokens"] += runner.tokens - n
            alone["calls"] += 1

        engine._train_alone = counted_alone
        fits = []
        original_fit = engine.predictor.fit

        def timed_fit():
            t = time.perf_counter()
            original_fit()
            fits.append(time.perf_counter() - t)

        engine.predictor.fit = timed_fit
        requests = make_requests(rows, engine.cfg.vocab_size, args.seed)
        before = handle.progress()
        first_record = len(engine.step_records)
        outputs: list[GenerationOutput] = []
        say(f"  [{label}] serving {len(requests)} requests (setup {setup_s:.1f}s, load {os.getloadavg()[0]:.2f})")
        start = last_print = time.perf_counter()
        for event in engine.serve(requests):
            if isinstance(event, FinishedEvent):
                outputs.append(event.output)
            now = time.perf_counter()
            if now - last_print >= 15:
                last_print = now
                say(f"  [{label}] {now - start:6.1f}s: {len(outputs)}/{len(requests)} finished, "
                    f"{handle.progress().tokens - before.tokens} finetune tokens")
        wall = time.perf_counter() - start
        after = handle.progress()
        records = engine.step_records[first_record:]
        report = engine.predictor.error_report()
        predictor_state = {"step_margin": engine.predictor.step_margin, "micro_margin": engine.predictor.micro_margin,
                           "window_margin": engine.predictor.window_margin,
                           "window_coef": list(engine.predictor.window_coef),
                           "micro_mean_ms": {f"{k}:{n}": ms(v) for (k, n), v in
                                             sorted(engine.predictor.micro_mean.items())}}
        reclaims = engine.page_table.reclaims
        handle.stop()
    bad = [o for o in outputs if o.finish_reason is not FinishReason.LENGTH]
    if bad or len(outputs) != len(requests):
        raise RuntimeError(f"[{label}] {len(outputs)} outputs for {len(requests)} requests; "
                           f"unexpected: {[(o.request_id, o.finish_reason, o.error) for o in bad[:3]]}")
    del engine, handle, runner
    gc.collect()
    run = {"label": label, "policy": policy, "slo_ms": slo_ms, **{k: v for k, v in extra.items()},
           "setup_s": setup_s, "wall_s": wall, "load": load.record,
           "outputs": outputs, "records": records, "finetune_tokens": after.tokens - before.tokens,
           "alone": alone, "abandoned_microbatches": after.abandoned_microbatches - before.abandoned_microbatches,
           "reclaims": reclaims, "predictor_error": report, "predictor": predictor_state,
           "predictor_fit_s": fits, "optimizer_steps": after.step - before.step}
    if args.dump:
        dump_run(Path(args.dump), run)
    say(f"  [{label}] done in {wall:.1f}s: {run['finetune_tokens']} finetune tokens "
        f"({alone['tokens']} idle), {len(records)} inference steps, "
        f"{sum(1 for r in records if r.train)} windows trained")
    return run


def dump_run(directory: Path, run: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{run['label']}.jsonl").open("w") as f:
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
    return {"mean": ms(float(gaps.mean())) if len(gaps) else None, "p99": ms(pct(gaps, 99)) if len(gaps) else None,
            "total_s": float(gaps.sum())}


def slo_independent(run: dict) -> dict:
    """Figures of a run that do not depend on the SLO."""
    outputs, records, wall = run["outputs"], run["records"], run["wall_s"]
    gaps = np.concatenate([np.diff(o.token_times) for o in outputs if len(o.token_times) > 1])
    ttft = np.array([o.ttft for o in outputs if o.ttft is not None])
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
        "tbt_ms": {"p50": ms(pct(gaps, 50)), "p90": ms(pct(gaps, 90)), "p99": ms(pct(gaps, 99)),
                   "max": ms(float(gaps.max()))},
        "ttft_ms": {"p50": ms(pct(ttft, 50)), "p99": ms(pct(ttft, 99))},
        "tpot_ms": {"p50": ms(pct([o.tpot for o in outputs], 50)), "p99": ms(pct([o.tpot for o in outputs], 99)),
                    "max": ms(max(o.tpot for o in outputs))},
        "finetune": {
            "trained_tokens": run["finetune_tokens"],
            "tokens_per_s": run["finetune_tokens"] / wall,
            "colocated_tokens": co_tokens,
            "colocated_tokens_per_s": co_tokens / wall,
            "idle_single_program_tokens": run["alone"]["tokens"],
            "idle_single_program_s": run["alone"]["time"],
            # Each call: one single-program micro-batch, or the rest of a micro-batch in flight when requests ran
            # out (in one micro-step per phase, over however many layers are left).
            "idle_calls": run["alone"]["calls"],
            "idle_call_ms": {"p50": ms(pct(run["alone"]["durations"], 50)),
                             "max": ms(max(run["alone"]["durations"], default=None)),
                             "over_1s": sum(d > 1.0 for d in run["alone"]["durations"])},
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
                             "p99": 1e6 * pct([r.decision_time for r in records], 99) if records else None},
        "predictor_refits": {"count": len(run["predictor_fit_s"]),
                             "mean_ms": ms(statistics.mean(run["predictor_fit_s"])) if run["predictor_fit_s"] else None,
                             "max_ms": ms(max(run["predictor_fit_s"])) if run["predictor_fit_s"] else None,
                             "total_s": sum(run["predictor_fit_s"])},
        "time_breakdown_s": {"inference_steps": infer_time, "colocated_micro_steps": train_time,
                             "idle_single_program": run["alone"]["time"], "decision": decision,
                             "predictor_refits": sum(run["predictor_fit_s"]),
                             "other_host": wall - infer_time - train_time - run["alone"]["time"] - decision
                             - sum(run["predictor_fit_s"])},
        # Host time between windows outside the policy's decision (engine bookkeeping, starting micro-batches,
        # predictor observations; idle sleeps excluded by taking only gaps under 50 ms), per window.
        "host_between_windows_ms": host_between(records),
        "busy_s": busy,
        "idle_s": wall - busy,
        "peak_decode_batch": peak,
        "prefill_steps": sum(1 for r in records if r.prefill_tokens),
        "load": run["load"],
        "quiet_wait": run.get("quiet_wait"),
    }
    if trained:
        budgets = [r.budget for r in trained if r.budget is not None and math.isfinite(r.budget)]
        out["trained_windows"] = {
            "micro_steps_per_window": sum(len(r.train) for r in trained) / len(trained),
            "train_ms_mean": ms(statistics.mean(r.train_time for r in trained)),
            "budget_ms_mean": ms(statistics.mean(budgets)) if budgets else None,
            "budget_used_by_actual": sum(r.train_time for r in trained) / sum(budgets) if budgets else None,
            "budget_used_by_predicted": sum(r.predicted for r in trained) / sum(budgets) if budgets else None,
            "over_budget_share": float(np.mean([r.train_time > r.budget for r in trained])) if budgets else None,
        }
    if run["policy"] == "harli":
        finite = [r for r in records if r.budget is not None and math.isfinite(r.budget)]
        out["harli_windows"] = {
            "budget_positive_share": float(np.mean([r.budget > 0 for r in finite])) if finite else None,
            "budget_ms_p50": ms(pct([r.budget for r in finite], 50)) if finite else None,
            "budget_ms_p90": ms(pct([r.budget for r in finite], 90)) if finite else None,
            "inference_step_ms_p50": ms(pct([r.latency for r in records], 50)),
        }
        out["predictor"] = {**run["predictor_error"], **run["predictor"]}
    elif run["predictor_error"].get("windows") and run["slo_ms"]:
        out["predictor"] = {**run["predictor_error"], **run["predictor"]}
    return out


def per_slo(run: dict, slo: float, standalone_tps: float, slack: float | None) -> dict:
    """Figures of a run scored at SLO `slo` (seconds)."""
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
        "slo_ms": ms(slo),
        "attainment": float(np.mean(tpots <= slo)),
        "token_attainment": float(np.mean(gaps <= slo)),
        # How close requests ride to the SLO: a policy that spends every banked millisecond ends near 1.0.
        "tpot_over_slo": {"p50": float(np.median(tpots / slo)), "p90": float(np.percentile(tpots / slo, 90)),
                          "max": float(tpots.max() / slo),
                          "share_in_0.9_to_1.0": float(np.mean((tpots > 0.9 * slo) & (tpots <= slo)))},
        "violating_gaps": causes,
        "finetune_tokens_per_s": ft_tps,
        "harvest_ratio": ft_tps / standalone_tps,
    }
    if slack is not None:
        out["slack_share"] = slack
        out["harvest_of_slack"] = out["harvest_ratio"] / slack if slack else None
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
                                    "median_ms": ms(statistics.median(lat)), "p90_ms": ms(pct(lat, 90)),
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
    return {"p50_us": 1e6 * statistics.median(times), "p10_us": 1e6 * pct(times, 10)}


def micro_path(run: dict, layers: int, single_microbatch_s: float) -> dict:
    """A whole micro-batch on the micro-step path, per chunk size, from the engine's calibrated micro-step means
    (this run's predictor), against the single program's micro-batch time (standalone)."""
    means = run["predictor"]["micro_mean_ms"]
    out = {}
    c = 1
    while c <= layers:
        n = layers // c
        kinds = [f"forward:{c}"] * (n - 1) + [f"forward+loss:{c}"] + [f"backward:{c}"] * (n - 1) + \
            [f"backward+commit:{c}"]
        if all(means.get(k) is not None and math.isfinite(means[k]) for k in kinds):
            total = sum(means[k] for k in kinds) / 1e3
            out[str(c)] = {"microbatch_ms": ms(total), "micro_steps": len(kinds),
                           "vs_single_program_time": total / single_microbatch_s}
        c *= 2
    return out


# Main ------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    trace_path = Path(args.trace) if args.trace else DEFAULT_TRACE
    if args.write_trace:
        rows = generate_trace(args.requests, args.rate, args.cv, args.prompt_mean, args.output_mean,
                              args.max_seq_len, args.seed)
        write_trace(trace_path, rows, args)
        say(f"wrote {trace_path}: {trace_stats(rows)}")
        return
    if args.quick and not args.trace:
        rows = generate_trace(args.requests, args.rate, args.cv, args.prompt_mean, args.output_mean,
                              args.max_seq_len, args.seed)
        trace_source = {"generated": dict(requests=args.requests, rate=args.rate, cv=args.cv,
                                          prompt_mean=args.prompt_mean, output_mean=args.output_mean,
                                          seed=args.seed)}
    else:
        rows, comment = read_trace(trace_path)
        trace_source = {"path": str(trace_path.relative_to(REPO) if trace_path.is_relative_to(REPO) else trace_path),
                        "comment": comment}
    stats = trace_stats(rows)
    load_start = [round(x, 2) for x in os.getloadavg()]
    say(f"colocation: {args.model}, trace {trace_source.get('path', 'generated')} ({stats['requests']} requests over "
        f"{stats['duration_s']:.0f}s), micro-batch {args.micro_rows}x{args.micro_seq_len}, "
        f"SLO multiples {args.slo_multiples}, load {load_start}")
    model = load_model(args.model, seed=args.seed)
    cfg = model.cfg
    static_sweep = args.static_sweep or [1 << i for i in range(cfg.num_layers.bit_length())
                                         if 1 << i <= cfg.num_layers]
    if max(r.prompt_tokens + r.output_tokens for r in rows) > args.max_seq_len:
        raise SystemExit(f"the trace has requests longer than --max-seq-len {args.max_seq_len}")

    # 1. Standalone finetune, measured before every policy run and once at the end: the machine is shared and
    # its load drifts, so each run's harvest ratio uses the measurements just before and after it.
    say("standalone finetune (no requests):")
    standalone_engine = Engine(model, engine_config(args, "decode-only", None,
                                                    tempfile.mkdtemp(prefix="harli-colocation-calib-")))
    standalone_handle = standalone_engine.finetune(finetune_job(args))
    standalone: list[dict] = []

    def probe_standalone(before: str) -> int:
        with LoadMeter() as load:
            m = measure_standalone(standalone_handle, args.standalone_seconds)
        standalone.append({"before": before, **m, "load": load.record})
        say(f"  standalone finetune: {m['tokens_per_s']:.1f} trained tokens/s ({m['microbatch_s'] * 1e3:.0f} ms "
            f"per micro-batch of {m['trained_tokens_per_microbatch']:.1f} trained tokens)")
        return len(standalone) - 1

    runs: dict[str, dict] = {}

    def run_one(policy, slo_ms, label, **extra):
        quiet = wait_for_quiet(args.quiet_share, args.quiet_timeout) if args.quiet_share < 1 else None
        index = probe_standalone(label)
        runs[label] = run_policy(model, args, rows, policy, slo_ms, label, **extra)
        runs[label]["standalone_index"] = index
        runs[label]["quiet_wait"] = quiet

    # 2. decode-only, and the SLOs.
    say("decode-only:")
    run_one("decode-only", None, "decode-only")
    base, base_info = solo_decode_step(runs["decode-only"]["records"],
                                       max(r.decode_seqs for r in runs["decode-only"]["records"]))
    slos = {m: m * base for m in args.slo_multiples}
    say(f"  solo decode step at the peak batch {base_info['peak_decode_batch']}: {base * 1e3:.1f} ms -> SLOs "
        + ", ".join(f"{m}x = {s * 1e3:.1f} ms" for m, s in slos.items()))
    calib_slo = slos[min(slos)] * 1e3 if args.calibrate_baselines else None
    # 3-4. SLO-blind baselines.
    if "temporal-K" in args.policies:
        say(f"temporal-K (K={args.temporal_k}):")
        run_one("temporal-K", calib_slo, f"temporal-{args.temporal_k}")
    if "static" in args.policies:
        for layers in static_sweep:
            say(f"static ({layers} layers per window):")
            run_one("static", calib_slo, f"static-{layers}", static_layers=layers)
    # 5. harli per SLO.
    if "harli" in args.policies:
        for m, slo in slos.items():
            say(f"harli (SLO {m}x = {slo * 1e3:.1f} ms):")
            run_one("harli", slo * 1e3, f"harli@{m}x")
            for variant, overrides in harli_variants(args.harli_variants):
                say(f"harli[{variant}] (SLO {m}x = {slo * 1e3:.1f} ms):")
                run_one("harli", slo * 1e3, f"harli[{variant}]@{m}x", **overrides)
    # decode-only once more: how far the machine drifted between the first run (which set the SLO) and the last.
    say("decode-only again (drift check):")
    run_one("decode-only", None, "decode-only-repeat")
    probe_standalone("end")
    for r in runs.values():
        i = r["standalone_index"]
        r["standalone_tps"] = (standalone[i]["tokens_per_s"] + standalone[i + 1]["tokens_per_s"]) / 2
    standalone_tps = statistics.mean(s["tokens_per_s"] for s in standalone)
    say(f"standalone finetune: mean {standalone_tps:.1f} trained tokens/s over {len(standalone)} measurements "
        f"(min {min(s['tokens_per_s'] for s in standalone):.1f}, max {max(s['tokens_per_s'] for s in standalone):.1f})")
    standalone_microbatch_s = statistics.median(s["microbatch_s"] for s in standalone)
    dispatch = dispatch_probe()
    del standalone_engine, standalone_handle
    gc.collect()

    # Scoring.
    results = {label: {"policy": run["policy"], "static_layers": run.get("static_layers"), "slo_ms": run["slo_ms"],
                       **slo_independent(run)} for label, run in runs.items()}
    slacks = {m: slack_share(runs["decode-only"], slo) for m, slo in slos.items()}
    summary = {}
    for m, slo in slos.items():
        scored = {}
        for label, run in runs.items():
            if run["policy"] == "harli" and not label.endswith(f"@{m}x"):
                continue
            scored[label] = per_slo(run, slo, run["standalone_tps"], slacks[m])
            results[label].setdefault("per_slo", {})[f"{m}x"] = scored[label]
        sweep = {runs[k]["static_layers"]: scored[k]["attainment"] for k in scored if k.startswith("static-")}
        meeting = [layers for layers, a in sweep.items() if a >= TARGETS["attainment_min"]]
        static_choice = max(meeting) if meeting else 0
        candidates = {"decode-only": "decode-only"}
        if f"temporal-{args.temporal_k}" in runs:
            candidates["temporal-K"] = f"temporal-{args.temporal_k}"
        if sweep:
            candidates["static"] = f"static-{static_choice}" if static_choice else "decode-only"
        table = {}
        variants = [(f"harli[{v}]", f"harli[{v}]@{m}x") for v, _ in harli_variants(args.harli_variants)]
        for name, label in [*candidates.items(), ("harli", f"harli@{m}x"), *variants]:
            if label not in scored:
                continue
            s, r = scored[label], results[label]
            table[name] = {"run": label, "attainment": s["attainment"], "token_attainment": s["token_attainment"],
                           "tbt_p99_ms": r["tbt_ms"]["p99"], "ttft_p50_ms": r["ttft_ms"]["p50"],
                           "ttft_p99_ms": r["ttft_ms"]["p99"], "decode_tokens_per_s": r["decode_tokens_per_s"],
                           "finetune_tokens_per_s": s["finetune_tokens_per_s"],
                           "colocated_tokens_per_s": r["finetune"]["colocated_tokens_per_s"],
                           "harvest_ratio": s["harvest_ratio"], "harvest_of_slack": s.get("harvest_of_slack"),
                           "reclaims": r["reclaims"], "abandoned": r["abandoned_microbatches"],
                           "overhead": r["scheduler_overhead"], "windows_trained": r["windows_trained"],
                           "mape": r.get("predictor", {}).get("mape"),
                           "under_prediction_rate": r.get("predictor", {}).get("under_prediction_rate"),
                           "other_cpu_share": r["load"].get("other_processes_cpu_share")}
        baselines = {k: v for k, v in table.items() if not k.startswith("harli")}
        ok = {k: v for k, v in baselines.items() if v["attainment"] >= TARGETS["attainment_min"]}
        best = max(ok, key=lambda k: ok[k]["finetune_tokens_per_s"]) if ok else None
        # Relaxed: a baseline whose attainment is within 1 point of decode-only's (the trace's own prefill
        # interference, without any training) -- meaningful where no policy can reach 99% at this SLO.
        floor = scored["decode-only"]["attainment"] - 0.01
        ok_relaxed = {k: v for k, v in baselines.items() if v["attainment"] >= floor}
        best_relaxed = max(ok_relaxed, key=lambda k: ok_relaxed[k]["finetune_tokens_per_s"])
        entry = {"slo_ms": ms(slo), "slack_share": slacks[m], "static_sweep_attainment": sweep,
                 "static_choice_layers": static_choice, "best_baseline": best, "table": table}
        if "harli" in table:
            h = table["harli"]
            entry["harli_vs_best_baseline"] = (h["finetune_tokens_per_s"] / ok[best]["finetune_tokens_per_s"]
                                               if best else None)
            entry["harli_colocated_vs_best_baseline_colocated"] = (
                h["colocated_tokens_per_s"] / ok[best]["colocated_tokens_per_s"]
                if best and ok[best]["colocated_tokens_per_s"] else None)
            entry["relaxed"] = {
                "attainment_floor": floor, "best_baseline": best_relaxed,
                "harli_meets_floor": h["attainment"] >= floor,
                "harli_vs_best_baseline": h["finetune_tokens_per_s"] / ok_relaxed[best_relaxed]["finetune_tokens_per_s"]}
            pred = results[f"harli@{m}x"].get("predictor", {})
            entry["targets"] = {
                "attainment": h["attainment"] >= TARGETS["attainment_min"],
                "vs_best_baseline": entry["harli_vs_best_baseline"] is not None
                and entry["harli_vs_best_baseline"] >= TARGETS["vs_best_baseline_min"],
                "harvest_of_slack": (h["harvest_of_slack"] or 0) >= TARGETS["harvest_of_slack_min"],
                "mape": (pred.get("mape") or math.inf) <= TARGETS["mape_max"],
                "under_prediction": (pred.get("under_prediction_rate") if pred.get("windows") else math.inf)
                <= TARGETS["under_prediction_max"],
                "overhead": (h["overhead"] or 0) <= TARGETS["overhead_max"]}
        summary[f"{m}x"] = entry

    # The table.
    say("\n" + "=" * 132)
    for key, entry in summary.items():
        say(f"SLO {key} = {entry['slo_ms']:.1f} ms (solo decode step {base * 1e3:.1f} ms at peak batch "
            f"{base_info['peak_decode_batch']}); slack share {entry['slack_share']:.2f}; static sweep "
            f"{ {k: round(v, 3) for k, v in entry['static_sweep_attainment'].items()} } -> {entry['static_choice_layers']}")
        say(f"{'policy':<18} {'run':<23} {'attain':>7} {'tok-att':>7} {'TBTp99':>8} {'TTFTp50':>8} {'TTFTp99':>8} "
            f"{'dec t/s':>8} {'ft t/s':>7} {'co t/s':>7} {'harvest':>7} {'h/slack':>7} {'recl':>5} {'aband':>5} "
            f"{'ovhd%':>6} {'trained':>7} {'MAPE':>6} {'under':>6} {'other%':>6}")
        for name, t in entry["table"].items():
            def f(x, fmt):
                return format(x, fmt) if x is not None else "-"
            say(f"{name:<18} {t['run']:<23} {t['attainment']:7.3f} {t['token_attainment']:7.3f} "
                f"{t['tbt_p99_ms']:8.1f} {t['ttft_p50_ms']:8.1f} {t['ttft_p99_ms']:8.1f} "
                f"{t['decode_tokens_per_s']:8.1f} {t['finetune_tokens_per_s']:7.1f} {t['colocated_tokens_per_s']:7.1f} "
                f"{t['harvest_ratio']:7.3f} {f(t['harvest_of_slack'], '7.3f')} {t['reclaims']:5d} {t['abandoned']:5d} "
                f"{f(t['overhead'] and 100 * t['overhead'], '6.2f')} {t['windows_trained']:7d} "
                f"{f(t['mape'], '6.3f')} {f(t['under_prediction_rate'], '6.3f')} "
                f"{f(t['other_cpu_share'] and 100 * t['other_cpu_share'], '6.1f')}")
        if "harli" in entry["table"]:
            ratio = entry["harli_vs_best_baseline"]
            say(f"harli / best baseline meeting 99% ({entry['best_baseline']}): "
                f"{'-' if ratio is None else f'{ratio:.2f}x'}; targets {entry['targets']}")
            r = entry["relaxed"]
            say(f"relaxed (baselines within 1 point of decode-only's attainment, >= {r['attainment_floor']:.3f}): "
                f"best {r['best_baseline']}, harli {r['harli_vs_best_baseline']:.2f}x"
                f"{'' if r['harli_meets_floor'] else ' (harli itself is below that floor)'}")
        say("")
    say(f"standalone finetune {standalone_tps:.1f} tokens/s; load at start {load_start}, "
        f"at end {[round(x, 2) for x in os.getloadavg()]}")

    payload = {
        "config": {"model": str(Path(args.model).relative_to(REPO)) if Path(args.model).is_relative_to(REPO)
                   else str(args.model),
                   "engine": {k: v for k, v in dataclasses.asdict(engine_config(args, "harli", None, "<temp>")).items()
                              if k not in ("policy", "tpot_slo_ms")},
                   "finetune_job": {k: str(v) if isinstance(v, Path) else v
                                    for k, v in dataclasses.asdict(finetune_job(args)).items()},
                   "slo_multiples": args.slo_multiples, "static_sweep": static_sweep,
                   "temporal_k": args.temporal_k, "seed": args.seed, "quick": args.quick,
                   "command": " ".join(["colocation.py", *sys.argv[1:]])},
        "model": {"name": cfg.name, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "dtype": cfg.dtype,
                  "params": int(sum(x.size for x in jax.tree.leaves(model.params)))},
        "trace": {**trace_source, **stats},
        "cpu_count": os.cpu_count(),
        "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "standalone_finetune": {"runs": standalone, "tokens_per_s": standalone_tps,
                                "path": "single program per micro-batch (engine idle)"},
        "slo": {"solo_decode_step_ms": ms(base), **base_info,
                "repeat_at_end": {"solo_decode_step_ms": ms(solo_decode_step(runs["decode-only-repeat"]["records"],
                                                                             base_info["peak_decode_batch"])[0]),
                                  "peak_decode_batch": max(r.decode_seqs for r in runs["decode-only-repeat"]["records"]),
                                  "attainment": {k: v["attainment"] for k, v in
                                                 results["decode-only-repeat"]["per_slo"].items()}},
                "definition": "median latency of decode-only steps (no prefill tokens) at the peak concurrent decode "
                              "batch of the decode-only run (widened to lower batches until >= 5 steps)",
                "slo_ms": {f"{m}x": ms(s) for m, s in slos.items()}},
        "targets": TARGETS,
        "analysis": {
            "dispatch_sync_probe": dispatch,
            "standalone_microbatch_s_median": standalone_microbatch_s,
            "micro_path_vs_single_program": {label: micro_path(r, cfg.num_layers, standalone_microbatch_s)
                                             for label, r in runs.items() if r["policy"] == "harli"},
        },
        "summary": summary,
        "runs": results,
    }
    if args.quick and not args.write:
        say("--quick: no result file written")
        return
    path = write_result("colocation", payload)
    say(f"wrote {path}")


if __name__ == "__main__":
    main()
