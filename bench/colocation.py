"""Co-location: `harli replay`'s comparison (harli_jax.replay.run) over several traces, in both roles, at several
SLOs, every timed part with the machine's load (bench/common.py).

Per trace and role, once: `replay.run.prepare` on a first engine, after `common.wait_for_quiet` and with its load
(the solo decode step at the trace's peak batch: wall time between decode-only steps, host work included; the
decode role's prefill pass; the finetune job's standalone throughput). If other processes took more than
`--max-other-share` of the CPUs meanwhile, that SLO base is marked invalid, and so is every ratio built on it.
Then per SLO (`--slo`, multiples of that step or times), every policy of `--policy` (default: all of
harli_jax.runtime.colocation.POLICIES: harli, harli-temporal, cobatch, decode-only, temporal-K, static) runs on a
fresh engine held to that same SLO (`replay.run.run_policy`; a policy with an offline knob, static's layers and
cobatch's per-step token budget, first gets it from `replay.run.sweep` at that SLO, over the first
--sweep-requests), in a seeded
random order per round (`--rounds`) through `common.interleave`: an attempt under load is repeated, then marked
invalid. A run's figures are `replay.report.summarize`'s; a policy's row holds the medians over its valid
attempts; harli's finetune tokens/s is divided by the best baseline's that keeps >= 99% of the requests within
the TPOT SLO (harli-temporal, harli with nothing fused, is no baseline: harli over it is what fusing adds).
Every engine has the program shapes of --batch-buckets, --fused-tokens and --fused-layers (harli's
and cobatch's fused step programs: one per decode bucket per fused shape, compiled when each run's finetune job
starts; on a CPU keep them few for small.yaml). A row also counts the steps that carried fused work and holds the
predictor's errors per stage (inference steps, fused steps, windows).

The bundled trace (`configs/traces/colocation-small.csv`; `--write-trace` regenerates it with the package's
seeded generator, `synthesize("gamma")`): Gamma-renewal arrivals with a coefficient of variation > 1 (bursts and
lulls) and chat-like lengths. Writes bench/results/colocation-<device>.json (or into --out; a --quick run writes
only with --out).

    python bench/colocation.py                                    # small.yaml, the bundled trace, 1.5x and 3x
    python bench/colocation.py --quick --out /tmp/bench           # smoke run: tiny.yaml, a short generated trace
    python bench/colocation.py --write-trace                      # regenerate configs/traces/colocation-small.csv
    python bench/colocation.py --policy harli,decode-only --slo 3x --role decode --trace a.csv,b.csv
    python bench/colocation.py --fused-tokens 8 --fused-layers 1 --batch-buckets 4,8   # fewer fused programs
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import tempfile
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import numpy as np
from common import say

from harli_jax.errors import HarliError
from harli_jax.model.loader import load_model
from harli_jax.replay import run as replay
from harli_jax.replay.options import ROLES, check_options, defaults, parse_slo, policies_of
from harli_jax.replay.report import STAGE_KEYS, STAGES, percentile, summarize
from harli_jax.replay.trace import Trace, synthesize, write_trace
from harli_jax.runtime.colocation import POLICIES
from harli_jax.runtime.config import CacheConfig

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO / "configs/traces/colocation-small.csv"
TARGETS = {"attainment_min": 0.99, "vs_best_baseline_min": 1.6, "mape_max": 0.05, "under_prediction_max": 0.01,
           "overhead_max": 0.02}
# The figures of a policy's row: the median of each over the run's valid attempts.
ROW_KEYS = ("slo_attainment", "tbt_attainment", "tpot_p99_ms", "tbt_p99_ms", "ttft_p50_ms", "ttft_p99_ms",
            "decode_tokens_per_s", "finetune_tokens_per_s", "harvest_ratio", "reclaims", "abandoned_microbatches",
            "predictor_mape", "predictor_under_prediction", "scheduler_overhead", "windows_with_training",
            "fused_steps", "wall_s")
TEMPORAL = "harli-temporal"  # the ablation side: harli with nothing fused, not a baseline
# Each preset: what the flags left unset take.
QUICK = dict(model=REPO / "configs/models/tiny.yaml", slo="3x", role="decode,colocated", max_batch=4,
             max_seq_len=128, micro_batch_rows=2, seq_len=32, sweep_requests=4, requests=10, rate=6.0,
             prompt_mean=40.0, output_mean=16.0, fused_tokens="8", fused_layers="1")
FULL = dict(model=REPO / "configs/models/small.yaml", slo="1.5x,3x", role="decode,colocated", max_batch=16,
            max_seq_len=256, micro_batch_rows=1, seq_len=64, sweep_requests=40, requests=135, rate=1.5,
            prompt_mean=100.0, output_mean=45.0)


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model YAML or HF checkpoint (default configs/models/small.yaml)")
    parser.add_argument("--trace", default=None, help="trace files, comma-separated (default "
                        f"{DEFAULT_TRACE.relative_to(REPO)}; with --quick a short generated trace)")
    parser.add_argument("--policy", default=",".join(POLICIES), help="policies, comma-separated (default all: "
                        f"{','.join(POLICIES)})")
    parser.add_argument("--slo", default=None, help="TPOT SLOs, comma-separated: multiples of the solo decode step "
                        "('3x') or times ('50ms') (default 1.5x,3x; 3x quick)")
    parser.add_argument("--tbt-slo", default=None, help="the TBT cap ('100ms' or 'Nx'); unset: twice each TPOT SLO")
    parser.add_argument("--role", default=None, help=f"roles, comma-separated, of {','.join(ROLES)} (default both)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds: attempts per run (default 1)")
    parser.add_argument("--max-batch", type=int, default=None, help="engine batch (default 16; 4 quick)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="engine context (default 256; 128 quick)")
    parser.add_argument("--micro-batch-rows", type=int, default=None, help="finetune rows (default 1; 2 quick)")
    parser.add_argument("--seq-len", type=int, default=None, help="finetune tokens per row (default 64; 32 quick)")
    parser.add_argument("--sweep-requests", type=int, default=None, help="requests of each knob sweep's prefix "
                        "(default 40; 4 quick; 0: no sweep)")
    parser.add_argument("--max-requests", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--fused-tokens", default=None, help="positions per row of a token chunk fused into a decode "
                        "step, comma-separated, each seq-len halved 0 to 3 times (default: an eighth "
                        "of --seq-len; 8 quick)")
    parser.add_argument("--fused-layers", default=None, help="layers of a backward slice fused into a decode step, "
                        "comma-separated (default 1)")
    parser.add_argument("--batch-buckets", default=None, help="decode batch sizes compiled, comma-separated (max "
                        "batch always; default powers of two)")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts, the generated trace, the run order")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny.yaml, a short generated trace")
    common.add_arguments(parser)
    parser.add_argument("--write-trace", action="store_true", help="write the generated trace (to --trace) and exit")
    parser.add_argument("--requests", type=int, default=None, help="generated trace: requests (default 135)")
    parser.add_argument("--rate", type=float, default=None, help="generated trace: mean arrivals/s (default 1.5)")
    parser.add_argument("--cv", type=float, default=2.0, help="generated trace: coefficient of variation of the "
                        "inter-arrival times (Gamma renewal; > 1 is bursty)")
    parser.add_argument("--prompt-mean", type=float, default=None, help="generated trace: mean prompt tokens")
    parser.add_argument("--output-mean", type=float, default=None, help="generated trace: mean output tokens")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.policies = policies_of(args.policy)
        args.slos = [parse_slo(text, "slo") for text in names(args.slo)]
        args.roles = names(args.role)
        if not args.slos or set(args.roles) - set(ROLES) or not args.roles:
            raise HarliError(f"--slo needs at least one SLO and --role names of {', '.join(ROLES)}")
        parse_slo(args.tbt_slo, "tbt-slo")
        # Every replay option, and every trace given (unless it is the one --write-trace writes), checked before
        # anything loads.
        traces = names(args.trace) if args.trace and not args.write_trace else [DEFAULT_TRACE]
        for trace in traces:
            replay_options(args, Path(trace), args.roles[0])
    except HarliError as e:
        parser.error(str(e))
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


# The traces --------------------------------------------------------------------------------------------------------


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
    bins = np.bincount((arrivals // 5).astype(int))  # arrivals per 5 s window: the burstiness a reader can see
    return {"requests": len(trace), "duration_s": trace.duration, "shrunk_to_fit": trace.shrunk,
            "mean_rate_per_s": len(trace) / trace.duration if trace.duration else None,
            "interarrival_cv": float(np.std(gaps) / np.mean(gaps)) if len(gaps) > 1 else None,
            "arrivals_per_5s_max": int(bins.max()), "arrivals_per_5s_empty_windows": int(np.sum(bins == 0)),
            "prompt_tokens": {"mean": float(prompts.mean()), "p50": float(np.median(prompts)),
                              "p90": percentile(prompts, 90), "max": int(prompts.max())},
            "output_tokens": {"mean": float(outputs.mean()), "p50": float(np.median(outputs)),
                              "p90": percentile(outputs, 90), "max": int(outputs.max())}}


def trace_paths(args, scratch: Path) -> list[Path]:
    """The traces to replay: --trace, else the bundled one, else (--quick) a generated one written to `scratch`."""
    if args.trace:
        return [Path(p) for p in names(args.trace)]
    if not args.quick:
        return [DEFAULT_TRACE]
    trace = generated_trace(args)
    return [write_trace(trace, scratch / "generated.csv", generated_comment(trace, args))]


def replay_options(args, trace: Path, role: str) -> dict:
    """harli replay's options for one trace and role (checked as the command checks them)."""
    options = defaults()
    options.update(model=str(args.model), trace=str(trace), role=role, policy=",".join(args.policies),
                   tpot_slo=str(args.slos[0]), tbt_slo=args.tbt_slo, max_batch=args.max_batch,
                   max_seq_len=args.max_seq_len, micro_batch_rows=args.micro_batch_rows, seq_len=args.seq_len,
                   sweep_requests=args.sweep_requests, max_requests=args.max_requests, seed=args.seed,
                   fused_tokens=args.fused_tokens, fused_layers=args.fused_layers, batch_buckets=args.batch_buckets)
    return check_options(options)


