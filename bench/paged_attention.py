"""Paged-attention decode: achieved memory bandwidth of each implementation over batch and context.

On a GPU it times our Pallas kernel (`impl="pallas"`), JAX's Triton paged attention
(`jax.experimental.pallas.ops.gpu.paged_attention`, on the same K/V re-laid out as
`[kv_heads, pages, page_tokens, head_dim]`) and the pure-JAX reference; on a CPU only the reference
(`--impls reference pallas` adds the kernel in Pallas interpret mode: its error is meaningful, its time is not).
Bandwidth counts the bytes attention must move (the K/V of every cached token, q and the output) over
the time of one call, and is compared with the device's measured copy bandwidth (a large on-device
copy: read plus write).

Every implementation's output is checked against an independent oracle: softmax attention in float64 (NumPy)
over the K/V pages each sequence's block table names, on the same inputs (`max_abs_err_vs_dense_f64`, over the
first `--check-seqs` sequences; on the bfloat16 default its floor is the rounding of the output to bfloat16).
The kernels are also compared with the reference (`max_abs_err_vs_reference`).

Writes bench/results/paged_attention-<device>.json, or into `--out DIR`; `--quick` (tiny shapes, seconds on
a CPU) writes only with `--out`. The JSON's "command" (bench/common.py) is the command line that produced it.

    python bench/paged_attention.py                      # the default sweep for this backend
    python bench/paged_attention.py --batch 64 --context 2048 --impls pallas jax-triton
    python bench/paged_attention.py --quick --out /tmp/pa  # smoke run
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import time
import warnings
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.kernels import paged_attention, paged_attention_reference
from harli_jax.kernels.common import check_attention_args
from harli_jax.kernels.paged_attention_kernel import plan_kernel

REPO = Path(__file__).resolve().parents[1]
GPU_IMPLS = ("pallas", "jax-triton", "reference")
SHAPE = dict(q_heads=32, kv_heads=8, head_dim=128, page_tokens=16, layers=2)
DEFAULTS = {
    "gpu": dict(batch=[1, 8, 32, 64, 128], context=[512, 2048, 8192], copy_mib=2048, iters=20, repeats=5,
                check_seqs=8, **SHAPE),
    "cpu": dict(batch=[1, 4, 16], context=[512, 2048], copy_mib=256, iters=3, repeats=3, check_seqs=0, **SHAPE),
    # --quick: tiny shapes on any backend.
    "quick": dict(batch=[1, 3], context=[64, 200], copy_mib=8, iters=2, repeats=2, check_seqs=0,
                  q_heads=8, kv_heads=2, head_dim=64, page_tokens=16, layers=2),
}


def parse_args(backend: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes for a smoke run (writes only with --out)")
    parser.add_argument("--out", default=None, help="directory to write the JSON to (default bench/results)")
    parser.add_argument("--batch", type=int, nargs="+")
    parser.add_argument("--context", type=int, nargs="+", help="tokens per sequence")
    parser.add_argument("--impls", nargs="+", choices=GPU_IMPLS)
    parser.add_argument("--q-heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int)
    parser.add_argument("--page-tokens", type=int)
    parser.add_argument("--layers", type=int, help="layers in the arena (the last one is read)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--iters", type=int, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, help="timed repeats (median kept)")
    parser.add_argument("--copy-mib", type=int, help="size of the copy probe")
    parser.add_argument("--check-seqs", type=int,
                        help="sequences per case checked against the float64 oracle (0: all; default 8 on a GPU, "
                             "all on a CPU)")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS["quick" if args.quick else "gpu" if backend == "gpu" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.impls is None:
        # On a CPU, --quick also runs the kernel in interpret mode: a check of its output, not a timing.
        args.impls = list(GPU_IMPLS) if backend == "gpu" else ["reference", "pallas"] if args.quick else ["reference"]
    if args.out is not None and not hasattr(common, "RESULTS_DIR"):
        parser.error("bench/common.py has no RESULTS_DIR to redirect; --out cannot be honoured")
    return args


def time_call(fn, args, iters: int, repeats: int) -> dict:
    """Seconds per call: compile and warm up, then time `iters` back-to-back calls per repeat."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / iters)
    return {"seconds": float(np.median(per_call)), "seconds_min": float(min(per_call))}


