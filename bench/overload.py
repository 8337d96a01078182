"""Overload: admission control against letting every request in, at 3x the sustainable arrival rate, at one TPOT
SLO, on the same requests, in one invocation, with a finetune job training in the slack on both sides.

First the sustainable rate is measured: `--sustain-requests` requests all arriving at once (the batch kept full),
requests finished per second, on the admission-off engine. The SLO is `--slo-x` times the solo decode step of the
full batch (measured once). Then a Poisson trace of `--requests` at `--rate-x` times that rate (prompts of 8 to 32
tokens, 16 to 40 output tokens, EOS ignored) is served in real time by two engines of the same weights and sizes,
admission on and off (`SchedulerConfig.admission`), both with a queue timeout of `--queue-timeout` seconds, in
interleaved rounds (bench/common.py). Per side: requests finished, refused (the queue timeout) and any other
outcome (lost: must be 0), TPOT attainment of the admitted (share with TPOT <= SLO), TTFT P50/P99 of the
admitted, finetune tokens trained during the trace, and the KV pages owned once it is served (must be 0).

Writes bench/results/overload-<device>.json (or into --out; a --quick run writes only with --out).

    python bench/overload.py                       # small.yaml, 60 requests at 3x, SLO = 3x the solo step
    python bench/overload.py --rate-x 1 --out bench/results/overload-1x  # the same SLO at the sustainable rate
    python bench/overload.py --quick --out /tmp/b  # smoke run: tiny.yaml, 12 requests, one round
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import numpy as np

from harli_jax.model import load_model
from harli_jax.replay.report import percentile
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.job import FinetuneJob
from harli_jax.runtime.request import FinishedEvent, FinishReason, Request, SamplingParams

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default configs/models/small.yaml (--quick: tiny.yaml)")
    p.add_argument("--requests", type=int, default=None, help="requests of the overload trace (default 60; "
                                                              "--quick 12)")
    p.add_argument("--sustain-requests", type=int, default=None, help="requests of the sustainable-rate run "
                                                                      "(default 16; --quick 4)")
    p.add_argument("--rate-x", type=float, default=3.0, help="arrival rate, times the sustainable one (default 3)")
    p.add_argument("--slo-x", type=float, default=3.0, help="TPOT SLO, times the solo decode step of the full "
                                                            "batch (default 3: one the sustainable rate keeps)")
    p.add_argument("--queue-timeout", type=float, default=3.0, help="seconds a request may wait (default 3)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; --quick 1)")
    p.add_argument("--no-finetune", action="store_true", help="serve without a finetune job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    common.add_arguments(p)
    args = p.parse_args(argv)
    args.model = args.model or str(REPO / "configs" / "models" / ("tiny.yaml" if args.quick else "small.yaml"))
    args.requests = args.requests or (12 if args.quick else 60)
    args.sustain_requests = args.sustain_requests or (4 if args.quick else 16)
    args.rounds = args.rounds or (1 if args.quick else 2)
    for name in ("requests", "sustain_requests", "max_batch", "rounds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.rate_x <= 0 or args.slo_x <= 0 or args.queue_timeout <= 0:
        p.error("--rate-x, --slo-x and --queue-timeout must be positive")
    return args


def trace(n: int, rate: float, seed: int) -> list[Request]:
    """`n` requests arriving as a Poisson process of `rate` per second (all at once for rate 0)."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate else np.zeros(n)
    return [Request(rng.integers(3, 500, rng.integers(8, 32)).tolist(),
                    SamplingParams(max_tokens=int(rng.integers(16, 40)), ignore_eos=True), arrival=float(a))
            for a in arrivals]


def serve(engine: Engine, requests: list[Request], slo: float, realtime: bool = True) -> dict:
    """Serves `requests`; their outcomes, the admitted ones' attainment and TTFT, and what the job trained."""
    trained = engine.colocation.job.tokens if engine.colocation.job is not None else 0
    started = time.perf_counter()
    outputs = [e.output for e in engine.serve(requests, realtime=realtime) if isinstance(e, FinishedEvent)]
    wall = time.perf_counter() - started
    admitted = [o for o in outputs if o.finish_reason is FinishReason.LENGTH]
    refused = [o for o in outputs if o.finish_reason is FinishReason.REFUSED]
    tpots = [o.tpot for o in admitted if o.tpot is not None]
    ttfts = [o.ttft for o in admitted]
    job = engine.colocation.job
    return {"requests": len(requests), "finished": len(admitted), "refused": len(refused),
            "lost": len(requests) - len(admitted) - len(refused), "wall_s": round(wall, 3),
            "attainment": float(np.mean([t <= slo for t in tpots])) if tpots else None,
            "tpot_p50_ms": percentile(tpots, 50) * 1e3 if tpots else None,
            "tpot_max_ms": max(tpots) * 1e3 if tpots else None,
            "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
            "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
            "finetune_tokens": (job.tokens if job is not None else 0) - trained,
            "kv_pages_after": engine.arena.table.usage()["kv"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    model = load_model(args.model)
    settings = common.comparison_settings(args)
    engines = {}
    for side, admission in (("admission", True), ("all-admitted", False)):
        config = EngineConfig(max_batch=args.max_batch, prefill_chunk=32, max_seq_len=128, policy="harli",
                              admission=admission, queue_timeout_s=args.queue_timeout)
        engines[side] = Engine(model, config)
    solo = engines["all-admitted"].time_decode_step(args.max_batch)
    slo = args.slo_x * solo
    for engine in engines.values():
        engine.set_tpot_slo(slo * 1e3)
        if not args.no_finetune:
            engine.finetune(FinetuneJob(total_steps=1_000_000, eval_interval=0, micro_batch_rows=2, seq_len=64))
    common.say(f"SLO {slo * 1e3:.1f} ms ({args.slo_x}x the solo decode step of {args.max_batch}); measuring the "
               f"sustainable rate with {args.sustain_requests} requests at once...")
    sustained = serve(engines["all-admitted"], trace(args.sustain_requests, 0, args.seed), slo, realtime=False)
    rate = args.sustain_requests / sustained["wall_s"]
    requests = trace(args.requests, args.rate_x * rate, args.seed + 1)
    common.say(f"sustainable {rate:.2f} requests/s; serving {args.requests} at {args.rate_x}x ({args.rate_x * rate:.2f}"
               f"/s) with admission on and off")
    comparison = common.interleave(
        {side: (lambda engine=engine: serve(engine, requests, slo)) for side, engine in engines.items()},
        args.rounds, seed=args.seed, **settings,
        describe=lambda r: (f"finished {r['finished']}, refused {r['refused']}, lost {r['lost']}, attainment "
                            f"{r['attainment'] if r['attainment'] is None else round(r['attainment'], 3)}, "
                            f"finetune tokens {r['finetune_tokens']}"))
    summary = {side: {key: common.figure(comparison, side, key) for key in
                      ("attainment", "finished", "refused", "lost", "ttft_p99_s", "finetune_tokens")}
               for side in engines}
    payload = {"model": args.model, "max_batch": args.max_batch, "solo_decode_step_s": solo, "tpot_slo_s": slo,
               "slo_x": args.slo_x, "sustainable_rate": rate, "sustained_run": sustained, "rate_x": args.rate_x,
               "queue_timeout_s": args.queue_timeout, "finetune": not args.no_finetune, "comparison": comparison,
               "summary": summary}
    out = common.output_dir(args)
    if out is not None or not args.quick:
        common.say(f"wrote {common.write_result('overload', payload, out)}")
    for side, figures in summary.items():
        common.say(f"{side:<14} " + ", ".join(f"{k} {v['median']}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
