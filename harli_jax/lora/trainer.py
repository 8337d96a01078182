"""LoRA training programs (mechanism): the single-program micro-batch step, the micro-steps that cut it into
pieces small enough for decode's slack, and the Optax update. Only the LoRA tree is differentiated; the base
weights are read, never copied or donated.

Micro-steps of one micro-batch, in order:
  embed -> forward chunks (layers a..b, each layer's input stashed in leased arena pages) -> loss (final norm,
  LM head, cross-entropy, gradient w.r.t. the last hidden state) -> backward chunks (layers b..a, each layer
  recomputed from its stash and differentiated with `jax.vjp`) -> commit (the micro-batch's LoRA gradient is
  added to the accumulator). Until the commit nothing is applied, so an abandoned micro-batch leaves no trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from harli_jax.model.config import ModelConfig
from harli_jax.model.layers import rope_tables
from harli_jax.model.paged import ArenaLayout
from harli_jax.model.params import Adapters, LayerParams, Params, layer_adapters
from harli_jax.model.sharding import ARENA_SPEC, HIDDEN_SPEC
from harli_jax.model.transformer import causal_mask, decoder_layer, embed, lm_logits

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """A packed micro-batch on device, every field `[rows, seq_len]`."""

    tokens: Array  # int32
    targets: Array  # int32: the next token of the same sample
    loss_mask: Array  # float32: 1 where the target is trained
    segment_ids: Array  # int32: 1, 2, ... per sample in a row, 0 on padding
    positions: Array  # int32

    @classmethod
    def from_host(cls, arrays: Mapping[str, np.ndarray]) -> TrainBatch:
        """A micro-batch's host arrays (`lora.data.MicroBatch.arrays()`) on the device."""
        return cls(**{k: jnp.asarray(v) for k, v in arrays.items()})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    lora: Adapters
    opt_state: optax.OptState
    accum: Adapters  # summed gradients of the committed micro-batches (loss summed over tokens)
    accum_tokens: Array  # float32: loss tokens in `accum`
    step: Array  # int32: optimizer steps applied


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW on a schedule; a job (runtime.finetune.FinetuneJob) gives every value but Adam's betas."""

    learning_rate: float
    warmup_steps: int
    total_steps: int
    weight_decay: float
    max_grad_norm: float
    b1: float = 0.9
    b2: float = 0.999


def make_optimizer(c: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on a warmup + cosine schedule."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, max(c.warmup_steps, 1),
                                                  max(c.total_steps, c.warmup_steps + 1))
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm),
                       optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))


def init_state(lora: Adapters, optimizer: optax.GradientTransformation) -> TrainState:
    zeros = jax.tree.map(jnp.zeros_like, lora)
    return TrainState(lora=lora, opt_state=optimizer.init(lora), accum=zeros, accum_tokens=jnp.float32(0),
                      step=jnp.int32(0))


def token_loss_sum(logits: Array, batch: TrainBatch) -> tuple[Array, Array]:
    """Masked next-token cross-entropy in float32: (sum over trained tokens, number of trained tokens)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch.loss_mask), jnp.sum(batch.loss_mask)


def _logits(lora: Adapters, params: Params, cfg: ModelConfig, batch: TrainBatch, remat: bool = False) -> Array:
    layer = jax.checkpoint(decoder_layer, static_argnums=(1,)) if remat else decoder_layer
    mask, rope = causal_mask(batch.segment_ids), rope_tables(cfg, batch.positions)
    x = embed(params, batch.tokens)
    for index, lp in enumerate(params.layers):
        x = layer(lp, cfg, x, rope, mask, layer_adapters(lora, index))
    return lm_logits(params, cfg, x)


def loss_sum(lora: Adapters, params: Params, cfg: ModelConfig, batch: TrainBatch, remat: bool = False):
    """The micro-batch loss of the whole model in one program; `remat` recomputes each layer in backward."""
    return token_loss_sum(_logits(lora, params, cfg, batch, remat), batch)


def eval_sums(lora: Adapters, params: Params, cfg: ModelConfig, batch: TrainBatch):
    """(loss sum, trained tokens, the greedy next token at every position `[rows, seq_len]`) of a micro-batch."""
    logits = _logits(lora, params, cfg, batch)
    return (*token_loss_sum(logits, batch), jnp.argmax(logits, axis=-1).astype(jnp.int32))


def exact_matches(greedy: np.ndarray, arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(samples whose every trained token is the model's greedy choice, samples with a trained token) of a packed
    micro-batch's host arrays: a sample is a (row, segment id), and greedy decoding from its prompt produces exactly
    its trained tokens (its answer and end token) iff each is the greedy choice after the ones before it."""
    segment = arrays["segment_ids"]
    trained = arrays["loss_mask"] > 0

    def samples(where: np.ndarray) -> set[tuple[int, int]]:
        rows, columns = np.nonzero(where)
        return set(zip(rows.tolist(), segment[rows, columns].tolist(), strict=True))

    scored, missed = samples(trained), samples(trained & (greedy != arrays["targets"]))
    return len(scored - missed), len(scored)


