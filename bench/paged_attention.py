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

The ragged part (`--parts ragged`) times a mixed step of the ragged paged attention
(`harli_jax.kernels.ragged_paged_attention_pallas`, the Triton kernel; interpreted on a CPU, where its time is
not meaningful) against its pure-JAX reference (`ragged_paged_attention_reference`, with the sequences that have
a chunk first and `long_rows` set, as the engine calls it): `--ragged-batch` sequences at a context of
`--ragged-context` tokens each, of which the first `--ragged-prefill` bring a chunk of `--ragged-chunk` new tokens
(the last positions of their context, causal) and the rest one decode token, plus `--ragged-pad` padding rows.
Its bandwidth counts the K/V of every cached token once (a kernel that re-reads a sequence's pages for each block
of its queries moves more; its L2 may absorb that), q and the output; the FLOPs count the causal score and value
products. Its output is checked against a float64 NumPy oracle of causal attention over the pages (on the first
`--check-seqs` / 2 chunked and the first decode sequences, all with `--check-seqs 0`) and the padding rows must be
zeros; the kernel is also compared with the reference.

Writes bench/results/paged_attention-<device>.json, or into `--out DIR`; `--quick` (tiny shapes, seconds on
a CPU) writes only with `--out`. The JSON's "command" (bench/common.py) is the command line that produced it.
A run stopped by SIGTERM (`timeout`) writes the rows it has, marked "incomplete".

    python bench/paged_attention.py                      # the default sweep for this backend
    python bench/paged_attention.py --batch 64 --context 2048 --impls pallas jax-triton
    python bench/paged_attention.py --parts ragged --ragged-prefill 8 --ragged-context 8192
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
RAGGED_IMPLS = ("pallas", "reference")
PARTS = ("decode", "ragged")
SHAPE = dict(q_heads=32, kv_heads=8, head_dim=128, page_tokens=16, layers=2)
DEFAULTS = {
    "gpu": dict(batch=[1, 8, 32, 64, 128], context=[512, 2048, 8192], copy_mib=2048, iters=20, repeats=5,
                check_seqs=8, ragged_batch=32, ragged_chunk=64, ragged_prefill=[8, 32], ragged_context=[2048, 8192],
                ragged_pad=8, **SHAPE),
    "cpu": dict(batch=[1, 4, 16], context=[512, 2048], copy_mib=256, iters=3, repeats=3, check_seqs=0,
                ragged_batch=8, ragged_chunk=64, ragged_prefill=[2], ragged_context=[512], ragged_pad=8, **SHAPE),
    # --quick: tiny shapes on any backend.
    "quick": dict(batch=[1, 3], context=[64, 200], copy_mib=8, iters=2, repeats=2, check_seqs=0,
                  ragged_batch=3, ragged_chunk=8, ragged_prefill=[1, 3], ragged_context=[64], ragged_pad=5,
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
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="decode attention, the ragged (mixed prefill + decode) attention, or both (default)")
    parser.add_argument("--ragged-impls", nargs="+", choices=RAGGED_IMPLS,
                        help="default both on a GPU and with --quick, the reference alone on a CPU")
    parser.add_argument("--ragged-batch", type=int, help="sequences of a ragged step")
    parser.add_argument("--ragged-chunk", type=int, help="new tokens of a chunked sequence (max_query)")
    parser.add_argument("--ragged-prefill", type=int, nargs="+",
                        help="sequences with a chunk, one case per value (the others have one decode token)")
    parser.add_argument("--ragged-context", type=int, nargs="+", help="cached tokens per sequence, after the step")
    parser.add_argument("--ragged-pad", type=int, help="padding rows after the step's tokens")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS["quick" if args.quick else "gpu" if backend == "gpu" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.impls is None:
        # On a CPU, --quick also runs the kernel in interpret mode: a check of its output, not a timing.
        args.impls = list(GPU_IMPLS) if backend == "gpu" else ["reference", "pallas"] if args.quick else ["reference"]
    if args.ragged_impls is None:
        args.ragged_impls = list(RAGGED_IMPLS) if backend == "gpu" or args.quick else ["reference"]
    if args.ragged_batch < 1 or args.ragged_chunk < 1 or args.ragged_pad < 0:
        parser.error("--ragged-batch and --ragged-chunk must be >= 1, --ragged-pad >= 0")
    if not all(0 <= n <= args.ragged_batch for n in args.ragged_prefill):
        parser.error("--ragged-prefill values must lie in [0, --ragged-batch]")
    if min(args.ragged_context) < args.ragged_chunk:
        parser.error("--ragged-context must be at least --ragged-chunk (the chunk is part of the context)")
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
    copy = jax.jit(jnp.copy)
    timing = time_call(copy, (x,), iters, repeats)
    distinct = copy(x).unsafe_buffer_pointer() != x.unsafe_buffer_pointer()  # False: the copy was elided
    moved = 2 * x.nbytes
    return {"bytes": moved, **timing, "bytes_per_s": moved / timing["seconds"], "distinct_output": distinct}


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
    # This layer of those pages, widened to float32 on the device (exact; NumPy's bfloat16 casts are slow).
    pages = np.asarray(jnp.take(arena, jnp.asarray(used), axis=0)[:, int(layer)].astype(jnp.float32))
    qs = np.asarray(q[:sequences].astype(jnp.float32)).astype(np.float64)
    _, q_heads, head_dim = qs.shape
    kv_heads = pages.shape[2]
    group = q_heads // kv_heads
    out = np.zeros((sequences, q_heads, head_dim))
    for b in range(sequences):
        n = int(lens[b])
        if n == 0:
            continue
        kv = pages[where[b]].astype(np.float64)  # [max_pages, 2, kv, tokens, dim]
        k = kv[:, 0].transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)[:, :n]
        v = kv[:, 1].transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)[:, :n]
        for h in range(q_heads):
            logits = k[h // group] @ qs[b, h] / math.sqrt(head_dim)
            weights = np.exp(logits - logits.max())
            out[b, h] = weights / weights.sum() @ v[h // group]
    return out


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"


def run_decode(args, backend: str, copy: dict, results: list, key) -> None:
    """The decode sweep: one row per (context, batch, impl) appended to `results`."""
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
                fn = call_args = None
                try:
                    if impl == "jax-triton":
                        fn, call_args = jax_triton_fn(q, arena, layer, block_tables, lengths)
                    else:
                        fn = jax.jit(functools.partial(paged_attention, impl=impl))
                        call_args = (q, arena, layer, block_tables, lengths)
                        if impl == "pallas":
                            dims = check_attention_args(*call_args)
                            row["plan"] = plan_kernel(dims)._asdict()
                            row["interpret"] = backend == "cpu"
                    row.update(time_call(fn, call_args, args.iters, args.repeats))
                    out = fn(*call_args)
                    got = np.asarray(out[:checked].astype(jnp.float32)).astype(np.float64)
                    row["checked_sequences"] = checked
                    row["max_abs_err_vs_dense_f64"] = float(np.max(np.abs(got - oracle)))
                    row["dense_f64_max_abs"] = float(np.max(np.abs(oracle)))
                    if expected is not None and impl != "reference":
                        row["max_abs_err_vs_reference"] = float(
                            jnp.max(jnp.abs(out.astype(jnp.float32) - expected.astype(jnp.float32)))
                        )
                except Exception as error:  # noqa: BLE001 - an OOM or compile failure is a result too
                    row["error"] = error_text(error)
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


# Ragged (mixed prefill + decode) attention ----------------------------------------------------------------


def make_ragged_inputs(args, prefill: int, context: int, key):
    """A mixed step: `ragged_batch` sequences of `context` cached tokens on randomly permuted pages, the first
    `prefill` with `ragged_chunk` queries (their last positions), the others one; `ragged_pad` padding rows."""
    dtype = jnp.dtype(args.dtype)
    batch = args.ragged_batch
    max_pages = math.ceil(context / args.page_tokens)
    num_pages = 1 + batch * max_pages
    query_lens = np.array([args.ragged_chunk] * prefill + [1] * (batch - prefill), np.int32)
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    tokens = int(query_start[-1]) + args.ragged_pad
    k_arena, k_q, k_perm = jax.random.split(key, 3)
    shape = (num_pages, args.layers, 2, args.kv_heads, args.page_tokens, args.head_dim)
    arena = jax.random.normal(k_arena, shape, dtype)
    q = jax.random.normal(k_q, (tokens, args.q_heads, args.head_dim), dtype)
    pages = 1 + jax.random.permutation(k_perm, num_pages - 1).astype(jnp.int32)
    block_tables = pages.reshape(batch, max_pages)
    context_lens = jnp.full((batch,), context, jnp.int32)
    return q, arena, jnp.int32(args.layers - 1), block_tables, jnp.asarray(query_start), context_lens


def ragged_checked_sequences(batch: int, prefill: int, check_seqs: int) -> list[int]:
    """The sequences checked against the oracle: all with check_seqs <= 0, else up to half of them chunked ones
    and the rest decode ones."""
    if check_seqs <= 0:
        return list(range(batch))
    chunked = min(prefill, max(check_seqs // 2, 1))
    decode = min(batch - prefill, check_seqs - chunked)
    chunked = min(prefill, check_seqs - decode)  # fewer decode sequences than asked: more chunked ones
    return list(range(chunked)) + list(range(prefill, prefill + decode))


def ragged_dense_f64(q, arena, layer, block_tables, query_start, context_lens, sequences) -> dict[int, np.ndarray]:
    """Causal softmax attention in float64 (NumPy) of each listed sequence's queries (the last positions of its
    context) over the K/V of the pages its block table names, from a host copy of those pages. Shares no code
    with the JAX paths. Returns {sequence: [its queries, q_heads, head_dim]}."""
    tables = np.asarray(block_tables)[sequences]
    starts = np.asarray(query_start)
    lens = np.asarray(context_lens)
    used, where = np.unique(tables, return_inverse=True)
    where = where.reshape(tables.shape)
    # This layer of those pages, widened to float32 on the device (exact; NumPy's bfloat16 casts are slow).
    pages = np.asarray(jnp.take(arena, jnp.asarray(used), axis=0)[:, int(layer)].astype(jnp.float32))
    _, q_heads, head_dim = q.shape
    kv_heads = pages.shape[2]
    group = q_heads // kv_heads
    out = {}
    for row, b in enumerate(sequences):
        n, lo, hi = int(lens[b]), int(starts[b]), int(starts[b + 1])
        queries = hi - lo
        result = np.zeros((queries, q_heads, head_dim))
        if n and queries:
            kv = pages[where[row]].astype(np.float64)  # [max_pages, 2, kv, tokens, dim]
            k = kv[:, 0].transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)[:, :n]
            v = kv[:, 1].transpose(1, 0, 2, 3).reshape(kv_heads, -1, head_dim)[:, :n]
            qs = np.asarray(q[lo:hi].astype(jnp.float32)).astype(np.float64).reshape(queries, kv_heads, group,
                                                                                      head_dim)
            positions = n - queries + np.arange(queries)
            visible = np.repeat(np.arange(n)[None, :] <= positions[:, None], group, axis=0)  # [queries * group, n]
            for h in range(kv_heads):
                rows = qs[:, h].reshape(queries * group, head_dim)  # query-major, as the heads of a token
                logits = np.where(visible, rows @ k[h].T / math.sqrt(head_dim), -np.inf)
                weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
                weights /= weights.sum(axis=-1, keepdims=True)
                result[:, h * group:(h + 1) * group] = (weights @ v[h]).reshape(queries, group, head_dim)
        out[b] = result
    return out


def ragged_cost(args, prefill: int, context: int) -> tuple[int, int]:
    """(bytes, FLOPs) of a ragged step: the K/V of every cached token once, q, the output, the tables and
    lengths; 4 * head_dim FLOPs per (query head, visible key)."""
    itemsize = jnp.dtype(args.dtype).itemsize
    batch, chunk = args.ragged_batch, args.ragged_chunk
    tokens = prefill * chunk + (batch - prefill) + args.ragged_pad
    kv = batch * context * 2 * args.kv_heads * args.head_dim * itemsize
    q_and_out = 2 * tokens * args.q_heads * args.head_dim * itemsize
    tables = batch * math.ceil(context / args.page_tokens) * 4 + (2 * batch + 1) * 4
    visible = prefill * (chunk * (context - chunk) + chunk * (chunk + 1) // 2) + (batch - prefill) * context
    return kv + q_and_out + tables, 4 * args.head_dim * args.q_heads * visible


def ragged_reread_bytes(args, prefill: int, context: int, block_q: int) -> int:
    """`ragged_cost`'s bytes with the K/V a kernel program reads if each block of `block_q` queries of a chunk
    reads its sequence's keys up to its causal limit (from DRAM or L2), instead of once per sequence."""
    itemsize = jnp.dtype(args.dtype).itemsize
    chunk = args.ragged_chunk
    per_chunk = sum(context - chunk + min(first + block_q, chunk) for first in range(0, chunk, block_q))
    extra = prefill * (per_chunk - context) * 2 * args.kv_heads * args.head_dim * itemsize
    return ragged_cost(args, prefill, context)[0] + extra


def run_ragged(args, backend: str, copy: dict, rows: list, key) -> None:
    """The ragged cases: one row per (context, prefill, impl) appended to `rows`."""
    try:
        from harli_jax.kernels import ragged_paged_attention_pallas, ragged_paged_attention_reference
        from harli_jax.kernels.ragged_attention import check_ragged_args, plan_ragged
    except ImportError as error:  # the ragged kernel is new: its absence is a result, not a crash
        rows.append({"error": error_text(error)})
        print(f"ragged: {rows[-1]['error']}", flush=True)
        return
    chunk = args.ragged_chunk
    for context in args.ragged_context:
        for prefill in args.ragged_prefill:
            key, sub = jax.random.split(key)
            q, arena, layer, block_tables, query_start, context_lens = make_ragged_inputs(args, prefill, context, sub)
            call_args = (q, arena, layer, block_tables, query_start, context_lens)
            moved, flops = ragged_cost(args, prefill, context)
            sequences = ragged_checked_sequences(args.ragged_batch, prefill, args.check_seqs)
            oracle = ragged_dense_f64(q, arena, layer, block_tables, query_start, context_lens, sequences)
            starts = np.asarray(query_start)
            reference = jax.jit(functools.partial(ragged_paged_attention_reference, max_query=chunk,
                                                  long_rows=prefill))  # one compile for the check and the timing
            expected = None
            for impl in args.ragged_impls:
                row = {"impl": impl, "batch": args.ragged_batch, "prefill_seqs": prefill, "chunk": chunk,
                       "decode_seqs": args.ragged_batch - prefill, "context": context, "tokens": int(q.shape[0]),
                       "padding_rows": args.ragged_pad, "bytes": moved, "flops": flops}
                fn = None
                try:
                    if impl == "pallas":
                        interpret = backend == "cpu"
                        fn = jax.jit(functools.partial(ragged_paged_attention_pallas, max_query=chunk,
                                                       interpret=interpret))
                        row["interpret"] = interpret
                        row["plan"] = plan_ragged(check_ragged_args(*call_args, chunk), chunk)._asdict()
                        row["bytes_if_each_query_block_rereads"] = ragged_reread_bytes(
                            args, prefill, context, row["plan"]["block_q"])
                        if expected is None:
                            expected = reference(*call_args)
                    else:
                        fn = reference
                        row["long_rows"] = prefill
                    row.update(time_call(fn, call_args, args.iters, args.repeats))
                    out = fn(*call_args)
                    host = np.asarray(out.astype(jnp.float32)).astype(np.float64)
                    errors = [np.max(np.abs(host[starts[b]:starts[b + 1]] - oracle[b]), initial=0.0)
                              for b in sequences]
                    row["checked_sequences"] = sequences
                    row["max_abs_err_vs_dense_f64"] = float(max(errors))
                    row["dense_f64_max_abs"] = float(max(np.max(np.abs(o), initial=0.0) for o in oracle.values()))
                    row["padding_rows_zero"] = bool(np.all(host[int(starts[-1]):] == 0))
                    if impl == "pallas":
                        row["max_abs_err_vs_reference"] = float(
                            jnp.max(jnp.abs(out.astype(jnp.float32) - expected.astype(jnp.float32))))
                except Exception as error:  # noqa: BLE001 - an OOM or compile failure is a result too
                    row["error"] = error_text(error)
                    print(f"ragged {impl:>9} prefill {prefill:3d} context {context:5d}: {row['error']}", flush=True)
                else:
                    row["bytes_per_s"] = moved / row["seconds"]
                    row["share_of_copy_bandwidth"] = row["bytes_per_s"] / copy["bytes_per_s"]
                    row["flops_per_s"] = flops / row["seconds"]
                    print(
                        f"ragged {impl:>9} {prefill:3d}x{chunk} + {args.ragged_batch - prefill:3d}x1 context "
                        f"{context:5d}: {row['seconds'] * 1e6:9.1f} us {row['bytes_per_s'] / 1e9:8.1f} GB/s "
                        f"({100 * row['share_of_copy_bandwidth']:5.1f}% of copy) {row['flops_per_s'] / 1e12:6.2f} "
                        f"TFLOP/s  err vs f64 {row['max_abs_err_vs_dense_f64']:.2e} ({len(sequences)} seqs)",
                        flush=True,
                    )
                rows.append(row)
                del fn
            del q, arena, block_tables, query_start, context_lens, call_args, expected, oracle, reference
            gc.collect()


def main() -> None:
    backend = jax.default_backend()
    args = parse_args(backend)
    print(f"device {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}", flush=True)
    results: list[dict] = []
    ragged_rows: list[dict] = []
    payload = {
        "config": vars(args),
        "definitions": {
            "max_abs_err_vs_dense_f64": "max |output - oracle| over the first checked_sequences sequences; the "
                                        "oracle is softmax attention in float64 (NumPy) over the K/V of the pages "
                                        "in each block table, on the same (dtype-rounded) inputs (causal, for the "
                                        "ragged rows: the sequences listed in checked_sequences)",
            "dense_f64_max_abs": "max |oracle|: the scale of the error above (an output rounded to bfloat16 is "
                                 "off by up to 2**-9 of its magnitude)",
            "max_abs_err_vs_reference": "max |kernel output - pure-JAX reference output| (kernels only)",
            "ragged bytes": "K/V of every cached token once, q and the output, the block tables and lengths",
            "ragged flops": "4 * head_dim per (query head, key visible to the query)",
        },
        "results": results,
        "ragged": {"results": ragged_rows},
    }
    write = not (args.quick and args.out is None)
    if args.out is not None:
        common.RESULTS_DIR = Path(args.out)
    if write:
        common.write_result_on_sigterm("paged_attention", lambda: payload, None)
    copy = copy_bandwidth(args.copy_mib, args.iters, args.repeats)
    payload["copy_bandwidth"] = copy
    print(f"copy bandwidth {copy['bytes_per_s'] / 1e9:.1f} GB/s ({args.copy_mib} MiB)", flush=True)
    key = jax.random.key(0)
    if "decode" in args.parts:
        run_decode(args, backend, copy, results, key)
    if "ragged" in args.parts:
        run_ragged(args, backend, copy, ragged_rows, jax.random.fold_in(key, 1))
    if not write:
        print("--quick: no result file written (give --out DIR to write one)")
        return
    path = common.write_result("paged_attention", payload)
    if args.out is not None and path.resolve().parent != Path(args.out).resolve():
        raise SystemExit(f"bench/common.py wrote {path}, not into --out {args.out}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
