"""Fused finetune work against the same work run apart: what a row costs in a pass over the weights, and what a
token-layer of training costs in each shape the engine can run it in.

On one engine (the model of --model, --dtype; the policy `cobatch`, whose job runs its forwards in token chunks, so
the fused step programs of every decode batch in --batches compile when the job registers; the registration's wall
time is reported), in interleaved rounds (`common.interleave`, the machine's load recorded per attempt):

- the row-cost curve: one pass of `rows` rows through every layer's seven projections (norms and SwiGLU, no
  attention), for rows in --rows; `t(rows)` per layer, and the line F + c * rows fitted past the ridge
  (F: the pass's fixed cost, the weight read; the ridge ~ F / c rows, where a row's compute equals it);
- per decode batch B: the decode step alone (a synthetic batch at the one page bucket, every K/V write into a
  scratch page), the step with a token chunk of C positions of every micro-batch row through every layer fused
  in (C in the job's fused sizes; cobatch's shape), with a forward window of the whole micro-batch through k
  layers fused in (harli's), and with a backward slice of k layers fused in (k in the job's fused layer sizes);
- the micro-steps alone: layer micro-steps (forward of n layers of the whole micro-batch; backward of n layers),
  token micro-steps (a token chunk of C positions through every layer).

Per token-layer (one token through one layer, forward or backward): a fused shape costs what it adds to the decode
step divided by its token-layers; a micro-step its time divided by its token-layers. Each fused forward's
`vs_layer_micro_forward` is its cost over the forward micro-step's of as many layers (one layer for a token chunk),
each backward slice's `vs_layer_micro_backward` the same for the backward. Writes bench/results/fused-<device>.json
(or into --out; a --quick run only with --out).

    python bench/fused.py                               # small.yaml, fp32, batches 1 4 8 16 32
    python bench/fused.py --dtype bfloat16              # (bench/gpu_check.sh on a GPU: its ridge)
    python bench/fused.py --quick --out /tmp/bench      # smoke run: tiny.yaml
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from common import say

from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.layers import linear, mlp_block, rms_norm
from harli_jax.model.loader import load_model
from harli_jax.runtime import Engine, EngineConfig
from harli_jax.runtime.arena import Owner
from harli_jax.runtime.finetune import FinetuneJob

REPO = Path(__file__).resolve().parent.parent
QUICK = dict(model=REPO / "configs/models/tiny.yaml", batches="1,2", rows="1,8,32", rounds=2, repeats=2,
             micro_batch_rows=1, seq_len=32, max_seq_len=64, fused_tokens="8", fused_layers="1")
FULL = dict(model=REPO / "configs/models/small.yaml", batches="1,4,8,16,32", rows="1,2,4,8,16,32,64,128,256",
            rounds=3, repeats=5, micro_batch_rows=1, seq_len=64, max_seq_len=256, fused_tokens="8,16",
            fused_layers="1,2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model YAML or HF checkpoint (default configs/models/small.yaml)")
    p.add_argument("--dtype", default=None, help="weights and arena dtype (default the model's)")
    p.add_argument("--batches", default=None, help="decode batches, comma-separated (default 1,4,8,16,32)")
    p.add_argument("--rows", default=None, help="rows of the row-cost curve, comma-separated")
    p.add_argument("--micro-batch-rows", type=int, default=None, help="rows of the job's micro-batch (default 1)")
    p.add_argument("--seq-len", type=int, default=None, help="positions per micro-batch row (default 64)")
    p.add_argument("--max-seq-len", type=int, default=None, help="engine context (default 256)")
    p.add_argument("--fused-tokens", default=None, help="positions of a fused token chunk, comma-separated (default "
                   "the engine's: an eighth of --seq-len; default 8,16)")
    p.add_argument("--fused-layers", default=None, help="layers of a fused backward slice (default 1,2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per attempt, the median kept (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny.yaml, two batches, two rounds")
    common.add_arguments(p)
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.batch_list = [int(x) for x in str(args.batches).split(",") if x]
        args.row_list = [int(x) for x in str(args.rows).split(",") if x]
        args.token_sizes = tuple(int(x) for x in args.fused_tokens.split(",") if x)
        args.layer_sizes = tuple(int(x) for x in args.fused_layers.split(",") if x)
    except ValueError as e:
        p.error(f"a size list must be comma-separated integers: {e}")
    if not args.batch_list or min(args.batch_list) < 1 or not args.row_list or min(args.row_list) < 1:
        p.error("--batches and --rows need positive integers")
    return args


def projection_pass(layers, cfg, x):
    """`x [rows, D]` through every layer's norms and seven projections (the weight reads of a step, no attention)."""
    for lp in layers:
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        q, k, v = linear(h, lp.q_proj), linear(h, lp.k_proj), linear(h, lp.v_proj)
        x = mlp_block(lp, cfg, x + linear(q + jnp.tile(k + v, cfg.num_heads // cfg.num_kv_heads), lp.o_proj))
    return x


def median_seconds(fn, repeats: int) -> float:
    """The median of `repeats` timed calls of `fn` (which blocks until its work is done)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def row_cost_fit(rows: list[int], seconds: list[float]) -> dict:
    """F + c * rows fitted over the points past the ridge (those at least 1.5x the one-row pass), and the ridge
    F / c; with fewer than two such points, the slope of the last two."""
    rows_a, t = np.array(rows, float), np.array(seconds, float)
    past = t >= 1.5 * t[0]
    if past.sum() < 2:
        past = np.zeros_like(past)
        past[-2:] = True
    c, f = np.polyfit(rows_a[past], t[past], 1)
    return {"fixed_s": float(f), "per_row_s": float(c), "ridge_rows": float(f / c) if c > 0 else None,
            "fitted_rows": [int(r) for r in rows_a[past]]}


def main() -> None:
    args = parse_args()
    settings = common.comparison_settings(args)
    model = load_model(args.model, seed=args.seed, dtype=args.dtype)
    pages = -(-args.max_seq_len // 16)
    config = EngineConfig(max_batch=max(args.batch_list), batch_buckets=tuple(args.batch_list),
                          max_seq_len=args.max_seq_len, page_buckets=(pages,), policy="cobatch",
                          fused_tokens=args.token_sizes, fused_layers=args.layer_sizes, dtype=args.dtype)
    engine = Engine(model, config)
    cfg = engine.cfg
    job = FinetuneJob(total_steps=10_000, eval_interval=0, micro_batch_rows=args.micro_batch_rows,
                      seq_len=args.seq_len, lora=LoRAConfig(rank=8, alpha=16), seed=args.seed)
    started = time.perf_counter()
    engine.finetune(job)
    registration_s = time.perf_counter() - started
    colocation = engine.colocation
    runner, micro, sizes = engine.runner, colocation.job.micro, colocation.sizes
    layers, tokens = cfg.num_layers, args.micro_batch_rows * args.seq_len
    scratch = engine.arena.table.allocate(Owner("calibration", "bench"), 1)[0]
    windows = tuple(k for k in sizes.fused_layers if k < layers)  # harli's forward windows, compiled here
    started = time.perf_counter()
    runner.prepare_fused({("forward", k): micro.fused_examples("forward", k) for k in windows})
    windows_s = time.perf_counter() - started
    say(f"fused: {cfg.name} ({cfg.dtype}), micro-batch {args.micro_batch_rows} x {args.seq_len}, fused token chunks "
        f"{sizes.fused_tokens}, forward windows {windows}, backward slices {sizes.fused_layers}; the job registered "
        f"in {registration_s:.1f} s, the windows compiled in {windows_s:.1f} s")

    pass_jit = jax.jit(projection_pass, static_argnums=1)
    x_of = {n: jnp.ones((n, cfg.hidden_size), cfg.dtype) for n in args.row_list}

    def projections(n: int) -> float:
        return median_seconds(lambda: pass_jit(runner.params.layers, cfg, x_of[n]).block_until_ready(), args.repeats)

    def bucket(b: int):
        return runner.bucket_for(b, b, pages)

    def decode(b: int) -> float:
        return statistics.median(runner.time_synthetic(bucket(b), seed=i, scratch_page=scratch)[1]
                                 for i in range(args.repeats))

    def fused(b: int, phase: str, size: int) -> float:
        """The step of batch `b` with (phase, size) fused in: a timing micro-batch brought to that phase first."""
        micro.start(calibration=True, token_mode=phase != "forward")
        while micro.status()[0] != phase:
            micro.run(max(sizes.of("tokens")))
        times = []
        for i in range(args.repeats):
            call = micro.fused_call(size)
            _, seconds, out = runner.time_fused(bucket(b), call, seed=i, scratch_page=scratch)
            micro.fused_trial(call, out)
            times.append(seconds)
        micro.abandon()
        return statistics.median(times)

    def micro_step(phase: str, size: int) -> float:
        """A micro-step alone: a layer chunk of the forward or backward, or a token chunk, each on a fresh timing
        micro-batch brought to that phase (the tokens phase is the token-chunked forward)."""
        times = []
        for _ in range(args.repeats):
            micro.start(calibration=True, token_mode=phase == "tokens")
            if phase == "backward":
                while micro.status()[0] != "backward":
                    micro.run(layers)
            times.append(micro.run(size).seconds)
            micro.abandon()
        return statistics.median(times)

    sides = {f"rows:{n}": (projections, n) for n in args.row_list}
    for b in args.batch_list:
        sides[f"decode:{b}"] = (decode, b)
        sides.update({f"fused:{b}:tokens:{c}": (fused, b, "tokens", c) for c in sizes.fused_tokens})
        sides.update({f"fused:{b}:forward:{k}": (fused, b, "forward", k) for k in windows})
        sides.update({f"fused:{b}:backward:{k}": (fused, b, "backward", k) for k in sizes.fused_layers})
    sides.update({f"micro:forward:{n}": (micro_step, "forward", n) for n in sizes.layers})
    sides.update({f"micro:backward:{n}": (micro_step, "backward", n) for n in sizes.layers})
    sides.update({f"micro:tokens:{c}": (micro_step, "tokens", c) for c in sizes.fused_tokens})
    for name, (fn, *fn_args) in sides.items():  # every program once, untimed: its first run is slow
        fn(*fn_args)
        say(f"  warmed {name}")
    comparison = common.interleave({name: (lambda fn=fn, a=fn_args: fn(*a)) for name, (fn, *fn_args) in sides.items()},
                                   args.rounds, seed=args.seed, log=say,
                                   describe=lambda s: f"{s * 1e3:8.3f} ms", **settings)

    def ms(name: str) -> float | None:
        value = common.figure(comparison, name, lambda r: r)["median"]
        return None if value is None else value * 1e3

    curve = {n: ms(f"rows:{n}") for n in args.row_list}
    measured = [n for n in args.row_list if curve[n] is not None]
    fit = row_cost_fit(measured, [curve[n] / 1e3 for n in measured]) if len(measured) >= 2 else None
    micro_costs = {}  # ms per token-layer
    for n in sizes.layers:
        micro_costs[f"forward:{n}"] = _per(ms(f"micro:forward:{n}"), tokens * n)
        micro_costs[f"backward:{n}"] = _per(ms(f"micro:backward:{n}"), tokens * n)
    for c in sizes.fused_tokens:
        micro_costs[f"tokens:{c}"] = _per(ms(f"micro:tokens:{c}"), args.micro_batch_rows * c * layers)
    per_batch = {}
    for b in args.batch_list:
        step = ms(f"decode:{b}")
        row = {"decode_step_ms": step, "fused": {}}
        for c in sizes.fused_tokens:
            total = ms(f"fused:{b}:tokens:{c}")
            cost = _per(None if None in (total, step) else total - step, args.micro_batch_rows * c * layers)
            row["fused"][f"tokens:{c}"] = {"step_ms": total, "per_token_layer_ms": cost,
                                           "vs_layer_micro_forward": _ratio(cost, micro_costs.get("forward:1"))}
        for k in windows:
            total = ms(f"fused:{b}:forward:{k}")
            cost = _per(None if None in (total, step) else total - step, tokens * k)
            row["fused"][f"forward:{k}"] = {"step_ms": total, "per_token_layer_ms": cost,
                                            "vs_layer_micro_forward": _ratio(cost, micro_costs.get(f"forward:{k}"))}
        for k in sizes.fused_layers:
            total = ms(f"fused:{b}:backward:{k}")
            cost = _per(None if None in (total, step) else total - step, tokens * k)
            row["fused"][f"backward:{k}"] = {"step_ms": total, "per_token_layer_ms": cost,
                                             "vs_layer_micro_backward": _ratio(cost, micro_costs.get(f"backward:{k}"))}
        per_batch[str(b)] = row
    summary = {"row_cost_ms": {str(n): curve[n] for n in args.row_list},
               "row_cost_per_layer_ms": {str(n): None if curve[n] is None else curve[n] / layers
                                         for n in args.row_list},
               "row_cost_fit": fit, "micro_step_per_token_layer_ms": micro_costs, "per_decode_batch": per_batch,
               "registration_s": registration_s, "windows_compile_s": windows_s}
    print_summary(summary, args)
    payload = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "model": {"name": cfg.name, "layers": layers, "hidden": cfg.hidden_size, "dtype": cfg.dtype},
               "sizes": {"fused_tokens": sizes.fused_tokens, "fused_windows": windows,
                         "fused_layers": sizes.fused_layers, "layers": sizes.layers},
               "summary": summary, "comparison": comparison}
    common.save("fused", payload, args)


def _per(ms_value: float | None, token_layers: int) -> float | None:
    return None if ms_value is None else ms_value / token_layers


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def print_summary(summary: dict, args) -> None:
    def f(x, fmt="8.4f"):
        return "-" if x is None else format(x, fmt)

    say("\nrow-cost curve: one pass through every layer's projections (ms), and per layer")
    for n, t in summary["row_cost_ms"].items():
        say(f"  {n:>5} rows  {f(t, '9.3f')}  {f(summary['row_cost_per_layer_ms'][n], '9.4f')}")
    fit = summary["row_cost_fit"]
    if fit:
        say(f"  fit past the ridge: {fit['fixed_s'] * 1e3:.2f} ms + {fit['per_row_s'] * 1e3:.4f} ms per row "
            f"(ridge ~{f(fit['ridge_rows'], '.1f')} rows)")
    say("micro-steps alone, ms per token-layer: " + ", ".join(
        f"{k} {f(v)}" for k, v in summary["micro_step_per_token_layer_ms"].items()))
    for b, row in summary["per_decode_batch"].items():
        parts = [f"{k}: +{f(v['per_token_layer_ms'])} ms/token-layer "
                 f"(x{f(v.get('vs_layer_micro_forward', v.get('vs_layer_micro_backward')), '.2f')} of the layer "
                 f"micro-step)" for k, v in row["fused"].items()]
        say(f"decode batch {b:>3}: step {f(row['decode_step_ms'], '.2f')} ms; " + "; ".join(parts))


if __name__ == "__main__":
    main()