# One trace in one role ---------------------------------------------------------------------------------------------


def policy_row(comparison: dict, policy: str) -> dict:
    """A policy's row: each figure's median over its valid attempts (None without one)."""
    valid = common.valid_results(comparison, policy)
    row = {"valid_attempts": len(valid), "attempts": sum(a["side"] == policy for a in comparison["attempts"])}
    def median(values) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    for key in ROW_KEYS:
        row[key] = median(v.get(key) for v in valid)
    row["predictor_stages"] = {stage: {key: median((v.get("predictor_stages") or {}).get(stage, {}).get(key)
                                                   for v in valid) for key in STAGE_KEYS} for stage in STAGES}
    return row


def score(table: dict, slo_valid: bool) -> dict:
    """The best baseline that keeps >= 99% of the requests within the TPOT SLO, and harli's ratio to it."""
    ok = {p: r for p, r in table.items() if p not in ("harli", TEMPORAL) and r["valid_attempts"]
          and (r["slo_attainment"] or 0) >= TARGETS["attainment_min"]}
    best = max(ok, key=lambda p: ok[p]["finetune_tokens_per_s"] or 0) if ok else None
    out: dict = {"best_baseline": best}
    if "harli" not in table:
        return out
    harli = table["harli"]
    ratio = common.ratio(harli["finetune_tokens_per_s"], ok[best]["finetune_tokens_per_s"] if best else None)
    if not slo_valid:
        ratio = {"value": None, "valid": False, "why": "the SLO base was measured under load"}
    out["harli_vs_best_baseline"] = ratio
    if TEMPORAL in table:  # what fused steps add: harli over harli with micro-steps between steps only
        fused = common.ratio(harli["finetune_tokens_per_s"], table[TEMPORAL]["finetune_tokens_per_s"])
        out["fused_vs_temporal"] = fused if slo_valid else {"value": None, "valid": False,
                                                            "why": "the SLO base was measured under load"}
    if harli["valid_attempts"]:
        out["targets"] = {
            "attainment": (harli["slo_attainment"] or 0) >= TARGETS["attainment_min"],
            "vs_best_baseline": bool(ratio["valid"] and ratio["value"] >= TARGETS["vs_best_baseline_min"]),
            "mape": (harli["predictor_mape"] if harli["predictor_mape"] is not None else 1.0) <= TARGETS["mape_max"],
            "under_prediction": (harli["predictor_under_prediction"] or 0) <= TARGETS["under_prediction_max"],
            "overhead": (harli["scheduler_overhead"] or 0) <= TARGETS["overhead_max"]}
    return out