def copy_bandwidth(mib: int, iters: int, repeats: int) -> dict:
    """Bytes per second of an on-device copy (read + write) of a `mib` MiB buffer."""
    x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
    timing = time_call(jax.jit(jnp.copy), (x,), iters, repeats)
    moved = 2 * x.nbytes
    return {"bytes": moved, **timing, "bytes_per_s": moved / timing["seconds"]}


def make_inputs(args, batch: int, context: int, key):
    """A random arena holding `batch` sequences of `context` tokens on randomly permuted pages."""
    dtype = jnp.dtype(args.dtype)
    max_pages = math.ceil(context / args.page_tokens)
    num_pages = 1 + batch * max_pages
    k_arena, k_q, k_perm = jax.random.split(key, 3)
    shape = (num_pages, args.layers, 2, args.kv_heads, args.page_tokens, args.head_dim)
    arena = jax.random.normal(k_arena, shape, dtype)
    q = jax.random.normal(k_q, (batch, args.q_heads, args.head_dim), dtype)
    pages = 1 + jax.random.permutation(k_perm, num_pages - 1).astype(jnp.int32)
    block_tables = pages.reshape(batch, max_pages)
    lengths = jnp.full((batch,), context, jnp.int32)
    return q, arena, jnp.int32(args.layers - 1), block_tables, lengths


def bytes_moved(q, arena, block_tables, lengths) -> int:
    """K/V of every cached token, q, the output, the block tables and the lengths."""
    kv_heads, _, head_dim = arena.shape[3:]
    kv = int(jnp.sum(lengths)) * 2 * kv_heads * head_dim * arena.dtype.itemsize
    return kv + 2 * q.nbytes + block_tables.nbytes + lengths.nbytes


