"""Paged-attention decode kernel in Pallas (Triton backend) over the unified arena.

One program per (sequence, KV head, split of the context). A program loads its query heads once (padded
to the 16 rows Triton's dot needs), then walks its pages in blocks: each block gathers the page ids from
the block table, loads K and V straight from `arena[page, layer, 0/1, kv_head]` with masked loads (tokens
at or past the length are never read, so garbage in free pages cannot reach the output), and folds the
block into a float32 online softmax. With more than one split, each program writes its normalized partial
output and base-2 log-sum-exp, and a float32 merge outside the kernel combines them exactly.
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

from .common import EXACT_F32, MASK_VALUE, AttentionDims, check_attention_args, layer_index, resolve_sm_scale
from .reference import paged_attention_reference

IMPLS = ("auto", "pallas", "reference")
MIN_DOT_DIM = 16  # Triton's dot wants every dimension >= 16.
BLOCK_TOKENS = 64  # K/V tokens a program loads per loop iteration (by default).
# Programs that fill an H100/H200 (132 SMs, a few resident programs each) for several waves; below this
# the context is split across programs.
TARGET_PROGRAMS = 1024


class KernelPlan(NamedTuple):
    """Static tiling of one kernel call."""

    pages_per_block: int  # pages loaded per loop iteration (a power of two)
    pages_per_split: int  # pages one program covers (a multiple of pages_per_block)
    num_splits: int  # programs per (sequence, KV head)
    group_pad: int  # query rows per program: the GQA group padded to a power of two >= 16


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def plan_kernel(
    dims: AttentionDims, pages_per_block: int | None = None, pages_per_split: int | None = None
) -> KernelPlan:
    """Chooses block and split sizes from the static shapes (or checks the given ones)."""
    for name, size in (("page_tokens", dims.page_tokens), ("head_dim", dims.head_dim)):
        if not _is_pow2(size):
            raise ValueError(f"the Pallas kernel needs a power-of-two {name}, got {size}; use impl='reference'")
    if dims.head_dim < MIN_DOT_DIM:
        raise ValueError(f"the Pallas kernel needs head_dim >= {MIN_DOT_DIM}, got {dims.head_dim}")
    arena_rows = dims.num_pages * dims.layers * 2 * dims.kv_heads * dims.page_tokens
    if arena_rows >= 2**31:
        raise ValueError(f"the Pallas kernel indexes arena rows in int32; {arena_rows} rows is too many")
    min_pages = pl.cdiv(MIN_DOT_DIM, dims.page_tokens)
    if pages_per_block is None:
        pages_per_block = min(max(BLOCK_TOKENS // dims.page_tokens, 1), _next_pow2(dims.max_pages))
        if pages_per_split is not None and pages_per_split > 0:
            pages_per_block = min(pages_per_block, pages_per_split & -pages_per_split)  # must divide the split
        pages_per_block = max(min_pages, pages_per_block)
    elif not _is_pow2(pages_per_block) or pages_per_block < min_pages:
        raise ValueError(
            f"pages_per_block must be a power of two with pages_per_block * page_tokens >= {MIN_DOT_DIM}, "
            f"got {pages_per_block} (page_tokens={dims.page_tokens})"
        )
    num_blocks = pl.cdiv(dims.max_pages, pages_per_block)
    if pages_per_split is None:
        splits = min(num_blocks, pl.cdiv(TARGET_PROGRAMS, dims.batch * dims.kv_heads))
        pages_per_split = pl.cdiv(num_blocks, splits) * pages_per_block
    elif pages_per_split <= 0 or pages_per_split % pages_per_block:
        raise ValueError(
            f"pages_per_split must be a positive multiple of pages_per_block={pages_per_block}, "
            f"got {pages_per_split}"
        )
    return KernelPlan(
        pages_per_block=pages_per_block,
        pages_per_split=pages_per_split,
        num_splits=pl.cdiv(dims.max_pages, pages_per_split),
        group_pad=max(MIN_DOT_DIM, _next_pow2(dims.group)),
    )


def _kernel(layer_ref, lengths_ref, block_tables_ref, q_ref, kv_ref, *out_refs, dims, plan, scale_log2):
    """Attention of one sequence's query heads of one KV head over one split of its pages.

    Every array arrives flattened to rows of `head_dim` values, so each load's addresses are one row index
    per token plus the column: the arena is `kv_ref[(((page * layers + layer) * 2 + k_or_v) * kv_heads
    + kv_head) * page_tokens + slot, :]`.
    """
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_tokens, head_dim, group = dims.page_tokens, dims.head_dim, dims.group
    page_shift = page_tokens.bit_length() - 1
    block_k = plan.pages_per_block * page_tokens
    page_rows = dims.layers * 2 * dims.kv_heads * page_tokens  # rows of one page (all layers, K and V)
    k_rows = (layer_ref[0] * 2 * dims.kv_heads + h) * page_tokens  # this layer's K rows of this KV head
    v_rows = k_rows + dims.kv_heads * page_tokens
    length = jnp.minimum(lengths_ref[b], dims.max_pages * page_tokens)
    first_page = s * plan.pages_per_split
    end_page = jnp.minimum(pl.cdiv(length, page_tokens), first_page + plan.pages_per_split)
    num_blocks = pl.cdiv(jnp.maximum(end_page - first_page, 0), plan.pages_per_block)

    rows = jnp.arange(plan.group_pad)
    row_ok = rows < group
    cols = jnp.arange(head_dim)[None, :]
    row_mask = jnp.broadcast_to(row_ok[:, None], (plan.group_pad, head_dim))
    q_rows = b * dims.q_heads + h * group + jnp.minimum(rows, group - 1)
    q = plgpu.load(q_ref.at[q_rows[:, None], cols], mask=row_mask, other=0)

    tokens = jnp.arange(block_k)

    def body(i, carry):
        acc, m_prev, l_prev = carry
        pos = ((first_page + i * plan.pages_per_block) << page_shift) + tokens  # sequence positions
        valid = pos < length
        page_ids = plgpu.load(block_tables_ref.at[b, pos >> page_shift], mask=valid, other=0)
        page_ids = jnp.clip(page_ids, 0, dims.num_pages - 1)  # a corrupt table must not fault the GPU
        kv_mask = jnp.broadcast_to(valid[:, None], (block_k, head_dim))
        token_rows = page_ids * page_rows + (pos & (page_tokens - 1))
        k = plgpu.load(kv_ref.at[(token_rows + k_rows)[:, None], cols], mask=kv_mask, other=0)
        v = plgpu.load(kv_ref.at[(token_rows + v_rows)[:, None], cols], mask=kv_mask, other=0)
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                 precision=EXACT_F32)
        logits = jnp.where(valid[None, :], logits * scale_log2, MASK_VALUE)
        m_next = jnp.maximum(m_prev, logits.max(axis=1))
        p = jnp.where(valid[None, :], jnp.exp2(logits - m_next[:, None]), 0.0)
        correction = jnp.exp2(m_prev - m_next)
        l_next = l_prev * correction + p.sum(axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                             precision=EXACT_F32)
        return acc * correction[:, None] + pv, m_next, l_next

    init = (
        jnp.zeros((plan.group_pad, head_dim), jnp.float32),
        jnp.full((plan.group_pad,), MASK_VALUE, jnp.float32),
        jnp.zeros((plan.group_pad,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, num_blocks, body, init)
    seen = denom > 0  # false for an empty sequence or a split past its length
    out = acc / jnp.where(seen, denom, 1.0)[:, None]
    # Padding rows point one past the end and are masked: they are never written.
    if plan.num_splits == 1:
        (o_ref,) = out_refs  # [batch * q_heads, head_dim]
        o_rows = jnp.where(row_ok, b * dims.q_heads + h * group + rows, dims.batch * dims.q_heads)
        plgpu.store(o_ref.at[o_rows[:, None], cols], out.astype(o_ref.dtype), mask=row_mask)
    else:
        o_ref, lse_ref = out_refs  # [batch * kv_heads * splits * group, head_dim], [same rows]
        first_row = ((b * dims.kv_heads + h) * plan.num_splits + s) * group
        split_rows = jnp.where(row_ok, first_row + rows, lse_ref.shape[0])
        plgpu.store(o_ref.at[split_rows[:, None], cols], out, mask=row_mask)
        lse = jnp.where(seen, m + jnp.log2(jnp.where(seen, denom, 1.0)), MASK_VALUE)
        plgpu.store(lse_ref.at[split_rows], lse, mask=row_ok)


def _merge_splits(o_split, lse_split):
    """Combines per-split normalized outputs by their base-2 log-sum-exp, in float32."""
    lse_max = lse_split.max(axis=2, keepdims=True)
    weights = jnp.exp2(lse_split - lse_max)  # [batch, kv_heads, splits, group]
    return (o_split * weights[..., None]).sum(axis=2) / weights.sum(axis=2)[..., None]


def paged_attention_pallas(
    q,
    arena,
    layer,
    block_tables,
    lengths,
    *,
    sm_scale: float | None = None,
    interpret: bool | None = None,
    pages_per_block: int | None = None,
    pages_per_split: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """The Pallas kernel path of `paged_attention`; `interpret=None` interprets exactly on CPU."""
    dims = check_attention_args(q, arena, layer, block_tables, lengths)
    plan = plan_kernel(dims, pages_per_block, pages_per_split)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    scale_log2 = resolve_sm_scale(sm_scale, dims.head_dim) * math.log2(math.e)
    if plan.num_splits == 1:
        out_shape = (jax.ShapeDtypeStruct((dims.batch * dims.q_heads, dims.head_dim), q.dtype),)
    else:
        split_rows = dims.batch * dims.kv_heads * plan.num_splits * dims.group
        out_shape = (
            jax.ShapeDtypeStruct((split_rows, dims.head_dim), jnp.float32),
            jax.ShapeDtypeStruct((split_rows,), jnp.float32),
        )
    kernel = functools.partial(_kernel, dims=dims, plan=plan, scale_log2=scale_log2)
    with jax.named_scope("paged_attention"):
        outs = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=(dims.batch, dims.kv_heads, plan.num_splits),
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="paged_attention",
        )(
            layer_index(layer).reshape(1),
            lengths,
            block_tables,
            q.reshape(-1, dims.head_dim),
            arena.reshape(-1, dims.head_dim),  # a bitcast: rows of head_dim values
        )
        if plan.num_splits == 1:
            return outs[0].reshape(q.shape)
        split_shape = (dims.batch, dims.kv_heads, plan.num_splits, dims.group)
        out = _merge_splits(outs[0].reshape(*split_shape, dims.head_dim), outs[1].reshape(split_shape))
        return out.reshape(q.shape).astype(q.dtype)


def paged_attention(
    q,
    arena,
    layer,
    block_tables,
    lengths,
    *,
    sm_scale: float | None = None,
    impl: str = "auto",
    interpret: bool | None = None,
    pages_per_block: int | None = None,
    pages_per_split: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """Decode attention of `q: [batch, q_heads, head_dim]` over K/V pages of `arena` at a traced `layer`.

    `block_tables: int32[batch, max_pages]` lists each sequence's pages in order (page 0, the null page,
    pads), `lengths: int32[batch]` its cached tokens (0 marks an empty slot, whose output is zeros).
    `impl` is "pallas" (the Triton kernel), "reference" (pure JAX) or "auto" (the kernel on GPU, the
    reference elsewhere). The tiling arguments only apply to the kernel. Returns q's shape and dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl == "reference":
        return paged_attention_reference(q, arena, layer, block_tables, lengths, sm_scale=sm_scale)
    return paged_attention_pallas(
        q,
        arena,
        layer,
        block_tables,
        lengths,
        sm_scale=sm_scale,
        interpret=interpret,
        pages_per_block=pages_per_block,
        pages_per_split=pages_per_split,
        num_warps=num_warps,
        num_stages=num_stages,
    )
