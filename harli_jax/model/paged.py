"""The inference step over the paged arena: decode tokens and prefill chunks as one flat batch of tokens.

Tokens come grouped by sequence (`query_start`, as vLLM's `query_start_loc`); each carries its position and the
page slot its K/V goes to. Each layer first writes the step's new K/V into the arena, then attends every token
to its sequence's pages up to its own position, so a prefill chunk sees its prefix and itself causally, and a
decode token sees its whole context. A decode-only step (one token per sequence) runs the decode attention; a
step with prefill chunks runs the ragged attention, which reads each sequence's pages once per layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from harli_jax.kernels import paged_attention, ragged_paged_attention, write_kv
from harli_jax.model.config import ModelConfig
from harli_jax.model.layers import Rope, attention_out, attention_qkv, mlp_block, rope_tables
from harli_jax.model.params import Adapters, LayerParams, LoRASlots, Params, slot_deltas, slot_onehot
from harli_jax.model.sampling import SamplingRows, logprobs_of, sample
from harli_jax.model.sharding import ARENA_SPEC, HEADS_SPEC, TP, per_device, sharded_zeros
from harli_jax.model.transformer import embed, lm_logits

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """One step's tokens `[T]` over sequences `[B]`, sequence b's at `query_start[b] .. query_start[b + 1] - 1`;
    padding tokens (past `query_start[B]`) have page id 0 (the null page), padding sequences no tokens and
    context 0. `max_query` and `long_rows` are static: the most tokens a sequence has, and the rows that may have
    more than one (the first `long_rows`; None: any)."""

    tokens: Array  # int32[T]
    positions: Array  # int32[T]
    page_ids: Array  # int32[T]: page its K/V is written to
    offsets: Array  # int32[T]: token slot in that page
    block_tables: Array  # int32[B, P]
    query_start: Array  # int32[B + 1]
    context_lens: Array  # int32[B]: the sequence's tokens in the cache after this step
    sample_index: Array  # int32[B]: the token whose output gives the sequence's next token
    sampling: SamplingRows  # [B]
    adapter_slots: Array | None = None  # int32[T]: the resident adapter slot of each token (-1: the base model)
    max_query: int = dataclasses.field(default=1, metadata={"static": True})
    long_rows: int | None = dataclasses.field(default=None, metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class ArenaLayout:
    """The one definition of the arena's bytes. The KV view is `[pages, layers, 2 (K, V), kv_heads, page_tokens,
    head_dim]`: one page id covers every layer. The stash view is the same pages as rows of `stash_row`
    elements, a size that divides both a page and a hidden state, so a page holds whole rows and a hidden state
    is whole rows."""

    cfg: ModelConfig
    page_tokens: int
    mesh: Mesh | None = None  # the tensor-parallel mesh the arena is split over, by KV heads

    @property
    def tp(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape[TP]

    def local(self) -> ArenaLayout:
        """The layout of one device's part of the arena, in which that device stashes its part of the training
        state: its KV heads, and 1/tp of the elements of every hidden state (the same pages hold the same
        tokens as on one device)."""
        if self.mesh is None:
            return self
        cfg, tp = self.cfg, self.tp
        return ArenaLayout(cfg.replace(num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp,
                                       hidden_size=cfg.hidden_size // tp), self.page_tokens)

    def per_device(self, fn, in_specs: tuple, out_specs):
        """`fn` over each device's part of the arena (see `local`), or `fn` itself on one device."""
        return per_device(fn, self.mesh, in_specs, out_specs)

    @property
    def page_shape(self) -> tuple[int, ...]:
        cfg = self.cfg
        return (cfg.num_layers, 2, cfg.num_kv_heads, self.page_tokens, cfg.head_dim)

    def shape(self, num_pages: int) -> tuple[int, ...]:
        return (num_pages, *self.page_shape)

    @property
    def page_elements(self) -> int:
        return math.prod(self.page_shape)

    @property
    def page_bytes(self) -> int:
        return self.page_elements * jnp.dtype(self.cfg.dtype).itemsize

    def zeros(self, num_pages: int) -> Array:
        """A zero-filled arena (never `jnp.empty`), split by KV heads over the tensor-parallel mesh."""
        return sharded_zeros(self.shape(num_pages), self.cfg.dtype, self.mesh, ARENA_SPEC)

    @property
    def stash_row(self) -> int:
        return math.gcd(self.cfg.hidden_size, self.page_elements)

    def stash_pages(self, tokens: int) -> int:
        """Pages that hold the input of every layer for a micro-batch of `tokens` tokens."""
        return -(-self.cfg.num_layers * tokens * self.cfg.hidden_size // self.page_elements)

    def stash_rows(self, arena: Array) -> Array:
        """The stash view of `arena`: `[pages, rows per page, stash_row]`."""
        return arena.reshape(arena.shape[0], -1, self.stash_row)


def paged_attend(q: Array, k: Array, v: Array, arena: Array, index: int, batch: TokenBatch,
                 attention_impl: str = "auto", mesh: Mesh | None = None) -> tuple[Array, Array]:
    """Writes the batch's new K/V into layer `index`'s page slots and attends each token to its sequence's pages:
    the decode attention when every sequence has one token, else the ragged one; returns (attention, arena).
    Over a tensor-parallel `mesh` each device does this for its own KV heads and their query heads."""

    def attend(q, k, v, arena, batch):
        arena = write_kv(arena, index, k, v, batch.page_ids, batch.offsets)
        if batch.max_query == 1:  # one token per sequence: token b is sequence b's
            return paged_attention(q, arena, index, batch.block_tables, batch.context_lens,
                                   impl=attention_impl), arena
        return ragged_paged_attention(q, arena, index, batch.block_tables, batch.query_start, batch.context_lens,
                                      max_query=batch.max_query, long_rows=batch.long_rows,
                                      impl=attention_impl), arena

    return per_device(attend, mesh, (HEADS_SPEC, HEADS_SPEC, HEADS_SPEC, ARENA_SPEC, P()),
                    (HEADS_SPEC, ARENA_SPEC))(q, k, v, arena, batch)


def paged_layer(lp: LayerParams, cfg: ModelConfig, x: Array, arena: Array, index, batch: TokenBatch, rope: Rope, *,
                attention_impl: str = "auto", adapters: Adapters | None = None,
                mesh: Mesh | None = None) -> tuple[Array, Array]:
    """Decoder layer `index` (a Python int; traced only without a mesh) over the arena: writes the batch's K/V
    into the layer's page slots, attends each token to its sequence's pages, MLP; returns (x, arena)."""
    with jax.named_scope("layer"):
        with jax.named_scope("attention"):
            q, k, v = attention_qkv(lp, cfg, x, rope, adapters)
            attn, arena = paged_attend(q, k, v, arena, index, batch, attention_impl, mesh)
            x = attention_out(lp, cfg, x, attn, adapters)
        return mlp_block(lp, cfg, x, adapters), arena


def paged_step(params: Params, cfg: ModelConfig, arena: Array, batch: TokenBatch, *,
               attention_impl: str = "auto", lora: LoRASlots | None = None, logprobs: int | None = None,
               mesh: Mesh | None = None):
    """Runs the batch through the model, each token with the LoRA delta of its adapter slot
    (`batch.adapter_slots` into `lora`) if given, writing its K/V into `arena`; returns (arena, next token `[B]`),
    and with `logprobs` (static) also each next token's `Logprobs` with the `logprobs` most likely tokens. The
    layers are unrolled over their own weight arrays: nothing is sliced. `mesh`: the tensor-parallel mesh the
    weights and arena lie on (static)."""
    if lora is not None and batch.adapter_slots is None:
        raise ValueError("a step with resident adapters needs the batch's adapter_slots")
    x, rope = embed(params, batch.tokens), rope_tables(cfg, batch.positions)
    onehot = slot_onehot(lora, batch.adapter_slots)
    for index, lp in enumerate(params.layers):
        x, arena = paged_layer(lp, cfg, x, arena, index, batch, rope, attention_impl=attention_impl,
                               adapters=slot_deltas(lora, index, onehot), mesh=mesh)
    logits = lm_logits(params, cfg, x[batch.sample_index])
    with jax.named_scope("sample"):
        tokens = sample(logits, batch.sampling)
        if logprobs is None:
            return arena, tokens
        return arena, tokens, logprobs_of(logits, tokens, logprobs)


def read_pages(arena: Array, page_ids: Array) -> Array:
    """The K/V of `page_ids` across all layers: `[n, layers, 2, kv_heads, page_tokens, head_dim]`."""
    return arena[page_ids]


def write_pages(arena: Array, page_ids: Array, pages: Array) -> Array:
    """Writes whole pages (the inverse of `read_pages`); page id 0 entries are dropped."""
    num_pages = arena.shape[0]
    return arena.at[jnp.where(page_ids == 0, num_pages, page_ids)].set(pages.astype(arena.dtype), mode="drop")
