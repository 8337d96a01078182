"""Finetune work fused into an inference step (mechanism): the training rows join the step's rows in every
projection of the layers they pass, so both share each weight read; each group gets its own LoRA delta (the
serving adapters' slots and the adapter being trained). Two shapes of forward:

- a layer window (`forward_window`, harli's): the whole micro-batch through layers `start .. start + k - 1`
  beside the step, dense causal attention within the micro-batch, each layer's input stashed as a forward
  micro-step stashes it (`trainer.forward_chunk`); the rest of the micro-batch runs as micro-steps or windows.
- token chunks (`forward_tokens`, FlexLLM's token-level co-serving, cobatch's), over Harli's stash:

A micro-batch on the token path runs its forward in chunks of positions ("token chunks"): positions
`start .. start + chunk - 1` of every row go through every layer, in the same program as an inference step when
there is one. Both groups of tokens are one matrix for each projection, so they share its weight read; each
group gets its own LoRA delta (the serving adapter and the one being trained). Each layer's input and K/V of the
chunk go into the micro-batch's leased pages, and later chunks attend to the K/V of earlier ones, so the chunked
forward is the full causal forward. The chunk's loss and its gradient w.r.t. the last hidden state are computed
there too, sharing the LM head with the inference rows. After the last chunk the backward runs in slices of
layers, top-down (`trainer.backward_chunk`), alone or in an inference step's program.

The stash of a token-chunked micro-batch of N = rows * seq_len tokens, over its leased pages: first the
hidden-state region in rows of `ArenaLayout.stash_row` elements, layer l's inputs at layer slot l and the loss
gradient at slot L (the layout `trainer.forward_chunk` uses, one slot longer); then, from the next whole page,
the K/V region, one row per token and layer (K then V, `2 * kv_heads * head_dim` elements): layer l's token t
at row l * N + t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from harli_jax.lora.trainer import TrainBatch, read_hidden, stash_hidden, token_loss_sum
from harli_jax.model.layers import Rope, attention_out, attention_qkv, dense_attention, mlp_block, rope_tables
from harli_jax.model.paged import ArenaLayout, TokenBatch, paged_attend
from harli_jax.model.params import (
    Adapters,
    LoRASlots,
    Params,
    layer_adapters,
    mix_adapters,
    slot_deltas,
    slot_onehot,
)
from harli_jax.model.sampling import logprobs_of, sample
from harli_jax.model.sharding import ARENA_SPEC, HEADS_SPEC, TP
from harli_jax.model.transformer import causal_mask, embed, lm_logits

Array = jax.Array


def _hidden_pages(layout: ArenaLayout, tokens: int) -> int:
    """Whole pages of the hidden-state region: L layer inputs and the loss gradient of `tokens` tokens."""
    cfg = layout.cfg
    return -(-(cfg.num_layers + 1) * tokens * cfg.hidden_size // layout.page_elements)


def token_stash_pages(layout: ArenaLayout, tokens: int) -> int:
    """Pages a token-chunked micro-batch of `tokens` tokens leases: its hidden states, then its K/V."""
    return _hidden_pages(layout, tokens) + -(-tokens // layout.page_tokens)


def _kv_row(layout: ArenaLayout) -> int:
    return 2 * layout.cfg.num_kv_heads * layout.cfg.head_dim


def _kv_index(layout: ArenaLayout, stash_pages: Array, layer: int, ids: Array, tokens: int) -> tuple[Array, Array]:
    per_page = layout.page_elements // _kv_row(layout)
    rows = layer * tokens + ids
    return stash_pages[_hidden_pages(layout, tokens) + rows // per_page], rows % per_page


def _stash_kv(layout: ArenaLayout, arena: Array, stash_pages: Array, layer: int, ids: Array, tokens: int, k: Array,
              v: Array) -> Array:
    """Writes the K/V `[n, kv_heads, head_dim]` of tokens `ids` of layer `layer` into the K/V region (over a
    mesh each device its own KV heads')."""

    def write(arena, stash_pages, ids, k, v):
        local = layout.local()
        pages, slots = _kv_index(local, stash_pages, layer, ids, tokens)
        view = arena.reshape(arena.shape[0], -1, _kv_row(local))
        kv = jnp.concatenate([k.reshape(ids.shape[0], -1), v.reshape(ids.shape[0], -1)], axis=-1)
        return view.at[pages, slots].set(kv.astype(arena.dtype)).reshape(arena.shape)

    return layout.per_device(write, (ARENA_SPEC, P(), P(), HEADS_SPEC, HEADS_SPEC), ARENA_SPEC)(
        arena, stash_pages, ids, k, v)


def _read_kv(layout: ArenaLayout, arena: Array, stash_pages: Array, layer: int, rows: int,
             seq_len: int) -> tuple[Array, Array]:
    """The stashed K and V of layer `layer` for every position of every row: `[rows, seq_len, kv_heads, hd]`."""

    def read(arena, stash_pages):
        local = layout.local()
        ids = jnp.arange(rows * seq_len)
        pages, slots = _kv_index(local, stash_pages, layer, ids, rows * seq_len)
        kv = arena.reshape(arena.shape[0], -1, _kv_row(local))[pages, slots]
        kv = kv.reshape(rows, seq_len, 2, local.cfg.num_kv_heads, local.cfg.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

    heads = P(None, None, TP, None)
    return layout.per_device(read, (ARENA_SPEC, P()), (heads, heads))(arena, stash_pages)


def read_loss_gradient(layout: ArenaLayout, arena: Array, stash_pages: Array, shape: tuple[int, int, int]) -> Array:
    """The stashed gradient of the loss w.r.t. the last hidden state, `shape = [rows, seq_len, D]`: where the
    backward of a token-chunked micro-batch starts."""
    tokens = shape[0] * shape[1]
    return read_hidden(layout, arena, stash_pages, layout.cfg.num_layers, jnp.arange(tokens), tokens).reshape(shape)


def _joined_inputs(cfg, inference: TokenBatch, serving_lora: LoRASlots | None, trained_rope: Rope):
    """For the step's rows followed by training rows (rotary tables `trained_rope`): the joined rotary tables,
    the `[T, 1]` mask of the step's rows, and the adapter-slot one-hot (`slot_onehot`; training rows: no slot)."""
    first, tokens = inference.tokens.shape[0], trained_rope.cos.shape[0]
    served = rope_tables(cfg, inference.positions)
    rope = Rope(*(jnp.concatenate([a, b]) for a, b in zip(served, trained_rope, strict=True)))
    is_served = (jnp.arange(first + tokens) < first)[:, None]
    onehot = slot_onehot(serving_lora, None if serving_lora is None else jnp.concatenate(
        [inference.adapter_slots, jnp.full(tokens, -1, jnp.int32)]))
    return rope, is_served, onehot


def _zero_after(x: Array, dtype) -> Array:
    """An exact 0 of `dtype` that depends on `x` (NaN and inf included): added to what a write stores, it orders
    the write after `x` is computed, which `lax.optimization_barrier` does not do for XLA:CPU's copy insertion."""
    first = x.reshape(-1)[0]
    return (jnp.where(jnp.isfinite(first), first, 0) * 0).astype(dtype)


def forward_window(params: Params, layout: ArenaLayout, lora: Adapters, arena: Array, x: Array, batch: TrainBatch,
                   stash_pages: Array, start: Array, *, layers: int, inference: TokenBatch,
                   serving_lora: LoRASlots | None = None, attention_impl: str = "auto", logprobs: int | None = None):
    """The inference step `inference` (each token with its adapter slot of `serving_lora`) with a layer window
    of a micro-batch in its program: the micro-batch's hidden states `x [rows, seq_len, D]` through layers
    `start .. start + layers - 1` (`start` traced: one program per window size), its rows joined to the step's
    in those layers' projections. Each window layer's input is stashed at its layer slot, as
    `trainer.forward_chunk` does, once the step's last read of the arena is done. Returns (arena, the window's
    output, the step's next tokens), and with `logprobs` (as `paged_step`) their `Logprobs` last."""
    cfg = layout.cfg
    rows, seq_len, hidden = x.shape
    tokens, first = rows * seq_len, inference.tokens.shape[0]
    ids = jnp.arange(tokens)
    with jax.named_scope("fused_inputs"):
        mask = causal_mask(batch.segment_ids)
        both_rope, is_served, both_onehot = _joined_inputs(cfg, inference, serving_lora,
                                                           rope_tables(cfg, batch.positions.reshape(-1)))
        served_rope = rope_tables(cfg, inference.positions)
        served_onehot = slot_onehot(serving_lora, inference.adapter_slots)
        h, t = embed(params, inference.tokens), x.reshape(tokens, hidden)
    window_inputs = [t] * layers

    def pad(a: Array) -> Array:
        return jnp.concatenate([a, jnp.zeros((tokens, *a.shape[1:]), a.dtype)])

    for index, lp in enumerate(params.layers):
        inside = (start <= index) & (index < start + layers)
        served = slot_deltas(serving_lora, index, served_onehot)
        joined = mix_adapters([(slot_deltas(serving_lora, index, both_onehot), None),
                               (layer_adapters(lora, index), ~is_served)])
        window_inputs = [jnp.where(index == start + j, t, kept) for j, kept in enumerate(window_inputs)]

        def qkv_joined(h, t, lp=lp, joined=joined):
            return attention_qkv(lp, cfg, jnp.concatenate([h, t]), both_rope, joined)

        def qkv_served(h, t, lp=lp, served=served):
            return tuple(map(pad, attention_qkv(lp, cfg, h, served_rope, served)))

        def out_joined(h, t, q, k, v, attn, lp=lp, joined=joined):
            def trained(a):
                return a[first:].reshape(rows, seq_len, *a.shape[1:])

            with jax.named_scope("train_attention"):
                trained_attn = dense_attention(trained(q), trained(k), trained(v), mask).reshape(tokens, *q.shape[1:])
            out = mlp_block(lp, cfg, attention_out(lp, cfg, jnp.concatenate([h, t]),
                                                   jnp.concatenate([attn, trained_attn]), joined), joined)
            return out[:first], out[first:]

        def out_served(h, t, q, k, v, attn, lp=lp, served=served):
            return mlp_block(lp, cfg, attention_out(lp, cfg, h, attn, served), served), t

        with jax.named_scope("fused_window_layer"):
            q, k, v = jax.lax.cond(inside, qkv_joined, qkv_served, h, t)
            attn, arena = paged_attend(q[:first], k[:first], v[:first], arena, index, inference, attention_impl,
                                       layout.mesh)
            h, t = jax.lax.cond(inside, out_joined, out_served, h, t, q, k, v, attn)
    after = _zero_after(h, t.dtype)  # every stash write after the step's last attention read: no arena copy
    for j, value in enumerate(window_inputs):
        arena = stash_hidden(layout, arena, stash_pages, start + j, ids, tokens, value + after)
    with jax.named_scope("sample"):
        logits = lm_logits(params, cfg, h[inference.sample_index])
        next_tokens = sample(logits, inference.sampling)
    if logprobs is None:
        return arena, t.reshape(x.shape), next_tokens
    return arena, t.reshape(x.shape), next_tokens, logprobs_of(logits, next_tokens, logprobs)


def forward_tokens(params: Params, layout: ArenaLayout, lora: Adapters, arena: Array, batch: TrainBatch,
                   stash_pages: Array, start: Array, totals: tuple[Array, Array], *, chunk: int,
                   inference: TokenBatch | None = None, serving_lora: LoRASlots | None = None,
                   attention_impl: str = "auto", logprobs: int | None = None):
    """Positions `start .. start + chunk - 1` of every row of `batch` through every layer, stashing each layer's
    input and K/V and, after the last layer, the loss gradient; adds the chunk's loss sum and trained tokens to
    `totals`. With `inference`, that step's tokens run in the same program (each token with its adapter slot
    of `serving_lora`), sharing every projection and the LM head. Returns (arena, totals, the inference step's
    next tokens or None), and with `logprobs` (as `paged_step`) their `Logprobs` last."""
    cfg = layout.cfg
    rows, seq_len = batch.tokens.shape
    tokens = rows * seq_len
    ids = (jnp.arange(rows)[:, None] * seq_len + start + jnp.arange(chunk)).reshape(-1)

    def cut(a: Array) -> Array:
        return jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=1)

    part = TrainBatch(*(cut(a) for a in (batch.tokens, batch.targets, batch.loss_mask, batch.segment_ids,
                                          batch.positions)))
    key_positions = jnp.arange(seq_len)
    mask = (key_positions <= (start + jnp.arange(chunk))[:, None])[None] & (
        batch.segment_ids[:, None, :] == part.segment_ids[:, :, None])
    with jax.named_scope("fused_inputs"):
        x = embed(params, part.tokens).reshape(rows * chunk, cfg.hidden_size)
        rope = rope_tables(cfg, part.positions.reshape(-1))
        first = 0
        if inference is not None:
            first = inference.tokens.shape[0]
            x = jnp.concatenate([embed(params, inference.tokens), x])
            rope, is_served, onehot = _joined_inputs(cfg, inference, serving_lora, rope)
    for index, lp in enumerate(params.layers):
        adapters = layer_adapters(lora, index)
        if inference is not None:
            served = slot_deltas(serving_lora, index, onehot)
            adapters = mix_adapters([(served, None), (adapters, ~is_served)])
        with jax.named_scope("fused_layer"):
            arena = stash_hidden(layout, arena, stash_pages, index, ids, tokens, x[first:])
            q, k, v = attention_qkv(lp, cfg, x, rope, adapters)
            arena = _stash_kv(layout, arena, stash_pages, index, ids, tokens, k[first:], v[first:])
            if inference is not None:  # every write of the layer before its reads: no copy of the arena
                served_attn, arena = paged_attend(q[:first], k[:first], v[:first], arena, index, inference,
                                                  attention_impl, layout.mesh)
            keys, values = _read_kv(layout, arena, stash_pages, index, rows, seq_len)
            with jax.named_scope("train_attention"):
                attn = dense_attention(q[first:].reshape(rows, chunk, *q.shape[1:]), keys, values, mask)
                attn = attn.reshape(rows * chunk, *q.shape[1:])
            if inference is not None:
                attn = jnp.concatenate([served_attn, attn])
            x = mlp_block(lp, cfg, attention_out(lp, cfg, x, attn, adapters), adapters)
    sampled = x[:first][inference.sample_index] if inference is not None else x[:0]

    def head_loss(trained: Array):
        logits = lm_logits(params, cfg, jnp.concatenate([sampled, trained]))
        total, count = token_loss_sum(logits[len(sampled):].reshape(rows, chunk, -1), part)
        return total, (count, logits[: len(sampled)])

    with jax.named_scope("train_loss"):
        (total, (count, served_logits)), g = jax.value_and_grad(head_loss, has_aux=True)(x[first:])
    arena = stash_hidden(layout, arena, stash_pages, cfg.num_layers, ids, tokens, g)
    totals = (totals[0] + total, totals[1] + count)
    if inference is None:
        return arena, totals, None
    with jax.named_scope("sample"):
        tokens = sample(served_logits, inference.sampling)
        if logprobs is None:
            return arena, totals, tokens
        return arena, totals, tokens, logprobs_of(served_logits, tokens, logprobs)
