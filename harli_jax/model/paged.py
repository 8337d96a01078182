"""The inference step over the paged arena: decode tokens and prefill chunks as one flat batch of tokens.

Every token carries its sequence's block table, its position, and the page slot its K/V goes to. Each layer
first writes the step's new K/V into the arena, then attends each token to its sequence's pages up to its own
position, so a prefill chunk sees its prefix and itself causally, and a decode token sees its whole context.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from harli_jax.kernels import paged_attention, write_kv
from harli_jax.model.config import ModelConfig
from harli_jax.model.layers import attention_out, attention_qkv, mlp_block
from harli_jax.model.params import Adapters, Params
from harli_jax.model.sampling import SamplingRows, sample
from harli_jax.model.transformer import embed, lm_logits

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """One step's tokens `[T]` over sequences `[B]`; padding tokens have page id 0 (the null page)."""

    tokens: Array  # int32[T]
    positions: Array  # int32[T]
    seq_index: Array  # int32[T]: the token's row of block_tables
    page_ids: Array  # int32[T]: page its K/V is written to
    offsets: Array  # int32[T]: token slot in that page
    block_tables: Array  # int32[B, P]
    sample_index: Array  # int32[B]: the token whose output gives the sequence's next token
    sampling: SamplingRows  # [B]


def arena_shape(cfg: ModelConfig, num_pages: int, page_tokens: int) -> tuple[int, ...]:
    """`[num_pages, layers, 2 (K, V), kv_heads, page_tokens, head_dim]`; one page id covers all layers."""
    return (num_pages, cfg.num_layers, 2, cfg.num_kv_heads, page_tokens, cfg.head_dim)


def paged_step(params: Params, cfg: ModelConfig, arena: Array, batch: TokenBatch, *,
               attention_impl: str = "auto", lora: Adapters | None = None) -> tuple[Array, Array]:
    """Runs the batch through the model (with LoRA deltas if given), writing its K/V into `arena`; returns
    (arena, next token `[B]`)."""
    lengths = jnp.where(batch.page_ids > 0, batch.positions + 1, 0).astype(jnp.int32)
    tables = batch.block_tables[batch.seq_index]

    def layer_body(carry, xs):
        x, arena = carry
        lp, adapters, layer = xs
        with jax.named_scope("layer"):
            with jax.named_scope("attention"):
                q, k, v = attention_qkv(lp, cfg, x, batch.positions, adapters)
                arena = write_kv(arena, layer, k, v, batch.page_ids, batch.offsets)
                attn = paged_attention(q, arena, layer, tables, lengths, impl=attention_impl)
                x = attention_out(lp, cfg, x, attn, adapters)
            return (mlp_block(lp, cfg, x, adapters), arena), None

    layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, arena), _ = jax.lax.scan(layer_body, (embed(params, batch.tokens), arena), (params.layers, lora, layers))
    logits = lm_logits(params, cfg, x[batch.sample_index])
    with jax.named_scope("sample"):
        return arena, sample(logits, batch.sampling)


def read_pages(arena: Array, page_ids: Array) -> Array:
    """The K/V of `page_ids` across all layers: `[n, layers, 2, kv_heads, page_tokens, head_dim]`."""
    return arena[page_ids]


def write_pages(arena: Array, page_ids: Array, pages: Array) -> Array:
    """Writes whole pages (the inverse of `read_pages`); page id 0 entries are dropped."""
    num_pages = arena.shape[0]
    return arena.at[jnp.where(page_ids == 0, num_pages, page_ids)].set(pages.astype(arena.dtype), mode="drop")