def at_slo(setup, spec, args, work: Path, settings: dict, slo_valid: bool) -> dict:
    """Every policy at one SLO: the knobs swept at it, then the interleaved runs; the table and the scoring."""
    slo = replay.slo_of({"tpot_slo": spec, "tbt_slo": parse_slo(args.tbt_slo, "tbt-slo"), "ttft_slo": None},
                        setup.solo, setup.mixed)
    paced = "" if slo.mixed is None else f", a prefill chunk every {slo.prefill_interval} steps while others decode"
    say(f"  SLO {spec}: TPOT {slo.tpot_s * 1e3:.2f} ms, TBT cap {slo.tbt_s * 1e3:.2f} ms{paced}")
    tuned, sweeps = {}, []
    with common.LoadMeter() as sweep_load:
        for policy in args.policies:
            tuned[policy], swept = replay.tuned_settings(setup, policy, slo, work)
            sweeps += [swept.as_dict()] if swept else []

    def attempt(policy: str) -> dict:
        result = replay.run_policy(setup, policy, slo, work, settings=tuned[policy], checkpoint=False)
        gc.collect()
        return summarize(result)

    def describe(s: dict) -> str:
        return (f"{s['slo_attainment'] or 0:.1%} within the TPOT SLO, {s['finetune_tokens_per_s']:.0f} finetune "
                f"tokens/s, harvest {s['harvest_ratio'] or 0:.2f}")

    sides = {policy: functools.partial(attempt, policy) for policy in args.policies}
    comparison = common.interleave(sides, args.rounds, seed=args.seed, log=say, describe=describe,
                                   quiet_before_each=True, **settings)
    table = {policy: policy_row(comparison, policy) for policy in args.policies}
    return {"slo": slo.as_dict(), "finetune_total_steps": replay.finetune_steps(setup, slo), "settings": tuned,
            "sweeps": sweeps, "sweep_load": sweep_load.record, "table": table, **score(table, slo_valid),
            "comparison": comparison}


