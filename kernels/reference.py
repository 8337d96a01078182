"""Pure-JAX paged-attention decode: the CPU path and the oracle of the Pallas kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import MASK_VALUE, check_attention_args, layer_index, resolve_sm_scale


def paged_attention_reference(q, arena, layer, block_tables, lengths, *, sm_scale: float | None = None):
    """Decode attention of one query token per sequence over its K/V pages in the arena.

    Gathers only the pages named by `block_tables` (never a whole layer of the pool), masks tokens at or
    past `lengths` in both logits and values (so garbage in unused pages cannot leak in), and computes the
    softmax in float32. Sequences of length 0 get zeros. Returns `[batch, q_heads, head_dim]` in q's dtype.
    """
    dims = check_attention_args(q, arena, layer, block_tables, lengths)
    scale = resolve_sm_scale(sm_scale, dims.head_dim)
    batch, kv_heads, head_dim = dims.batch, dims.kv_heads, dims.head_dim
    context = dims.max_pages * dims.page_tokens
    with jax.named_scope("paged_attention_reference"):
        # K and V gathered separately, straight into [batch, kv_heads, pages, page_tokens, head_dim] order.
        pages, at, heads = block_tables[:, None, :], layer_index(layer), jnp.arange(kv_heads)[None, :, None]
        k = arena[pages, at, 0, heads].reshape(batch, kv_heads, context, head_dim)
        v = arena[pages, at, 1, heads].reshape(batch, kv_heads, context, head_dim)
        valid = jnp.arange(context)[None, :] < lengths[:, None]  # [batch, context]
        v = jnp.where(valid[:, None, :, None], v, 0)
        qg = q.reshape(batch, kv_heads, dims.group, head_dim)
        logits = jnp.einsum(
            "bkgd,bktd->bkgt", qg, k, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
        )
        logits = jnp.where(valid[:, None, None, :], logits * scale, MASK_VALUE)
        weights = jnp.where(valid[:, None, None, :], jax.nn.softmax(logits, axis=-1), 0.0)
        out = jnp.einsum(
            "bkgt,bktd->bkgd",
            weights,
            v.astype(jnp.float32),
            preferred_element_type=jnp.float32,
            precision=jax.lax.Precision.HIGHEST,
        )
        return out.reshape(batch, dims.q_heads, head_dim).astype(q.dtype)
