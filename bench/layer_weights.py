"""How the paged decode step reads its layer weights: the measurement behind storing them per layer (issue 12).

Three variants of the decode step (`harli_jax.model.paged.paged_layer` per layer) on the same weights, arena and
batch (a decode token per sequence at a context of `--context` tokens):
- `stacked-scan`: `[num_layers, ...]` stacks (made here, outside the program), one scanned layer: each layer's
  weights are dynamic slices of the stacks (the engine's layout before issue 12);
- `stacked-static-slices`: the same stacks, the layers unrolled with static slices taken inside the program;
- `per-layer-arrays`: one array per layer and weight, unrolled (`paged_step`, what the engine runs).

Every variant must give the same tokens (checked). Each timed attempt runs `--steps` steps back to back and keeps
the median; attempts are interleaved through `common.interleave` (`--repeats` rounds, a random order per round,
the load of each attempt; over `--max-other-share` repeated, then marked invalid). A variant's figure is the
median over its valid attempts; ratios are against `stacked-scan`. The memory floor is the weight bytes over
the copy bandwidth (a NumPy copy of `--copy-mib` MiB into a preallocated buffer, best of 5).

Writes bench/results/layer_weights-<device>.json (or into --out).

    python bench/layer_weights.py                       # small.yaml, batches 1 8 32, context 256, 3 rounds
    python bench/layer_weights.py --quick --out /tmp/b  # smoke run: tiny.yaml, batches 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.model import ModelConfig, init_params
from harli_jax.model.paged import ArenaLayout, TokenBatch, paged_layer, paged_step
from harli_jax.model.params import Params
from harli_jax.model.sampling import SamplingRows, sample
from harli_jax.model.transformer import embed, lm_logits

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("stacked-scan", "stacked-static-slices", "per-layer-arrays")
PAGE_TOKENS = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model YAML (default configs/models/small.yaml)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="sequences per step (default 1 8 32)")
    parser.add_argument("--context", type=int, default=None, help="tokens of context per sequence (default 256)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed attempt (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth probe size (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="weights, tokens and the order of the sides per round")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    common.add_arguments(parser)
    args = parser.parse_args()
    quick = dict(model=str(REPO / "configs/models/tiny.yaml"), batches=[1, 2], context=40, steps=3, repeats=2,
                 copy_mib=16)
    full = dict(model=str(REPO / "configs/models/small.yaml"), batches=[1, 8, 32], context=256, steps=20, repeats=3,
                copy_mib=512)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.batches) < 1 or args.context < 2 or args.steps < 1 or args.repeats < 1:
        parser.error("--batches, --steps and --repeats must be >= 1, --context >= 2")
    return args


def decode_batch(batch: int, context: int, vocab: int, seed: int) -> tuple[TokenBatch, int]:
    """One decode token per sequence at position `context - 1`, each sequence on its own pages; (batch, pages)."""
    rng = np.random.default_rng(seed)
    per_seq = -(-context // PAGE_TOKENS)
    tables = np.arange(1, batch * per_seq + 1, dtype=np.int32).reshape(batch, per_seq)
    positions = np.full(batch, context - 1, np.int32)
    rows = SamplingRows(temperature=np.zeros(batch, np.float32), top_k=np.zeros(batch, np.int32),
                        top_p=np.ones(batch, np.float32), seed=np.zeros(batch, np.uint32),
                        counter=np.zeros(batch, np.int32))
    index = np.arange(batch, dtype=np.int32)
    return TokenBatch(tokens=rng.integers(3, vocab, batch).astype(np.int32), positions=positions,
                      page_ids=tables[index, positions // PAGE_TOKENS], offsets=positions % PAGE_TOKENS,
                      block_tables=tables, query_start=np.arange(batch + 1, dtype=np.int32),
                      context_lens=positions + 1, sample_index=index, sampling=rows), batch * per_seq + 1


def stack_layers(params: Params) -> Params:
    """The layers as one `LayerParams` of `[num_layers, ...]` stacks (a second copy of the weights)."""
    return Params(embed=params.embed, layers=jax.tree.map(lambda *a: jnp.stack(a), *params.layers),
                  final_norm=params.final_norm, lm_head=params.lm_head)


def scanned_step(stacked: Params, cfg, arena, batch):
    """The decode step over stacked layers: one scanned `paged_layer`."""
    def body(carry, xs):
        lp, index = xs
        return paged_layer(lp, cfg, *carry, index, batch), None

    x = embed(stacked, batch.tokens)
    (x, arena), _ = jax.lax.scan(body, (x, arena), (stacked.layers, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
    return arena, sample(lm_logits(stacked, cfg, x[batch.sample_index]), batch.sampling)


def static_slices_step(stacked: Params, cfg, arena, batch):
    """The decode step unrolled over static slices of the stacks, taken inside the program."""
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked.layers) for i in range(cfg.num_layers))
    return paged_step(dataclasses.replace(stacked, layers=layers), cfg, arena, batch)


def make_programs(params, cfg, layout: ArenaLayout, num_pages: int, batch: TokenBatch) -> dict:
    """Per variant: (compiled step, its weights)."""
    arena = jax.ShapeDtypeStruct(layout.shape(num_pages), np.dtype(cfg.dtype))
    stacked = jax.block_until_ready(stack_layers(params))

    def compiled(fn, weights):
        return jax.jit(fn, static_argnames="cfg", donate_argnames="arena").lower(weights, cfg, arena, batch).compile()

    return {"stacked-scan": (compiled(scanned_step, stacked), stacked),
            "stacked-static-slices": (compiled(static_slices_step, stacked), stacked),
            "per-layer-arrays": (compiled(paged_step, params), params)}


def timed_steps(program, weights, layout: ArenaLayout, num_pages: int, batch: TokenBatch, steps: int) -> dict:
    """`steps` steps back to back, each read back: median and min seconds, and the last tokens."""
    arena = layout.zeros(num_pages)
    seconds, tokens = [], None
    for _ in range(steps):
        started = time.perf_counter()
        arena, tokens = program(weights, arena, batch)
        tokens = np.asarray(tokens)
        seconds.append(time.perf_counter() - started)
    return {"step_s_median": statistics.median(seconds), "step_s_min": min(seconds), "tokens": tokens.tolist()}


def main() -> None:
    args = parse_args()
    settings = common.comparison_settings(args)
    cfg = ModelConfig.from_yaml(args.model)
    params = init_params(cfg, seed=args.seed)
    layout = ArenaLayout(cfg, PAGE_TOKENS)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    common.say(f"{cfg.name}: {params.num_parameters() / 1e6:.1f}M parameters ({weight_bytes / 2**20:.0f} MiB), "
               f"{cfg.num_layers} layers; batches {args.batches}, context {args.context}")
    sides, checks, tokens = {}, {}, {}
    for b in args.batches:
        batch, num_pages = decode_batch(b, args.context, cfg.vocab_size, args.seed)
        programs = make_programs(params, cfg, layout, num_pages, batch)
        for name, (program, weights) in programs.items():
            def run(program=program, weights=weights, batch=batch, num_pages=num_pages):
                return timed_steps(program, weights, layout, num_pages, batch, args.steps)
            tokens[name, b] = run()["tokens"]  # warm-up, and the tokens every variant must agree on
            sides[f"{name}@{b}"] = run
        checks[b] = all(tokens[name, b] == tokens[VARIANTS[0], b] for name in VARIANTS)
        if not checks[b]:
            raise SystemExit(f"batch {b}: the variants gave different tokens: "
                             f"{ {name: tokens[name, b] for name in VARIANTS} }")
    sides["copy"] = lambda: common.host_copy_bandwidth(args.copy_mib, 5)
    quiet = common.wait_for_quiet(args.max_other_share, settings["quiet_timeout"], settings["quiet_sample"])
    comparison = common.interleave(
        sides, args.repeats, seed=args.seed, max_share=settings["max_share"], max_retries=settings["max_retries"],
        quiet_timeout=settings["quiet_timeout"], quiet_sample=settings["quiet_sample"],
        describe=lambda r: f"{r['bytes_per_s'] / 1e9:6.1f} GB/s" if "bytes_per_s" in r
        else f"step {r['step_s_median'] * 1e3:8.2f} ms")
    bandwidth = common.figure(comparison, "copy", "bytes_per_s")
    floor = weight_bytes / bandwidth["median"] if bandwidth["median"] else None
    results = []
    for b in args.batches:
        row = {"batch": b}
        for name in VARIANTS:
            row[name] = common.figure(comparison, f"{name}@{b}", "step_s_median")
        base = row["stacked-scan"]["median"]
        row["vs_stacked_scan"] = {name: common.ratio(row[name]["median"], base) for name in VARIANTS[1:]}
        row["vs_memory_floor"] = {name: common.ratio(row[name]["median"], floor) for name in VARIANTS}
        results.append(row)
        common.say(f"batch {b:3d}: " + ", ".join(
            f"{name} {row[name]['median'] * 1e3:.2f} ms" if row[name]["median"] is not None else f"{name} invalid"
            for name in VARIANTS) + (f" (memory floor {floor * 1e3:.2f} ms)" if floor else ""))
    payload = {"config": {"model": cfg.name, "batches": args.batches, "context": args.context, "steps": args.steps,
                          "page_tokens": PAGE_TOKENS, "dtype": cfg.dtype, "weight_bytes": weight_bytes},
               "quiet_wait": quiet, "same_tokens": checks, "copy_bandwidth": bandwidth,
               "memory_floor_s": floor, "comparison": comparison, "results": results,
               "definitions": {"step_s_median": "median seconds of one step (dispatch to tokens read back) over an "
                                                "attempt's back-to-back steps",
                               "memory_floor_s": "weight bytes / copy bandwidth (read + write bytes of a NumPy copy)"}}
    out = common.output_dir(args)
    if out is not None:
        common.say(f"wrote {common.write_result('layer_weights', payload, out)}")


if __name__ == "__main__":
    main()