def one_trace_role(model, path: Path, role: str, args, settings: dict) -> dict:
    """One trace in one role: the SLO base and setup once (with its load), then every SLO."""
    options = replay_options(args, path, role)
    trace = replay.replay_trace(options, model.cfg)
    if role == "decode":
        replay.check_prefill_memory(trace, model.cfg, CacheConfig().page_tokens)
    say(f"{path.name}, {role} role: {len(trace)} requests over {trace.duration:.0f}s")
    work = Path(tempfile.mkdtemp(prefix="harli-colocation-"))  # calibration caches of this trace and role
    quiet = common.wait_for_quiet(args.max_other_share, settings["quiet_timeout"], settings["quiet_sample"], say)
    with common.LoadMeter() as load:
        setup = replay.prepare(model, trace, options, work)
    share = load.record["other_processes_cpu_share"]
    valid = share is not None and share <= args.max_other_share
    say(f"  solo decode step {setup.solo.seconds * 1e3:.2f} ms at batch {setup.solo.batch} (other processes "
        f"{share}: {'valid' if valid else 'INVALID'}); standalone {setup.standalone.tokens_per_s:.0f} tokens/s")
    slos = {str(spec): at_slo(setup, spec, args, work, settings, valid) for spec in args.slos}
    return {"trace": path.name, "role": role, "trace_stats": trace_stats(trace),
            "slo_base": {"valid": valid, "load": load.record, "quiet_wait": quiet,
                         "solo_decode_step_ms": setup.solo.seconds * 1e3, "solo_batch": setup.solo.batch,
                         "solo_gaps": setup.solo.gaps,
                         "mixed_step_ms": None if setup.mixed is None else setup.mixed.seconds * 1e3},
            "setup": {"prefill_s": setup.prefill_s, "prefilled": len(setup.prefilled),
                      "standalone_tokens_per_s": setup.standalone.tokens_per_s,
                      "standalone_steps_per_s": setup.standalone.steps_per_s},
            "slos": slos}


