"""Start-up cost of the step programs: the engine's warm-up compile with a cold and a warm persistent
compilation cache, and the compile of Llama-3-8B-shaped steps lowered abstractly (no weights materialized).

- `engine`: for `--model` (default configs/models/small.yaml) and the default `EngineConfig` bucket set (or
  `--max-batch` / `--max-seq-len`), two fresh processes build an `Engine` over the same new cache directory:
  the first compiles every step program (cold cache), the second loads them (warm cache). Each reports its
  program count and the seconds of its warm-up compile.
- `abstract`: `--abstract-model` (default configs/models/llama3-8b.yaml) in bfloat16, `paged_step` lowered from
  `jax.ShapeDtypeStruct`s of the weights and the arena (nothing allocated) for a decode bucket and a mixed
  (decode + prefill chunk) bucket, and compiled for this backend; lowering and compile seconds, and the
  compiled program's memory analysis.

Writes bench/results/compile_time-<device>.json (or into --out).

    python bench/compile_time.py
    python bench/compile_time.py --quick --out /tmp/ct   # tiny.yaml for both parts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.model import ModelConfig
from harli_jax.model.paged import ArenaLayout, TokenBatch, paged_step
from harli_jax.model.params import param_shapes
from harli_jax.model.sampling import SamplingRows

REPO = Path(__file__).resolve().parent.parent

# Run in a fresh process: builds the engine, prints its warm-up compile as JSON.
ENGINE_START = """
import json, sys, time
from harli_jax import Engine, EngineConfig
from harli_jax.model import load_model
model = load_model(sys.argv[1])
config = EngineConfig(max_batch=int(sys.argv[2]), max_seq_len=int(sys.argv[3]), compile_cache_dir=sys.argv[4],
                      calibration_dir=sys.argv[4])
started = time.perf_counter()
engine = Engine(model, config)
print(json.dumps({"programs": len(engine.runner.buckets), "engine_init_s": time.perf_counter() - started,
                  "batch_buckets": list(engine.runner.batch_buckets),
                  "page_buckets": list(engine.runner.page_buckets)}))
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="engine model YAML (default configs/models/small.yaml)")
    parser.add_argument("--max-batch", type=int, default=None, help="engine max_batch (default: EngineConfig's)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="engine max_seq_len (default 512)")
    parser.add_argument("--abstract-model", default=None, help="model YAML lowered abstractly "
                        "(default configs/models/llama3-8b.yaml)")
    parser.add_argument("--abstract-batch", type=int, default=8, help="sequences of the abstract steps")
    parser.add_argument("--abstract-context", type=int, default=None, help="context of the abstract steps "
                        "(default 2048)")
    parser.add_argument("--quick", action="store_true", help="tiny.yaml for both parts, small shapes")
    common.add_arguments(parser)
    args = parser.parse_args()
    tiny = str(REPO / "configs/models/tiny.yaml")
    defaults = dict(model=tiny if args.quick else str(REPO / "configs/models/small.yaml"),
                    max_batch=2 if args.quick else 32, max_seq_len=32 if args.quick else 512,
                    abstract_model=tiny if args.quick else str(REPO / "configs/models/llama3-8b.yaml"),
                    abstract_context=64 if args.quick else 2048)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if min(args.max_batch, args.max_seq_len, args.abstract_batch, args.abstract_context) < 1:
        parser.error("sizes must be >= 1")
    return args


def engine_start(args, cache_dir: str) -> dict:
    """One fresh process building the engine over `cache_dir`; its report and wall seconds."""
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "true"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", ENGINE_START, args.model, str(args.max_batch), str(args.max_seq_len),
                          cache_dir], env=env, capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_wall_s": time.perf_counter() - started}


def abstract_batch(batch: int, tokens: int, pages: int, max_query: int, long_rows: int) -> TokenBatch:
    def i32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    rows = SamplingRows(temperature=jax.ShapeDtypeStruct((batch,), jnp.float32), top_k=i32(batch),
                        top_p=jax.ShapeDtypeStruct((batch,), jnp.float32),
                        seed=jax.ShapeDtypeStruct((batch,), jnp.uint32), counter=i32(batch))
    return TokenBatch(tokens=i32(tokens), positions=i32(tokens), page_ids=i32(tokens), offsets=i32(tokens),
                      block_tables=i32(batch, pages), query_start=i32(batch + 1), context_lens=i32(batch),
                      sample_index=i32(batch), sampling=rows, max_query=max_query, long_rows=long_rows)


def abstract_compiles(args) -> dict:
    """`paged_step` of the abstract model lowered from shapes only, for a decode and a mixed bucket."""
    cfg = ModelConfig.from_yaml(args.abstract_model).replace(dtype="bfloat16")
    page_tokens = 16
    layout = ArenaLayout(cfg, page_tokens)
    pages = -(-args.abstract_context // page_tokens)
    b = args.abstract_batch
    arena = jax.ShapeDtypeStruct(layout.shape(b * pages + 1), jnp.bfloat16)
    step = jax.jit(paged_step, static_argnames="cfg", donate_argnames="arena")
    weights = param_shapes(cfg)
    chunk = 64
    results = {"model": cfg.name, "dtype": cfg.dtype, "layers": cfg.num_layers, "batch": b,
               "context": args.abstract_context, "page_tokens": page_tokens,
               "weight_bytes": sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(weights))}
    for name, tokens, max_query, long_rows in (("decode", b, 1, 0), ("mixed", b + chunk, chunk, min(4, b))):
        started = time.perf_counter()
        lowered = step.lower(weights, cfg, arena, abstract_batch(b, tokens, pages, max_query, long_rows))
        lowered_s = time.perf_counter() - started
        started = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - started
        memory = compiled.memory_analysis()
        results[name] = {"tokens": tokens, "lower_s": lowered_s, "compile_s": compile_s,
                         "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
        common.say(f"{cfg.name} {name} step (batch {b}, {tokens} tokens): lowered in {lowered_s:.1f} s, compiled in "
                   f"{compile_s:.1f} s")
    return results


def main() -> None:
    args = parse_args()
    common.say(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    with tempfile.TemporaryDirectory() as cache:
        cold = engine_start(args, cache)
        warm = engine_start(args, cache)
    common.say(f"{Path(args.model).name}: {cold['programs']} step programs; engine start {cold['engine_init_s']:.1f} s "
               f"with a cold compilation cache, {warm['engine_init_s']:.1f} s with a warm one")
    payload = {"config": {"model": os.path.relpath(args.model, REPO), "max_batch": args.max_batch,
                          "max_seq_len": args.max_seq_len},
               "engine": {"cold_cache": cold, "warm_cache": warm,
                          "warm_over_cold": warm["engine_init_s"] / cold["engine_init_s"]},
               "abstract": abstract_compiles(args),
               "definitions": {"engine_init_s": "Engine(...) construction: arena, warm-up compile of every step "
                                                "program, calibration (none without a finetune job)",
                               "compile_s": "lowered.compile() for this backend (XLA:CPU here)"}}
    out = common.output_dir(args)
    if out is not None:
        common.say(f"wrote {common.write_result('compile_time', payload, out)}")


if __name__ == "__main__":
    main()
