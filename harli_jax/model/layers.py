"""The blocks of a Llama-family decoder layer as pure functions: RMSNorm, RoPE, GQA attention, SwiGLU.

Attention is split so that every attention implementation shares the projections: `attention_qkv` gives
the rotated q/k/v of new tokens, an attention core (dense here, paged over the arena in the engine) mixes
them, and `attention_out` applies the output projection and the residual.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.kernels import MASK_VALUE
from harli_jax.model.config import ModelConfig, RopeScaling
from harli_jax.model.params import Adapters, LayerParams, LoRAPair, SlotDelta, TokenLoRA

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """HF's RMSNorm: variance in float32, normalize, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies `[head_dim // 2]` (float32), with the config's scaling applied."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3's smoothing: long wavelengths divided by `factor`, short kept, a blend in between."""
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


class Rope(NamedTuple):
    """RoPE's cos and sin for a set of positions, `[..., tokens, 1, head_dim]` float32: computed once per program
    and shared by every layer."""

    cos: Array
    sin: Array


def rope_tables(cfg: ModelConfig, positions: Array) -> Rope:
    with jax.named_scope("rope_tables"):
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
        angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
        return Rope(jnp.cos(angles), jnp.sin(angles))


def apply_rope(x: Array, rope: Rope) -> Array:
    """Half-split ("rotate_half") RoPE on `x: [..., tokens, heads, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * rope.cos.astype(x.dtype) + rotated * rope.sin.astype(x.dtype)


def linear(x: Array, w: Array, b: Array | None = None,
           lora: LoRAPair | SlotDelta | tuple[TokenLoRA | SlotDelta, ...] | None = None) -> Array:
    """`x @ w (+ b) (+ scale * x @ a @ b)`: a base projection with an optional bias and LoRA delta, a delta per
    token out of the resident slots (`SlotDelta`), or several deltas each on its own tokens
    (`params.mix_adapters`) over the one base projection."""
    y = x @ w
    if b is not None:
        y = y + b
    for delta in lora if isinstance(lora, tuple) else () if lora is None else (lora,):
        if isinstance(delta, SlotDelta):
            y = y + _slot_delta(x, delta)
            continue
        pair, rows = (delta, None) if isinstance(delta, LoRAPair) else (delta.pair, delta.rows)
        update = pair.scale * ((x @ pair.a.astype(x.dtype)) @ pair.b.astype(x.dtype))
        y = y + (update if rows is None else rows.astype(x.dtype) * update)
    return y


def _slot_delta(x: Array, delta: SlotDelta) -> Array:
    """Each token's slot delta as two dense matmuls over every slot at once, masked by the one-hot between them
    (no gather: `x [T, in]` times a `[in, slots * rank]`, then `[T, slots * rank]` times b)."""
    slots, d_in, rank = delta.slots.a.shape
    a = jnp.moveaxis(delta.slots.a, 0, 1).reshape(d_in, slots * rank).astype(x.dtype)
    xa = (x @ a).reshape(*x.shape[:-1], slots, rank) * delta.onehot[..., None].astype(x.dtype)
    return xa.reshape(*x.shape[:-1], slots * rank) @ delta.slots.b.reshape(slots * rank, -1).astype(x.dtype)


def attention_qkv(lp: LayerParams, cfg: ModelConfig, x: Array, rope: Rope,
                  lora: Adapters | None = None) -> tuple[Array, Array, Array]:
    """Pre-norm, q/k/v projections and RoPE: `x [..., T, D]` -> q `[..., T, Hq, hd]`, k/v `[..., T, Hkv, hd]`."""
    lora = lora or {}
    with jax.named_scope("qkv"):
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        lead = x.shape[:-1]
        q = linear(h, lp.q_proj, lp.q_bias, lora.get("q_proj")).reshape(*lead, cfg.num_heads, cfg.head_dim)
        k = linear(h, lp.k_proj, lp.k_bias, lora.get("k_proj")).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = linear(h, lp.v_proj, lp.v_bias, lora.get("v_proj")).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    with jax.named_scope("rope"):
        return apply_rope(q, rope), apply_rope(k, rope), v


def attention_out(lp: LayerParams, cfg: ModelConfig, x: Array, attn: Array, lora: Adapters | None = None) -> Array:
    """Output projection of `attn [..., T, Hq, hd]` plus the residual `x`."""
    with jax.named_scope("o_proj"):
        flat = attn.reshape(*attn.shape[:-2], cfg.q_size)
        return x + linear(flat, lp.o_proj, lp.o_bias, (lora or {}).get("o_proj"))


def dense_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query softmax attention. q `[B, T, Hq, hd]`, k/v `[B, S, Hkv, hd]`, mask `[B, T, S]` bool."""
    b, t, hq, hd = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, hq, hd)


def mlp_block(lp: LayerParams, cfg: ModelConfig, x: Array, lora: Adapters | None = None) -> Array:
    """Pre-norm SwiGLU MLP plus the residual."""
    lora = lora or {}
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        gated = jax.nn.silu(linear(h, lp.gate_proj, lora=lora.get("gate_proj"))) * linear(
            h, lp.up_proj, lora=lora.get("up_proj"))
        return x + linear(gated, lp.down_proj, lora=lora.get("down_proj"))
