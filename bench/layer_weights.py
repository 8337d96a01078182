"""How the paged decode step reads its layer weights: the measurement behind storing them per layer (issue 12).

Three variants of the decode step (`harli_jax.model.paged.paged_layer` per layer) on the same weights, arena and
batch (a decode token per sequence at a context of `--context` tokens); `--variants` picks some of them:
- `stacked-scan`: `[num_layers, ...]` stacks (made here, outside the program), one scanned layer: each layer's
  weights are dynamic slices of the stacks (the engine's layout before issue 12);
- `stacked-static-slices`: the same stacks, the layers unrolled with static slices taken inside the program;
- `per-layer-arrays`: one array per layer and weight, unrolled (`paged_step`, what the engine runs).

The weights are random (normal(0, 0.02) matrices, unit norms), made on the default device one array at a time
(`--dtype` overrides the config's); the stacked copy is made only when a stacked variant runs, and the per-layer
copy is dropped when none of the selected variants needs it. Every variant's program is lowered and compiled
ahead of time (`--compile-threads` compiles several at once), and the lowering and compile seconds and a few
counts from the optimized HLO (weight-shaped dynamic slices, copies and fusion outputs: the per-step copies of
a layer's weights; dynamic-slice fusions) are recorded per program.

Every variant must give the same tokens (checked: fatal for float32 weights; recorded for lower precisions, where
different fusions may round differently). Each timed attempt runs `--steps` steps back to back and keeps the
median; attempts are interleaved through `common.interleave` (`--repeats` rounds, a random order per round, the
load of each attempt; over `--max-other-share` repeated, then marked invalid). A variant's figure is the median
over its valid attempts; ratios are against `stacked-scan` (when it runs). The memory floor is the weight bytes
over the copy bandwidth (`common.device_copy_bandwidth`: a NumPy copy of `--copy-mib` MiB on a CPU, an on-device
copy elsewhere, read + write bytes, best of 5); a second floor adds the K/V the step reads and counts only the
embedding rows it gathers.

XLA_FLAGS must be set before JAX starts, so a variant under other XLA flags (e.g.
`--xla_gpu_enable_dynamic_slice_fusion=true`) is a second run of this script with XLA_FLAGS set and
`--xla-flags-label dsf`: its result goes to layer_weights-<label>-<device>.json beside the unlabelled one.

Writes bench/results/layer_weights[-<label>]-<device>.json (or into --out); a run stopped by SIGTERM (`timeout`)
writes what it has, marked "incomplete".

    python bench/layer_weights.py                       # small.yaml, batches 1 8 32, context 256, 3 rounds
    python bench/layer_weights.py --quick --out /tmp/b  # smoke run: tiny.yaml, batches 1 2
    python bench/layer_weights.py --model configs/models/llama3-8b.yaml --batches 1 8 32 128 --context 512 \\
        --variants per-layer-arrays stacked-scan --copy-mib 2048          # the GPU check (bench/gpu_check.sh)
    XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true python bench/layer_weights.py ... \\
        --variants stacked-scan --xla-flags-label dsf
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.model import ModelConfig
from harli_jax.model.layers import rope_tables
from harli_jax.model.paged import ArenaLayout, TokenBatch, paged_layer, paged_step
from harli_jax.model.params import Params, init_params, layer_shapes
from harli_jax.model.sampling import SamplingRows, sample
from harli_jax.model.transformer import embed, lm_logits

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("stacked-scan", "stacked-static-slices", "per-layer-arrays")
STACKED = ("stacked-scan", "stacked-static-slices")
PAGE_TOKENS = 16
HLO_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model YAML (default configs/models/small.yaml)")
    parser.add_argument("--dtype", default=None, choices=sorted(HLO_TYPES), help="weight and arena dtype "
                        "(default: the config's)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="sequences per step (default 1 8 32)")
    parser.add_argument("--context", type=int, default=None, help="tokens of context per sequence (default 256)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help=f"the variants to run (default all: {' '.join(VARIANTS)})")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed attempt (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth probe size (default 512)")
    parser.add_argument("--compile-threads", type=int, default=1,
                        help="programs compiled at once (default 1; XLA compiles release the GIL)")
    parser.add_argument("--xla-flags-label", default="",
                        help="names the XLA_FLAGS this run was started with; the result file becomes "
                             "layer_weights-<label>-<device>.json")
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
    args.variants = [v for v in VARIANTS if v in (args.variants or VARIANTS)]  # the canonical order, no repeats
    if min(args.batches) < 1 or args.context < 2 or args.steps < 1 or args.repeats < 1 or args.compile_threads < 1:
        parser.error("--batches, --steps, --repeats and --compile-threads must be >= 1, --context >= 2")
    if args.xla_flags_label and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.xla_flags_label):
        parser.error("--xla-flags-label must be lower-case letters, digits and dashes")
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
        return paged_layer(lp, cfg, *carry, index, batch, rope), None

    x, rope = embed(stacked, batch.tokens), rope_tables(cfg, batch.positions)
    (x, arena), _ = jax.lax.scan(body, (x, arena), (stacked.layers, jnp.arange(cfg.num_layers, dtype=jnp.int32)))
    return arena, sample(lm_logits(stacked, cfg, x[batch.sample_index]), batch.sampling)


def static_slices_step(stacked: Params, cfg, arena, batch):
    """The decode step unrolled over static slices of the stacks, taken inside the program."""
    layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked.layers) for i in range(cfg.num_layers))
    return paged_step(dataclasses.replace(stacked, layers=layers), cfg, arena, batch)


STEP_FNS = {"stacked-scan": scanned_step, "stacked-static-slices": static_slices_step, "per-layer-arrays": paged_step}


def hlo_counts(text: str, cfg: ModelConfig) -> dict:
    """Counts in an optimized HLO text: instructions whose result has the shape of a layer's weight matrix and that
    are a dynamic slice, a copy or a fusion (each a per-step copy of the weights, or a slice fused into its
    consumer, which the count of fusion outputs tells apart), and mentions of dynamic-slice fusions (XLA:GPU's
    `dynamic_address_computation` custom fusion / `dynamic_slice_fusion`, which feed the slice to the GEMM)."""
    short = HLO_TYPES[cfg.dtype]
    shapes = {f"{short}[{','.join(map(str, s))}]" for s in layer_shapes(cfg).values() if len(s) == 2}
    counts = {"weight_shaped_dynamic_slice": 0, "weight_shaped_copy": 0, "weight_shaped_fusion_output": 0}
    for line in text.splitlines():
        _, eq, rhs = line.partition(" = ")
        if not eq:
            continue
        result_type = rhs.split(" ", 1)[0].split("{", 1)[0]
        if result_type not in shapes:
            continue
        counts["weight_shaped_dynamic_slice"] += " dynamic-slice(" in rhs
        counts["weight_shaped_copy"] += " copy(" in rhs
        counts["weight_shaped_fusion_output"] += " fusion(" in rhs
    spelled = text.replace("-", "_")  # XLA writes these names with either
    counts["address_computation_mentions"] = spelled.count("address_computation")
    counts["dynamic_slice_fusion_mentions"] = spelled.count("dynamic_slice_fusion")
    counts["hlo_chars"] = len(text)
    return counts


def lower(name: str, weights, cfg, layout: ArenaLayout, num_pages: int, batch: TokenBatch):
    arena = jax.ShapeDtypeStruct(layout.shape(num_pages), np.dtype(cfg.dtype))
    step = jax.jit(STEP_FNS[name], static_argnames="cfg", donate_argnames="arena")
    return step.lower(weights, cfg, arena, batch)


def compile_programs(lowered: dict, cfg, threads: int, log=common.say) -> dict:
    """{key: (compiled or None, record)} for {key: lowered}; a failed compile is recorded, not raised."""
    def one(item):
        key, low = item
        start = time.perf_counter()
        try:
            compiled = low.compile()
        except Exception as error:  # noqa: BLE001 - an OOM or a compiler failure is a result too
            return key, None, {"compile_s": time.perf_counter() - start,
                               "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        seconds = time.perf_counter() - start
        record = {"compile_s": seconds}
        try:
            record["hlo"] = hlo_counts(compiled.as_text(), cfg)
        except Exception as error:  # noqa: BLE001 - the counts are a diagnostic
            record["hlo"] = {"error": f"{type(error).__name__}: {error}"}
        log(f"  compiled {key} in {seconds:.1f} s")
        return key, compiled, record

    items = list(lowered.items())
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            done = list(pool.map(one, items))
    else:
        done = [one(item) for item in items]
    return {key: (compiled, record) for key, compiled, record in done}


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
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    name = "layer_weights" + (f"-{args.xla_flags_label}" if args.xla_flags_label else "")
    out = common.output_dir(args)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    state: dict = {"config": {"model": cfg.name, "batches": args.batches, "context": args.context,
                              "steps": args.steps, "page_tokens": PAGE_TOKENS, "dtype": cfg.dtype,
                              "variants": args.variants, "compile_threads": args.compile_threads,
                              "xla_flags": os.environ.get("XLA_FLAGS", ""), "xla_flags_label": args.xla_flags_label,
                              "backend": jax.default_backend()},
                   "programs": {}}
    if out is not None:
        common.write_result_on_sigterm(name, lambda: state, out)
    common.say(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
               f"XLA_FLAGS={state['config']['xla_flags']!r}")
    if args.xla_flags_label and not state["config"]["xla_flags"]:
        common.say(f"warning: --xla-flags-label {args.xla_flags_label} without XLA_FLAGS in the environment")

    started = time.perf_counter()
    params = jax.block_until_ready(init_params(cfg, args.seed))
    state["init_s"] = time.perf_counter() - started
    layout = ArenaLayout(cfg, PAGE_TOKENS)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    embed_bytes = params.embed.nbytes
    state["config"]["weight_bytes"] = weight_bytes
    common.say(f"{cfg.name}: {params.num_parameters() / 1e6:.1f}M parameters ({weight_bytes / 2**20:.0f} MiB, "
               f"{cfg.dtype}), {cfg.num_layers} layers, made in {state['init_s']:.1f} s; batches {args.batches}, "
               f"context {args.context}; variants {args.variants}")
    weights = {}
    if any(v in STACKED for v in args.variants):
        started = time.perf_counter()
        stacked = jax.block_until_ready(stack_layers(params))
        state["stack_s"] = time.perf_counter() - started
        weights.update({v: stacked for v in STACKED})
        del stacked
    if "per-layer-arrays" in args.variants:
        weights["per-layer-arrays"] = params
    del params  # without per-layer-arrays, the per-layer copy goes (the stacks share only the small arrays)

    batches = {b: decode_batch(b, args.context, cfg.vocab_size, args.seed) for b in args.batches}
    started = time.perf_counter()
    lowered = {}
    for b, (batch, num_pages) in batches.items():
        for v in args.variants:
            t0 = time.perf_counter()
            lowered[f"{v}@{b}"] = lower(v, weights[v], cfg, layout, num_pages, batch)
            state["programs"][f"{v}@{b}"] = {"lower_s": time.perf_counter() - t0}
    state["lower_s_total"] = time.perf_counter() - started
    started = time.perf_counter()
    compiled = compile_programs(lowered, cfg, args.compile_threads)
    del lowered
    state["compile_wall_s"] = time.perf_counter() - started
    for key, (_, record) in compiled.items():
        state["programs"][key].update(record)
    common.say(f"lowered in {state['lower_s_total']:.1f} s, compiled in {state['compile_wall_s']:.1f} s "
               f"({args.compile_threads} at a time)")

    sides, tokens, checks, agreement = {}, {}, {}, {}
    for b, (batch, num_pages) in batches.items():
        ran = []
        for v in args.variants:
            program = compiled[f"{v}@{b}"][0]
            if program is None:
                continue

            def run(program=program, w=weights[v], batch=batch, num_pages=num_pages):
                return timed_steps(program, w, layout, num_pages, batch, args.steps)

            t0 = time.perf_counter()
            tokens[v, b] = run()["tokens"]  # warm-up, and the tokens every variant must agree on
            state["programs"][f"{v}@{b}"]["first_attempt_s"] = time.perf_counter() - t0
            sides[f"{v}@{b}"] = run
            ran.append(v)
        if not ran:
            continue
        first = np.asarray(tokens[ran[0], b])
        checks[b] = all(tokens[v, b] == tokens[ran[0], b] for v in ran)
        agreement[b] = min(float(np.mean(np.asarray(tokens[v, b]) == first)) for v in ran)
        state["same_tokens"], state["token_agreement"] = checks, agreement
        if not checks[b]:
            message = f"batch {b}: the variants gave different tokens: { {v: tokens[v, b] for v in ran} }"
            if cfg.dtype == "float32":
                raise SystemExit(message)
            common.say(f"warning ({cfg.dtype} weights: fusions may round differently): {message}")
    sides["copy"] = lambda: common.device_copy_bandwidth(args.copy_mib, 5)
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
        kv_bytes = b * args.context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
        read_bytes = weight_bytes - embed_bytes + b * cfg.hidden_size * itemsize + kv_bytes
        floor_kv = read_bytes / bandwidth["median"] if bandwidth["median"] else None
        row = {"batch": b, "kv_read_bytes": kv_bytes, "step_read_bytes": read_bytes, "memory_floor_with_kv_s": floor_kv}
        for v in args.variants:
            row[v] = common.figure(comparison, f"{v}@{b}", "step_s_median")
        if "stacked-scan" in args.variants:
            base = row["stacked-scan"]["median"]
            row["vs_stacked_scan"] = {v: common.ratio(row[v]["median"], base) for v in args.variants
                                      if v != "stacked-scan"}
        row["vs_memory_floor"] = {v: common.ratio(row[v]["median"], floor) for v in args.variants}
        row["vs_memory_floor_with_kv"] = {v: common.ratio(row[v]["median"], floor_kv) for v in args.variants}
        results.append(row)
        common.say(f"batch {b:3d}: " + ", ".join(
            f"{v} {row[v]['median'] * 1e3:.2f} ms" if row[v]["median"] is not None else f"{v} invalid"
            for v in args.variants) + (f" (memory floor {floor * 1e3:.2f} ms, with K/V {floor_kv * 1e3:.2f} ms)"
                                       if floor else ""))
    payload = {**state, "quiet_wait": quiet, "same_tokens": checks, "token_agreement": agreement,
               "copy_bandwidth": bandwidth, "memory_floor_s": floor, "comparison": comparison, "results": results,
               "definitions": {"step_s_median": "median seconds of one step (dispatch to tokens read back) over an "
                                                "attempt's back-to-back steps",
                               "memory_floor_s": "weight bytes / copy bandwidth (read + write bytes of a copy: NumPy "
                                                 "on a CPU, on the device elsewhere)",
                               "memory_floor_with_kv_s": "(weight bytes less the embedding table, plus the batch's "
                                                         "embedding rows and the K/V of every cached token of every "
                                                         "layer) / copy bandwidth",
                               "token_agreement": "per batch, the smallest share of the batch's tokens on which a "
                                                  "variant agrees with the first",
                               "programs": "per variant@batch: lower_s, compile_s (wall, with compile_threads at a "
                                           "time), first_attempt_s (the warm-up attempt) and hlo counts"}}
    if out is not None:
        common.say(f"wrote {common.write_result(name, payload, out)}")


if __name__ == "__main__":
    main()
