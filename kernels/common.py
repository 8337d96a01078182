"""Argument checks and constants shared by the paged-attention implementations."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# A large finite negative for masked logits: -inf would turn `m_prev - m_next` into NaN
# when a whole row is masked, and this still underflows exp() to exactly 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# The kernels' dot precision: float32 inputs multiply in IEEE float32 (Triton's default for them is TF32);
# bfloat16 and float16 inputs are unaffected.
EXACT_F32 = jax.lax.Precision.HIGHEST


class AttentionDims(NamedTuple):
    """Static sizes of one paged-attention call, read from the argument shapes."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    num_pages: int
    layers: int
    page_tokens: int
    max_pages: int

    @property
    def group(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.q_heads // self.kv_heads


def _shape(x) -> tuple[int, ...]:
    return tuple(jnp.shape(x))


def check_attention_args(q, arena, layer, block_tables, lengths) -> AttentionDims:
    """Validates the arguments of a paged-attention call from their static shapes and dtypes."""
    if jnp.ndim(q) != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got shape {_shape(q)}")
    if jnp.ndim(arena) != 6 or _shape(arena)[2] != 2:
        raise ValueError(
            "arena must be [num_pages, layers, 2, kv_heads, page_tokens, head_dim] "
            f"(K at index 0 of axis 2, V at 1), got shape {_shape(arena)}"
        )
    batch, q_heads, head_dim = _shape(q)
    num_pages, layers, _, kv_heads, page_tokens, arena_head_dim = _shape(arena)
    if arena_head_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the arena ({arena_head_dim}) differ")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of the arena's kv_heads ({kv_heads})")
    if jnp.dtype(q.dtype) != jnp.dtype(arena.dtype):
        raise ValueError(f"q dtype {jnp.dtype(q.dtype)} differs from the arena dtype {jnp.dtype(arena.dtype)}")
    if not jnp.issubdtype(arena.dtype, jnp.floating):
        raise ValueError(f"arena must hold floating-point K/V, got dtype {jnp.dtype(arena.dtype)}")
    check_layer(layer)
    if jnp.ndim(block_tables) != 2 or _shape(block_tables)[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_pages], got shape {_shape(block_tables)}")
    if jnp.dtype(block_tables.dtype) != jnp.int32:
        raise ValueError(f"block_tables must be int32, got {jnp.dtype(block_tables.dtype)}")
    if _shape(lengths) != (batch,):
        raise ValueError(f"lengths must be [batch={batch}], got shape {_shape(lengths)}")
    if jnp.dtype(lengths.dtype) != jnp.int32:
        raise ValueError(f"lengths must be int32, got {jnp.dtype(lengths.dtype)}")
    return AttentionDims(
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        num_pages=num_pages,
        layers=layers,
        page_tokens=page_tokens,
        max_pages=_shape(block_tables)[1],
    )


def check_layer(layer) -> None:
    """Checks that the layer index is an integer scalar (a Python int or a traced int32)."""
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(
            f"layer must be an integer scalar, got shape {_shape(layer)} dtype {jnp.result_type(layer)}"
        )


def layer_index(layer) -> jax.Array:
    """The layer index as an int32 scalar array."""
    return jnp.asarray(layer, jnp.int32)


def resolve_sm_scale(sm_scale: float | None, head_dim: int) -> float:
    """The softmax scale, 1/sqrt(head_dim) unless given."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


BLOCK_TOKENS = 128  # context positions one step of the blockwise walk reads, by default


def resolve_block_pages(block_pages: int | None, page_tokens: int, max_pages: int) -> int:
    """Pages per block of the blockwise walk (`BLOCK_TOKENS` worth unless given), at most `max_pages`, checked."""
    if block_pages is None:
        block_pages = max(1, BLOCK_TOKENS // page_tokens)
    if isinstance(block_pages, bool) or not isinstance(block_pages, int) or block_pages < 1:
        raise ValueError(f"block_pages must be a positive Python int or None, got {block_pages!r}")
    return min(block_pages, max_pages)


def attend_pages_blockwise(qg, arena, layer, block_tables, context_lens, positions, live, *, scale, block_pages):
    """Causal attention of query windows over their sequences' pages, walked `block_pages` pages at a time with a
    float32 online softmax up to the longest context in `context_lens` (a bound read at run time: one program
    serves every context, and a step reads only the pages its contexts span).

    `qg: [rows, window, kv_heads, group, head_dim]`; `positions`, `live: [rows, window]` (a query's position, and
    whether it is one); keys at or past a row's context length, or past a query's position, are masked in the
    logits and the values. Returns float32 `[rows, window, kv_heads, group, head_dim]`, zeros for a query that
    sees no key."""
    rows, window, kv_heads, group, head_dim = qg.shape
    page_tokens = arena.shape[4]
    max_pages = block_tables.shape[1]
    num_blocks = -(-max_pages // block_pages)
    block = block_pages * page_tokens
    tables = jnp.pad(block_tables, ((0, 0), (0, num_blocks * block_pages - max_pages)))  # page 0: masked
    at, heads = layer_index(layer), jnp.arange(kv_heads)[None, :, None]
    qg = qg.astype(jnp.float32)
    offsets = jnp.arange(block)
    walked = jnp.minimum(-(-jnp.max(context_lens, initial=0) // block), num_blocks)

    def step(j, carry):
        m, total, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tables, j * block_pages, block_pages, axis=1)[:, None, :]
        k = arena[pages, at, 0, heads].reshape(rows, kv_heads, block, head_dim)
        v = arena[pages, at, 1, heads].reshape(rows, kv_heads, block, head_dim)
        keys = j * block + offsets
        in_context = keys[None, :] < context_lens[:, None]  # [rows, block]
        v = jnp.where(in_context[:, None, :, None], v, 0).astype(jnp.float32)
        visible = (live[:, :, None] & in_context[:, None, :]
                   & (keys[None, None, :] <= positions[:, :, None]))[:, None, None]  # [rows, 1, 1, window, block]
        logits = jnp.einsum("bwkgd,bktd->bkgwt", qg, k.astype(jnp.float32), preferred_element_type=jnp.float32,
                            precision=EXACT_F32)
        logits = jnp.where(visible, logits * scale, MASK_VALUE)
        m_next = jnp.maximum(m, logits.max(axis=-1))
        p = jnp.where(visible, jnp.exp(logits - m_next[..., None]), 0.0)
        correction = jnp.exp(m - m_next)
        acc = acc * correction[..., None] + jnp.einsum("bkgwt,bktd->bkgwd", p, v,
                                                       preferred_element_type=jnp.float32, precision=EXACT_F32)
        return m_next, total * correction + p.sum(axis=-1), acc

    init = (jnp.full((rows, kv_heads, group, window), MASK_VALUE, jnp.float32),
            jnp.zeros((rows, kv_heads, group, window), jnp.float32),
            jnp.zeros((rows, kv_heads, group, window, head_dim), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, walked, step, init)
    out = jnp.where(total[..., None] > 0, acc / jnp.maximum(total, 1e-30)[..., None], 0.0)
    return out.transpose(0, 3, 1, 2, 4)  # [rows, window, kv_heads, group, head_dim]
