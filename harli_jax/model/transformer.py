"""The full-sequence causal forward: the reference every faster path (paged decode, micro-steps) is tested against."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from harli_jax.model.config import ModelConfig
from harli_jax.model.layers import Rope, attention_out, attention_qkv, dense_attention, mlp_block, rms_norm, rope_tables
from harli_jax.model.params import Adapters, LayerParams, Params, layer_adapters

Array = jax.Array


def embed(params: Params, token_ids: Array) -> Array:
    with jax.named_scope("embed"):
        return jnp.take(params.embed, token_ids, axis=0)


def lm_logits(params: Params, cfg: ModelConfig, x: Array) -> Array:
    """Final norm and LM head (the tied embedding when there is none), float32 logits."""
    with jax.named_scope("lm_head"):
        h = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
        head = params.embed.T if params.lm_head is None else params.lm_head
        return jnp.matmul(h, head, preferred_element_type=jnp.float32)


def segment_positions(segment_ids: Array) -> Array:
    """Position of each token within its run of equal segment ids (packed sequences restart at 0)."""
    t = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=segment_ids.ndim - 1)


def causal_mask(segment_ids: Array) -> Array:
    """`[B, T, T]`: token t sees tokens s <= t of its own segment."""
    t = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def decoder_layer(lp: LayerParams, cfg: ModelConfig, x: Array, rope: Rope, mask: Array,
                  lora: Adapters | None = None) -> Array:
    """One layer over dense attention; the unit the training micro-steps stash and recompute."""
    with jax.named_scope("layer"):
        with jax.named_scope("attention"):
            q, k, v = attention_qkv(lp, cfg, x, rope, lora)
            x = attention_out(lp, cfg, x, dense_attention(q, k, v, mask), lora)
        return mlp_block(lp, cfg, x, lora)


def sequence_inputs(token_ids: Array, positions: Array | None, segment_ids: Array | None) -> tuple[Array, Array]:
    """Checked `(positions, mask)` of a `[B, T]` batch, with the defaults `forward` documents."""
    if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise ValueError(f"token_ids must be an integer array [batch, tokens], got {token_ids.dtype}{token_ids.shape}")
    for name, a in (("positions", positions), ("segment_ids", segment_ids)):
        if a is not None and a.shape != token_ids.shape:
            raise ValueError(f"{name} must have the shape of token_ids {token_ids.shape}, got {a.shape}")
    if segment_ids is None:
        segment_ids = jnp.zeros_like(token_ids)
    if positions is None:
        positions = segment_positions(segment_ids)
    return positions, causal_mask(segment_ids)


def hidden_states(params: Params, cfg: ModelConfig, token_ids: Array, positions: Array | None = None,
                  segment_ids: Array | None = None, lora: Adapters | None = None) -> Array:
    """The last layer's output `[B, T, D]` (before the final norm)."""
    positions, mask = sequence_inputs(token_ids, positions, segment_ids)
    x, rope = embed(params, token_ids), rope_tables(cfg, positions)
    for index, lp in enumerate(params.layers):
        x = decoder_layer(lp, cfg, x, rope, mask, layer_adapters(lora, index))
    return x


@functools.partial(jax.jit, static_argnames=("cfg",))
def forward(params: Params, cfg: ModelConfig, token_ids: Array, positions: Array | None = None,
            segment_ids: Array | None = None, lora: Adapters | None = None) -> Array:
    """Logits `[B, T, vocab]` (float32) for `token_ids [B, T]`.

    `segment_ids [B, T]` packs several sequences in one row: tokens attend only within their segment, and
    positions (when not given) restart at each segment. Padding is a segment of its own. `lora` holds
    stacked LoRA deltas by projection name.
    """
    return lm_logits(params, cfg, hidden_states(params, cfg, token_ids, positions, segment_ids, lora))