def jax_triton_fn(q, arena, layer, block_tables, lengths):
    """JAX's Triton paged attention on this layer's K/V re-laid out as [kv_heads, pages, page_tokens, dim]."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    k_pages = jnp.swapaxes(arena[:, layer, 0], 0, 1)
    v_pages = jnp.swapaxes(arena[:, layer, 1], 0, 1)
    k_splits = math.gcd(16, block_tables.shape[1])  # it needs pages_per_sequence % k_splits == 0
    fn = jax.jit(functools.partial(jax_paged.paged_attention, k_splits=k_splits))
    return fn, (q, k_pages, v_pages, block_tables, lengths)


def dense_attention_f64(q, arena, layer, block_tables, lengths, sequences: int) -> np.ndarray:
    """Softmax attention in float64 (NumPy) for the first `sequences` sequences: the K and V of the first
    `length` tokens of the pages in each block table, read from a host copy of those whole pages. Shares no
    code with the JAX paths (no gather layout, masking or softmax). Returns `[sequences, q_heads, head_dim]`."""
    tables = np.asarray(block_tables[:sequences])
    lens = np.asarray(lengths[:sequences])
    used, where = np.unique(tables, return_inverse=True)
    where = where.reshape(tables.shape)
    pages = np.asarray(jnp.take(arena, jnp.asarray(used), axis=0))  # [used, layers, 2, kv, tokens, dim]
    qs = np.asarray(q[:sequences]).astype(np.float64)
    _, q_heads, head_dim = qs.shape
    kv_heads = pages.shape[3]
    group = q_heads // kv_heads
    out = np.zeros((sequences, q_heads, head_dim))
    for b in range(sequences):
        n = int(lens[b])
        if n == 0:
            continue
        kv = pages[where[b], int(layer)].astype(np.float64)  # [max_pages, 2, kv, tokens, dim]
        k = kv[:, 0].transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)[:, :n]
        v = kv[:, 1].transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)[:, :n]
        for h in range(q_heads):
            logits = k[h // group] @ qs[b, h] / math.sqrt(head_dim)
            weights = np.exp(logits - logits.max())
            out[b, h] = weights / weights.sum() @ v[h // group]
    return out


def main() -> None:
    backend = jax.default_backend()
    args = parse_args(backend)
    print(f"device {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}", flush=True)
    copy = copy_bandwidth(args.copy_mib, args.iters, args.repeats)
    print(f"copy bandwidth {copy['bytes_per_s'] / 1e9:.1f} GB/s ({args.copy_mib} MiB)", flush=True)
    results = []
    key = jax.random.key(0)
    for context in args.context:
        for batch in args.batch:
            key, sub = jax.random.split(key)
            q, arena, layer, block_tables, lengths = make_inputs(args, batch, context, sub)
            moved = bytes_moved(q, arena, block_tables, lengths)
            checked = batch if args.check_seqs <= 0 else min(batch, args.check_seqs)
            oracle = dense_attention_f64(q, arena, layer, block_tables, lengths, checked)
            expected = None
            if any(impl != "reference" for impl in args.impls):
                expected = jax.jit(paged_attention_reference)(q, arena, layer, block_tables, lengths)
            for impl in args.impls:
                row = {"impl": impl, "batch": batch, "context": context, "bytes": moved}
                if impl == "jax-triton":
                    fn, call_args = jax_triton_fn(q, arena, layer, block_tables, lengths)
                else:
                    fn = jax.jit(functools.partial(paged_attention, impl=impl))
                    call_args = (q, arena, layer, block_tables, lengths)
                    if impl == "pallas":
                        dims = check_attention_args(*call_args)
                        row["plan"] = plan_kernel(dims)._asdict()
                        row["interpret"] = backend == "cpu"
                try:
                    row.update(time_call(fn, call_args, args.iters, args.repeats))
                    out = fn(*call_args)
                    got = np.asarray(out[:checked]).astype(np.float64)
                    row["checked_sequences"] = checked
                    row["max_abs_err_vs_dense_f64"] = float(np.max(np.abs(got - oracle)))
                    row["dense_f64_max_abs"] = float(np.max(np.abs(oracle)))
                    if expected is not None and impl != "reference":
                        row["max_abs_err_vs_reference"] = float(
                            jnp.max(jnp.abs(out.astype(jnp.float32) - expected.astype(jnp.float32)))
                        )
                except Exception as error:  # noqa: BLE001 - an OOM or compile failure is a result too
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    print(f"{impl:>10} batch {batch:4d} context {context:5d}: {row['error']}", flush=True)
                else:
                    row["bytes_per_s"] = moved / row["seconds"]
                    row["share_of_copy_bandwidth"] = row["bytes_per_s"] / copy["bytes_per_s"]
                    print(
                        f"{impl:>10} batch {batch:4d} context {context:5d}: {row['seconds'] * 1e6:9.1f} us "
                        f"{row['bytes_per_s'] / 1e9:8.1f} GB/s ({100 * row['share_of_copy_bandwidth']:5.1f}% of copy)"
                        f"  err vs f64 {row['max_abs_err_vs_dense_f64']:.2e} ({checked} seqs)",
                        flush=True,
                    )
                results.append(row)
                del fn, call_args
            del q, arena, block_tables, lengths, expected, oracle
            gc.collect()
    payload = {
        "config": vars(args),
        "definitions": {
            "max_abs_err_vs_dense_f64": "max |output - oracle| over the first checked_sequences sequences; the "
                                        "oracle is softmax attention in float64 (NumPy) over the K/V of the pages "
                                        "in each block table, on the same (dtype-rounded) inputs",
            "dense_f64_max_abs": "max |oracle|: the scale of the error above (an output rounded to bfloat16 is "
                                 "off by up to 2**-9 of its magnitude)",
            "max_abs_err_vs_reference": "max |kernel output - pure-JAX reference output| (kernels only)",
        },
        "copy_bandwidth": copy,
        "results": results,
    }
    if args.quick and args.out is None:
        print("--quick: no result file written (give --out DIR to write one)")
        return
    if args.out is not None:
        common.RESULTS_DIR = Path(args.out)
    path = common.write_result("paged_attention", payload)
    if args.out is not None and path.resolve().parent != Path(args.out).resolve():
        raise SystemExit(f"bench/common.py wrote {path}, not into --out {args.out}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
