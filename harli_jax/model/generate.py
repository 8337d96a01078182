"""Greedy generation by re-running the full forward each token: slow, simple, and exact (a reference)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.errors import ConfigError
from harli_jax.model.config import ModelConfig
from harli_jax.model.params import Params
from harli_jax.model.transformer import forward


@functools.partial(jax.jit, static_argnames=("cfg",))
def _greedy_next(params: Params, cfg: ModelConfig, buffer: jax.Array, length: jax.Array) -> jax.Array:
    logits = forward(params, cfg, buffer)
    return jnp.argmax(logits[0, length - 1])


def greedy_generate(params: Params, cfg: ModelConfig, prompt_ids: Sequence[int], max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> list[int]:
    """New token ids (greedy) after `prompt_ids`, ending at a stop id (included) or `max_new_tokens`."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ConfigError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ConfigError(f"prompt token ids {bad[:8]} are outside the vocabulary (size {cfg.vocab_size})")
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    total = len(prompt) + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                          f"context length {cfg.max_position_embeddings}")
    size = min(max(16, 1 << (total - 1).bit_length()), cfg.max_position_embeddings)
    buffer = np.zeros((1, size), np.int32)
    buffer[0, : len(prompt)] = prompt
    out: list[int] = []
    for length in range(len(prompt), total):
        token = int(_greedy_next(params, cfg, jnp.asarray(buffer), jnp.int32(length)))
        out.append(token)
        if token in stop_ids:
            break
        buffer[0, length] = token
    return out