def grad_step(params: Params, cfg: ModelConfig, state: TrainState, batch: TrainBatch, remat: bool = False):
    """Single-program micro-batch: forward, loss, backward, accumulate. Returns (state, loss sum, tokens)."""
    (total, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(state.lora, params, cfg, batch, remat)
    state = dataclasses.replace(state, accum=jax.tree.map(jnp.add, state.accum, grads),
                                accum_tokens=state.accum_tokens + count)
    return state, total, count


def apply_update(config: OptimizerConfig, state: TrainState):
    """The Optax step (`make_optimizer(config)`) on the mean gradient of the accumulated micro-batches. A
    non-finite gradient skips the update (weights and optimizer state unchanged). Returns (state, applied,
    grad norm); clears the accumulator."""
    optimizer = make_optimizer(config)
    grads = jax.tree.map(lambda g: g / jnp.maximum(state.accum_tokens, 1.0), state.accum)
    norm = optax.tree.norm(grads)
    finite = jnp.isfinite(norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.lora)
    lora = optax.apply_updates(state.lora, updates)

    def keep(new, old):
        return jnp.where(finite, new, old)

    state = TrainState(lora=jax.tree.map(keep, lora, state.lora),
                       opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                       accum=jax.tree.map(jnp.zeros_like, state.accum), accum_tokens=jnp.float32(0),
                       step=state.step + finite.astype(jnp.int32))
    return state, finite, norm


# Micro-steps ------------------------------------------------------------------------------------------------


def stash_index(layout: ArenaLayout, stash_pages: Array, slot: Array | int, ids: Array,
                tokens: int) -> tuple[Array, Array]:
    """(page, row) of each stash row that holds the hidden states of tokens `ids` (of a `tokens`-token
    micro-batch) at layer slot `slot`: slot-major, then token, then the token's `hidden_size / stash_row` rows."""
    per_token = layout.cfg.hidden_size // layout.stash_row
    per_page = layout.page_elements // layout.stash_row
    rows = ((slot * tokens + ids)[:, None] * per_token + jnp.arange(per_token)).reshape(-1)
    return stash_pages[rows // per_page], rows % per_page


def stash_hidden(layout: ArenaLayout, arena: Array, stash_pages: Array, slot: Array | int, ids: Array, tokens: int,
                 x: Array) -> Array:
    """Writes the hidden states `x [n, D]` of tokens `ids` at layer slot `slot` (`stash_index`); over a mesh
    each device keeps 1/tp of each one's elements in its part of the arena."""

    def write(arena, stash_pages, slot, ids, x):
        local = layout.local()
        pages, slots = stash_index(local, stash_pages, slot, ids, tokens)
        rows = local.stash_rows(arena).at[pages, slots].set(x.reshape(-1, local.stash_row).astype(arena.dtype))
        return rows.reshape(arena.shape)

    return layout.per_device(write, (ARENA_SPEC, P(), P(), P(), HIDDEN_SPEC), ARENA_SPEC)(
        arena, stash_pages, jnp.asarray(slot, jnp.int32), ids, x)


def read_hidden(layout: ArenaLayout, arena: Array, stash_pages: Array, slot: Array | int, ids: Array,
                tokens: int) -> Array:
    """The hidden states `[n, D]` that `stash_hidden` wrote for tokens `ids` at layer slot `slot`."""

    def read(arena, stash_pages, slot, ids):
        local = layout.local()
        pages, slots = stash_index(local, stash_pages, slot, ids, tokens)
        return local.stash_rows(arena)[pages, slots].reshape(ids.shape[0], local.cfg.hidden_size)

    return layout.per_device(read, (ARENA_SPEC, P(), P(), P()), HIDDEN_SPEC)(arena, stash_pages,
                                                                      jnp.asarray(slot, jnp.int32), ids)


def embed_step(params: Params, batch: TrainBatch) -> Array:
    return embed(params, batch.tokens)


def forward_chunk(layers: tuple[LayerParams, ...], layout: ArenaLayout, lora: Adapters, arena: Array, x: Array,
                  batch: TrainBatch, stash_pages: Array, start: Array) -> tuple[Array, Array]:
    """Layers `start .. start + len(layers) - 1` (their weights given, so one program serves every chunk of a
    size), stashing each layer's input in `arena`'s stash view; returns (arena, output)."""
    tokens = x.shape[0] * x.shape[1]
    ids = jnp.arange(tokens)
    mask, rope = causal_mask(batch.segment_ids), rope_tables(layout.cfg, batch.positions)
    with jax.named_scope("train_forward_chunk"):
        for i, lp in enumerate(layers):
            arena = stash_hidden(layout, arena, stash_pages, start + i, ids, tokens, x.reshape(tokens, -1))
            x = decoder_layer(lp, layout.cfg, x, rope, mask, layer_adapters(lora, start + i))
    return arena, x


def loss_step(params: Params, cfg: ModelConfig, x: Array, batch: TrainBatch) -> tuple[Array, Array, Array]:
    """Final norm, LM head and cross-entropy: (loss sum, tokens, d loss_sum / d x)."""
    def head_loss(x):
        return token_loss_sum(lm_logits(params, cfg, x), batch)

    with jax.named_scope("train_loss"):
        (total, count), g = jax.value_and_grad(head_loss, has_aux=True)(x)
    return total, count, g


def backward_chunk(layers: tuple[LayerParams, ...], layout: ArenaLayout, lora: Adapters, arena: Array, g: Array,
                   grads: Adapters, batch: TrainBatch, stash_pages: Array, end: Array) -> tuple[Array, Adapters]:
    """Layers `end - 1` down to `end - len(layers)` (their weights given, in layer order), each recomputed from
    its stash: returns (d loss / d input of the first layer, the micro-batch's LoRA gradients with these layers
    added)."""
    tokens = g.shape[0] * g.shape[1]
    ids = jnp.arange(tokens)
    mask, rope = causal_mask(batch.segment_ids), rope_tables(layout.cfg, batch.positions)
    with jax.named_scope("train_backward_chunk"):
        for i, lp in enumerate(reversed(layers)):
            layer = end - 1 - i
            x = read_hidden(layout, arena, stash_pages, layer, ids, tokens).reshape(g.shape)

            def layer_fn(x, adapters, lp=lp):
                return decoder_layer(lp, layout.cfg, x, rope, mask, adapters)

            _, vjp = jax.vjp(layer_fn, x, layer_adapters(lora, layer))
            g, g_lora = vjp(g)
            grads = jax.tree.map(lambda acc, d, layer=layer: jax.lax.dynamic_update_index_in_dim(
                acc, jax.lax.dynamic_index_in_dim(acc, layer, keepdims=False) + d, layer, 0), grads, g_lora)
    return g, grads


def commit(state: TrainState, grads: Adapters, count: Array) -> tuple[TrainState, Adapters]:
    """Adds a finished micro-batch's gradients to the accumulator; returns zeroed buffers for the next one."""
    state = dataclasses.replace(state, accum=jax.tree.map(jnp.add, state.accum, grads),
                                accum_tokens=state.accum_tokens + count)
    return state, jax.tree.map(jnp.zeros_like, grads)
