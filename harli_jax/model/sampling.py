"""Per-row token sampling on device: greedy, temperature, top-k, top-p, with per-request seeds."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """Sampling settings of each row `[rows]`. Temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

    temperature: Array  # float32
    top_k: Array  # int32
    top_p: Array  # float32
    seed: Array  # uint32
    counter: Array  # int32: tokens the request has generated so far, so a draw never depends on the batch


def sample(logits: Array, rows: SamplingRows) -> Array:
    """Next token per row of `logits [rows, vocab]` (float32), as int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.all(rows.temperature <= 0), lambda: greedy,
                        lambda: jnp.where(rows.temperature <= 0, greedy, _draw(logits, rows)))


def _draw(logits: Array, rows: SamplingRows) -> Array:
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(rows.temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = (rows.top_k[:, None] <= 0) | (rank < rows.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < rows.top_p[:, None]  # the top token always stays (its mass_before is 0)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(rows.seed, rows.counter)
    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, sorted_logits, -jnp.inf))
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