def print_summary(results: list[dict]) -> None:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in results:
        for key, entry in r["slos"].items():
            say(f"\n{r['trace']} ({r['role']} role), SLO {key} = {entry['slo']['tpot_slo_ms']:.2f} ms "
                f"(solo step {r['slo_base']['solo_decode_step_ms']:.2f} ms at batch {r['slo_base']['solo_batch']}"
                f"{'' if r['slo_base']['valid'] else ', INVALID: measured under load'}), settings {entry['settings']}")
            say(f"{'policy':<14} {'valid':>5} {'TPOT ok':>8} {'TBT ok':>7} {'TBTp99 ms':>10} {'ft tok/s':>9} "
                f"{'harvest':>8} {'fused':>6} {'MAPE':>6} {'step':>6} {'fusedM':>6}")
            for policy, t in entry["table"].items():
                stages = t["predictor_stages"]
                say(f"{policy:<14} {t['valid_attempts']:>2}/{t['attempts']:<2} {f(t['slo_attainment'], '8.1%')} "
                    f"{f(t['tbt_attainment'], '7.1%')} {f(t['tbt_p99_ms'], '10.2f')} "
                    f"{f(t['finetune_tokens_per_s'], '9.0f')} {f(t['harvest_ratio'], '8.2f')} "
                    f"{f(t['fused_steps'], '6.0f')} {f(t['predictor_mape'], '6.3f')} "
                    f"{f(stages['step']['mape'], '6.3f')} {f(stages['fused']['mape'], '6.3f')}")
            say("fused: steps that carried fused finetune work; MAPE of the predictor's windows, its inference "
                "steps (step) and its fused steps (fusedM)")
            ratio = entry.get("harli_vs_best_baseline")
            if ratio is not None:
                say(f"harli / best baseline meeting 99% ({entry['best_baseline']}): "
                    + (f"{ratio['value']:.2f}x" if ratio["valid"] else f"invalid ({ratio.get('why', 'no baseline')})"))
            fused = entry.get("fused_vs_temporal")
            if fused is not None:
                say(f"harli / {TEMPORAL} (what fused steps add): "
                    + (f"{fused['value']:.2f}x" if fused["valid"] else f"invalid ({fused.get('why')})"))


def main() -> None:
    args = parse_args()
    if args.write_trace:
        trace = generated_trace(args)
        path = Path(args.trace) if args.trace else DEFAULT_TRACE
        write_trace(trace, path, generated_comment(trace, args))
        say(f"wrote {path}: {trace_stats(trace)}")
        return
    settings = common.comparison_settings(args)
    paths = trace_paths(args, Path(tempfile.mkdtemp(prefix="harli-colocation-trace-")))
    say(f"colocation: {args.model}, traces {[p.name for p in paths]}, roles {args.roles}, SLOs "
        f"{[str(s) for s in args.slos]}, policies {args.policies}")
    model = load_model(args.model, seed=args.seed)
    results = [one_trace_role(model, path, role, args, settings) for path in paths for role in args.roles]
    print_summary(results)
    payload = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                          if k not in ("slos",)} | {"slos": [str(s) for s in args.slos]},
               "model": {"name": model.cfg.name, "layers": model.cfg.num_layers, "dtype": model.cfg.dtype},
               "targets": TARGETS, "results": results}
    common.save("colocation", payload, args)


if __name__ == "__main__":
    main()
