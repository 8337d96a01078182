"""Writes of new decode tokens' K/V into the arena."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import check_layer, layer_index


def write_kv(arena, layer, k, v, page_ids, offsets):
    """Writes one new token's K and V per sequence into its page of the arena and returns the arena.

    `k, v: [batch, kv_heads, head_dim]` go to `arena[page_ids[b], layer, 0 / 1, :, offsets[b], :]`, cast to
    the arena dtype. A slot whose page id is 0 (the null page: an empty batch slot) writes nothing, and so
    does an out-of-range page id or offset. One scatter, so XLA updates a donated arena in place.
    """
    arena = jnp.asarray(arena)
    if jnp.ndim(arena) != 6 or jnp.shape(arena)[2] != 2:
        raise ValueError(
            f"arena must be [num_pages, layers, 2, kv_heads, page_tokens, head_dim], got shape {jnp.shape(arena)}"
        )
    num_pages, _, _, kv_heads, _, head_dim = jnp.shape(arena)
    check_layer(layer)
    for name, x in (("k", k), ("v", v)):
        if jnp.ndim(x) != 3 or jnp.shape(x)[1:] != (kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [batch, kv_heads={kv_heads}, head_dim={head_dim}], got shape {jnp.shape(x)}"
            )
    batch = jnp.shape(k)[0]
    if jnp.shape(v)[0] != batch:
        raise ValueError(f"k and v batch sizes differ: {jnp.shape(k)[0]} and {jnp.shape(v)[0]}")
    for name, x in (("page_ids", page_ids), ("offsets", offsets)):
        if jnp.shape(x) != (batch,) or jnp.dtype(x.dtype) != jnp.int32:
            raise ValueError(f"{name} must be int32[batch={batch}], got {jnp.dtype(x.dtype)}{list(jnp.shape(x))}")
    with jax.named_scope("write_kv"):
        # Null-page slots are sent out of bounds, where the scatter drops them.
        pages = jnp.where(page_ids == 0, num_pages, page_ids)
        new = jnp.stack([k, v], axis=1).astype(arena.dtype)  # [batch, 2, kv_heads, head_dim]
        if batch == 1:
            # One row stays a scatter with a dropped second row: XLA turns a one-row scatter into a
            # dynamic-update-slice, which it may redo for each reader of the arena, copying the arena each time.
            pages, offsets = jnp.append(pages, num_pages), jnp.append(offsets, 0)
            new = jnp.concatenate([new, new])
        return arena.at[pages, layer_index(layer), :, :, offsets, :].set(new, mode="drop")
