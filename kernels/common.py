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
