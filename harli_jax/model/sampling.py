"""Per-row token sampling on device: greedy, temperature, top-k (by `lax.top_k`), top-p (by a full sort, only
when some row sets it), with per-request seeds."""

from __future__ import annotations

import dataclasses
import functools

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Log-probabilities under the model's own distribution (before temperature, top-k and top-p, as the OpenAI
    API and vLLM report them) of each row's sampled token, and its `k` most likely tokens."""

    token: Array  # float32 [rows]
    top: Array  # float32 [rows, k], descending
    top_ids: Array  # int32 [rows, k]


def logprobs_of(logits: Array, tokens: Array, k: int) -> Logprobs:
    """The `Logprobs` of `tokens [rows]` sampled from `logits [rows, vocab]`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
    top, ids = jax.lax.top_k(log_probs, k)
    return Logprobs(token, top, ids.astype(jnp.int32))


def sample(logits: Array, rows: SamplingRows) -> Array:
    """Next token per row of `logits [rows, vocab]` (float32), as int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.all(rows.temperature <= 0), lambda: greedy,
                        lambda: jnp.where(rows.temperature <= 0, greedy, _draw(logits, rows)))


# Rows whose top_k is at most this (and top_p 1) find their cut with `lax.top_k`; others need a full sort.
TOP_K_CAP = 64


def _draw(logits: Array, rows: SamplingRows) -> Array:
    """Gumbel-max over the kept tokens, in vocabulary order: a token is kept when its scaled logit reaches the
    row's cut (its top_k-th value, and the last value inside its top_p mass), so a draw is the same whichever way
    the cut was found."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(rows.temperature, 1e-6)[:, None]
    cap = min(TOP_K_CAP, vocab)
    needs_sort = jnp.any((rows.top_p < 1.0) | (rows.top_k > cap))
    cut = jax.lax.cond(needs_sort, _sorted_cut, functools.partial(_top_k_cut, cap=cap), scaled, rows)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(rows.seed, rows.counter)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(keys)
    return jnp.argmax(jnp.where(scaled >= cut[:, None], scaled + noise, -jnp.inf), axis=-1).astype(jnp.int32)


def _top_k_cut(scaled: Array, rows: SamplingRows, cap: int) -> Array:
    """Each row's top_k-th largest value (-inf without top_k), from the `cap` largest: no sort."""
    values = jax.lax.top_k(scaled, cap)[0]
    kth = jnp.take_along_axis(values, jnp.clip(rows.top_k - 1, 0, cap - 1)[:, None], axis=-1)[:, 0]
    return jnp.where(rows.top_k > 0, kth, -jnp.inf)


def _sorted_cut(scaled: Array, rows: SamplingRows) -> Array:
    """Each row's smallest kept value under both top_k and top_p, from the sorted row."""
    ordered = -jnp.sort(-scaled, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]
    keep = (rows.top_k[:, None] <= 0) | (rank < rows.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ordered, -jnp.inf), axis=-1)
    keep &= jnp.cumsum(probs, axis=-1) - probs < rows.top_p[:, None]  # the top token always stays
    return jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1)
