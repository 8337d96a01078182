"""Pure-JAX paged-attention decode: the CPU path and the oracle of the Pallas kernel."""

from __future__ import annotations

import jax

from .common import attend_pages_blockwise, check_attention_args, resolve_block_pages, resolve_sm_scale


def paged_attention_reference(q, arena, layer, block_tables, lengths, *, sm_scale: float | None = None,
                              block_pages: int | None = None):
    """Decode attention of one query token per sequence over its K/V pages in the arena.

    Walks each sequence's pages `block_pages` at a time (`attend_pages_blockwise`) up to the longest length in
    the batch, never gathering a whole block table's worth; tokens at or past `lengths` are masked in both
    logits and values (so garbage in unused pages cannot leak in), and the softmax runs in float32. Sequences of
    length 0 get zeros. Returns `[batch, q_heads, head_dim]` in q's dtype.
    """
    dims = check_attention_args(q, arena, layer, block_tables, lengths)
    scale = resolve_sm_scale(sm_scale, dims.head_dim)
    block_pages = resolve_block_pages(block_pages, dims.page_tokens, dims.max_pages)
    with jax.named_scope("paged_attention_reference"):
        qg = q.reshape(dims.batch, 1, dims.kv_heads, dims.group, dims.head_dim)
        out = attend_pages_blockwise(qg, arena, layer, block_tables, lengths, (lengths - 1)[:, None],
                                     (lengths > 0)[:, None], scale=scale, block_pages=block_pages)
        return out.reshape(dims.batch, dims.q_heads, dims.head_dim).astype(q.dtype)
