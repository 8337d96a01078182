"""Ragged paged attention: prefill chunks and decode tokens of many sequences in one call over the arena.

Queries arrive grouped by sequence (`q: [tokens, q_heads, head_dim]`, sequence b's rows from
`query_start[b]` to `query_start[b + 1]`); their K/V are already in the arena. A sequence's queries are the
last positions of its context and attend causally. Two paths:

- `ragged_paged_attention_reference` (pure JAX, the CPU path): runs every sequence as a window of `max_query`
  queries (or of one query past `long_rows`) cut from a padded q, walks its pages in blocks with a float32
  online softmax up to the longest context (`attend_pages_blockwise`), and gathers the small outputs back to
  token order.
- `ragged_paged_attention_pallas` (Triton): one program per (sequence, block of queries, KV head) reads its
  queries straight from q, walks the pages up to the causal limit of its block with a float32 online
  softmax, and stores straight into token order; nothing outside the kernel gathers or scatters.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .common import (
    EXACT_F32,
    MASK_VALUE,
    AttentionDims,
    attend_pages_blockwise,
    check_attention_args,
    layer_index,
    resolve_block_pages,
    resolve_sm_scale,
)
from .paged_attention_kernel import IMPLS, MIN_DOT_DIM, plan_kernel

BLOCK_ROWS = 64  # query rows (queries x GQA group) a program handles, by default.


class RaggedDims(NamedTuple):
    """Static sizes of one ragged call: the paged-attention sizes (batch = sequences) plus the token count."""

    tokens: int
    attention: AttentionDims


class RaggedPlan(NamedTuple):
    """Static tiling of one ragged kernel call."""

    block_q: int  # queries of one sequence per program
    num_q_blocks: int  # programs per (sequence, KV head): enough blocks to cover max_query
    rows_pad: int  # block_q * group query rows, padded to a power of two >= 16
    pages_per_block: int  # pages loaded per loop iteration


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def _check_int32_vector(name, x, size, size_name) -> None:
    """Checks that `x` is an int32 vector of `size` entries."""
    if _shape(x) != (size,) or jnp.dtype(x.dtype) != jnp.int32:
        raise ValueError(f"{name} must be int32[{size_name}={size}], got {jnp.dtype(x.dtype)}{list(_shape(x))}")


def check_ragged_args(q, arena, layer, block_tables, query_start, context_lens, max_query) -> RaggedDims:
    """Validates the arguments of a ragged call from their static shapes and dtypes."""
    if jnp.ndim(q) != 3:
        raise ValueError(f"q must be [tokens, q_heads, head_dim], got shape {_shape(q)}")
    if jnp.ndim(context_lens) != 1:
        raise ValueError(f"context_lens must be int32[batch], got shape {_shape(context_lens)}")
    batch = _shape(context_lens)[0]
    _check_int32_vector("context_lens", context_lens, batch, "batch")
    _check_int32_vector("query_start", query_start, batch + 1, "batch + 1")
    if isinstance(max_query, bool) or not isinstance(max_query, int) or max_query < 1:
        raise ValueError(f"max_query must be a positive Python int (it is static), got {max_query!r}")
    tokens, q_heads, head_dim = _shape(q)
    # The remaining checks are the decode kernel's, with one stand-in query per sequence.
    per_sequence = jax.ShapeDtypeStruct((batch, q_heads, head_dim), q.dtype)
    dims = check_attention_args(per_sequence, arena, layer, block_tables, context_lens)
    return RaggedDims(tokens=tokens, attention=dims)


def _resolve_long_rows(long_rows: int | None, batch: int) -> int:
    """The number of sequences that may have more than one query (all of them unless given), checked."""
    if long_rows is None:
        return batch
    if isinstance(long_rows, bool) or not isinstance(long_rows, int) or not 0 <= long_rows <= batch:
        raise ValueError(f"long_rows must be a Python int in [0, batch={batch}] or None, got {long_rows!r}")
    return long_rows


def _window_attention(q_pad, arena, layer, block_tables, query_start, context_lens, *, window, dims, scale,
                      block_pages):
    """Attention of a set of sequences, each as a window of `window` queries: `[rows * window, heads, dim]`."""
    rows = block_tables.shape[0]
    starts = query_start[:-1]
    query_lens = query_start[1:] - starts
    windows = jax.vmap(lambda s: lax.dynamic_slice_in_dim(q_pad, s, window, axis=0))(starts)
    qg = windows.reshape(rows, window, dims.kv_heads, dims.group, dims.head_dim)
    queries = jnp.arange(window)
    positions = (context_lens - query_lens)[:, None] + queries[None, :]  # [rows, window]
    live = queries[None, :] < query_lens[:, None]
    out = attend_pages_blockwise(qg, arena, layer, block_tables, context_lens, positions, live, scale=scale,
                                 block_pages=block_pages)
    return out.reshape(rows * window, dims.q_heads, dims.head_dim)


def ragged_paged_attention_reference(
    q,
    arena,
    layer,
    block_tables,
    query_start,
    context_lens,
    *,
    max_query: int,
    long_rows: int | None = None,
    sm_scale: float | None = None,
    block_pages: int | None = None,
):
    """Pure-JAX ragged paged attention: the CPU path and the oracle of the Pallas kernel.

    Sequences `[0, long_rows)` run as windows of `max_query` queries, the rest (promised at most one query
    each) as windows of one. Each set walks its sequences' pages `block_pages` at a time up to its longest
    context (`attend_pages_blockwise`); keys past the context are masked in logits and values, keys past a
    query's position in its logits; tokens at or past `query_start[-1]` get zeros.
    """
    ragged = check_ragged_args(q, arena, layer, block_tables, query_start, context_lens, max_query)
    dims = ragged.attention
    long_rows = _resolve_long_rows(long_rows, dims.batch)
    scale = resolve_sm_scale(sm_scale, dims.head_dim)
    block_pages = resolve_block_pages(block_pages, dims.page_tokens, dims.max_pages)
    with jax.named_scope("ragged_paged_attention_reference"):
        q_pad = jnp.pad(q, ((0, max_query), (0, 0), (0, 0)))  # every window stays inside
        window_of = functools.partial(_window_attention, q_pad, arena, layer, dims=dims, scale=scale,
                                      block_pages=block_pages)
        sets = [(0, long_rows, max_query), (long_rows, dims.batch, 1)]
        outs = [
            window_of(block_tables[lo:hi], query_start[lo : hi + 1], context_lens[lo:hi], window=window)
            for lo, hi, window in sets
            if hi > lo
        ]
        # Token t belongs to the sequence whose range holds it; its output is row `offset` of its window.
        token = jnp.arange(ragged.tokens)
        seq = jnp.searchsorted(query_start[1:], token, side="right")  # batch for padding tokens
        offset = token - query_start[jnp.minimum(seq, dims.batch - 1)]
        window = jnp.where(seq < long_rows, max_query, 1)
        first_row = jnp.where(seq < long_rows, seq * max_query, long_rows * max_query + (seq - long_rows))
        out = jnp.concatenate(outs)
        rows = jnp.where((seq < dims.batch) & (offset < window), first_row + offset, out.shape[0])
        out = jnp.take(out, rows, axis=0, mode="fill", fill_value=0)  # past the end: zeros
        return out.astype(q.dtype)


def plan_ragged(
    ragged: RaggedDims, max_query: int, block_q: int | None = None, pages_per_block: int | None = None
) -> RaggedPlan:
    """Chooses the query block and page block from the static shapes (or checks the given ones)."""
    dims = ragged.attention
    pages_per_block = plan_kernel(dims, pages_per_block).pages_per_block  # shared checks and default
    if ragged.tokens * dims.q_heads >= 2**31:
        raise ValueError(f"the Pallas kernel indexes q rows in int32; {ragged.tokens * dims.q_heads} is too many")
    if block_q is None:
        block_q = min(max_query, max(BLOCK_ROWS // dims.group, 1))
    elif isinstance(block_q, bool) or not isinstance(block_q, int) or block_q < 1:
        raise ValueError(f"block_q must be a positive int, got {block_q!r}")
    rows = block_q * dims.group
    return RaggedPlan(
        block_q=block_q,
        num_q_blocks=pl.cdiv(max_query, block_q),
        rows_pad=max(MIN_DOT_DIM, 1 << (rows - 1).bit_length()),
        pages_per_block=pages_per_block,
    )


def _kernel(
    layer_ref,
    query_start_ref,
    context_lens_ref,
    block_tables_ref,
    q_ref,
    kv_ref,
    _zeros_ref,
    o_ref,
    *,
    ragged,
    plan,
    max_query,
    scale_log2,
):
    """Attention of one block of one sequence's queries (GQA group folded into rows) of one KV head.

    q and the output are rows `token * q_heads + head` of `head_dim` values; the arena is rows
    `(((page * layers + layer) * 2 + k_or_v) * kv_heads + kv_head) * page_tokens + slot`. The output
    aliases a zeroed buffer, so rows no program stores (padding tokens) stay exactly zero.
    """
    dims = ragged.attention
    b, qb, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = query_start_ref[b]
    query_len = query_start_ref[b + 1] - start
    live_len = jnp.minimum(query_len, max_query)
    first = qb * plan.block_q

    @pl.when(first < live_len)
    def _():
        page_tokens, head_dim, group = dims.page_tokens, dims.head_dim, dims.group
        page_shift = page_tokens.bit_length() - 1
        block_k = plan.pages_per_block * page_tokens
        page_rows = dims.layers * 2 * dims.kv_heads * page_tokens
        k_rows = (layer_ref[0] * 2 * dims.kv_heads + h) * page_tokens
        v_rows = k_rows + dims.kv_heads * page_tokens
        context = context_lens_ref[b]

        rows = jnp.arange(plan.rows_pad)
        query = first + rows // group  # query index within the sequence
        row_ok = (rows < plan.block_q * group) & (query < live_len)
        position = context - query_len + query  # its position in the sequence
        cols = jnp.arange(head_dim)[None, :]
        row_mask = jnp.broadcast_to(row_ok[:, None], (plan.rows_pad, head_dim))
        q_rows = (start + query) * dims.q_heads + h * group + rows % group
        q = plgpu.load(q_ref.at[jnp.where(row_ok, q_rows, 0)[:, None], cols], mask=row_mask, other=0)

        last = jnp.minimum(first + plan.block_q, live_len) - 1
        kv_end = jnp.clip(context - query_len + last + 1, 0, dims.max_pages * page_tokens)  # causal limit
        tokens = jnp.arange(block_k)

        def body(i, carry):
            acc, m_prev, l_prev = carry
            pos = i * block_k + tokens
            valid = pos < kv_end
            page_ids = plgpu.load(block_tables_ref.at[b, pos >> page_shift], mask=valid, other=0)
            page_ids = jnp.clip(page_ids, 0, dims.num_pages - 1)  # a corrupt table must not fault the GPU
            kv_mask = jnp.broadcast_to(valid[:, None], (block_k, head_dim))
            token_rows = page_ids * page_rows + (pos & (page_tokens - 1))
            k = plgpu.load(kv_ref.at[(token_rows + k_rows)[:, None], cols], mask=kv_mask, other=0)
            v = plgpu.load(kv_ref.at[(token_rows + v_rows)[:, None], cols], mask=kv_mask, other=0)
            visible = valid[None, :] & (pos[None, :] <= position[:, None])
            logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                 precision=EXACT_F32)
            logits = jnp.where(visible, logits * scale_log2, MASK_VALUE)
            m_next = jnp.maximum(m_prev, logits.max(axis=1))
            p = jnp.where(visible, jnp.exp2(logits - m_next[:, None]), 0.0)
            correction = jnp.exp2(m_prev - m_next)
            l_next = l_prev * correction + p.sum(axis=1)
            pv = lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                precision=EXACT_F32,
            )
            return acc * correction[:, None] + pv, m_next, l_next

        init = (
            jnp.zeros((plan.rows_pad, head_dim), jnp.float32),
            jnp.full((plan.rows_pad,), MASK_VALUE, jnp.float32),
            jnp.zeros((plan.rows_pad,), jnp.float32),
        )
        acc, _, denom = lax.fori_loop(0, pl.cdiv(kv_end, block_k), body, init)
        out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]  # a query that sees no key gets zeros
        # Rows that are not queries point one past the end and are masked: they are never written.
        o_rows = jnp.where(row_ok, q_rows, ragged.tokens * dims.q_heads)
        plgpu.store(o_ref.at[o_rows[:, None], cols], out.astype(o_ref.dtype), mask=row_mask)


def ragged_paged_attention_pallas(
    q,
    arena,
    layer,
    block_tables,
    query_start,
    context_lens,
    *,
    max_query: int,
    sm_scale: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """The Pallas (Triton) path of `ragged_paged_attention`; `interpret=True` runs it exactly on CPU.

    `block_q` is the queries of one sequence per program (default: `BLOCK_ROWS` rows of queries x GQA
    group), `pages_per_block` the pages per loop iteration.
    """
    ragged = check_ragged_args(q, arena, layer, block_tables, query_start, context_lens, max_query)
    dims = ragged.attention
    plan = plan_ragged(ragged, max_query, block_q, pages_per_block)
    scale_log2 = resolve_sm_scale(sm_scale, dims.head_dim) * math.log2(math.e)
    kernel = functools.partial(_kernel, ragged=ragged, plan=plan, max_query=max_query, scale_log2=scale_log2)
    rows = jax.ShapeDtypeStruct((ragged.tokens * dims.q_heads, dims.head_dim), q.dtype)
    with jax.named_scope("ragged_paged_attention"):
        out = pl.pallas_call(
            kernel,
            out_shape=rows,
            grid=(dims.batch, plan.num_q_blocks, dims.kv_heads),
            input_output_aliases={6: 0},
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="ragged_paged_attention",
        )(
            layer_index(layer).reshape(1),
            query_start,
            context_lens,
            block_tables,
            q.reshape(-1, dims.head_dim),
            arena.reshape(-1, dims.head_dim),  # a bitcast: rows of head_dim values
            jnp.zeros(rows.shape, rows.dtype),
        )
        return out.reshape(q.shape)


def ragged_paged_attention(
    q,
    arena,
    layer,
    block_tables,
    query_start,
    context_lens,
    *,
    max_query: int,
    long_rows: int | None = None,
    sm_scale: float | None = None,
    impl: str = "auto",
):
    """Causal attention of ragged query chunks `q: [tokens, q_heads, head_dim]` over their pages in `arena`.

    Sequence b's queries are rows `query_start[b]:query_start[b + 1]` (at most the static `max_query`), the
    last positions of its `context_lens[b]` cached tokens (K/V already written); `block_tables[b]` lists its
    pages. Rows at or past `query_start[-1]` get zeros. `long_rows` promises that only sequences before it
    have more than one query (the reference uses it). `impl` is "pallas" (the Triton kernel, interpreted on
    CPU), "reference" (pure JAX) or "auto" (the kernel on GPU, the reference elsewhere).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    args = (q, arena, layer, block_tables, query_start, context_lens)
    if impl == "reference":
        return ragged_paged_attention_reference(*args, max_query=max_query, long_rows=long_rows, sm_scale=sm_scale)
    # The kernel ignores the promise, but a malformed one is still an error.
    _resolve_long_rows(long_rows, check_ragged_args(*args, max_query).attention.batch)
    return ragged_paged_attention_pallas(
        *args, max_query=max_query, sm_scale=sm_scale, interpret=jax.default_backend() == "cpu"
    )
