"""Weight pytrees (one `LayerParams` per layer, as HF stores them), their shapes, and random initialization.

Base weights are never stacked: a program that takes a stack and slices a layer out of it copies that layer's
weights on every step (issue 12: 20-61% of the decode step on XLA:CPU). LoRA adapters, small, stay stacked
`[num_layers, ...]`, so the optimizer and checkpoints see one array per projection."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from harli_jax.model.config import ModelConfig

Array = jax.Array

# Projections are stored `[in, out]` (transposed from HF's `[out, in]`) so a layer computes `x @ w`.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BIASES = ("q_bias", "k_bias", "v_bias", "o_bias")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """One decoder layer's weights."""

    attn_norm: Array
    q_proj: Array
    k_proj: Array
    v_proj: Array
    o_proj: Array
    mlp_norm: Array
    gate_proj: Array
    up_proj: Array
    down_proj: Array
    q_bias: Array | None = None
    k_bias: Array | None = None
    v_bias: Array | None = None
    o_bias: Array | None = None


@functools.partial(jax.tree_util.register_dataclass, data_fields=["a", "b"], meta_fields=["scale"])
@dataclasses.dataclass(frozen=True)
class LoRAPair:
    """A low-rank delta of one projection: `x @ w + scale * (x @ a) @ b`; a `[in, rank]`, b `[rank, out]`
    (with a leading layer axis when stacked)."""

    a: Array
    b: Array
    scale: float


# Adapters of one layer (or stacked over layers), by projection name (an entry of PROJECTIONS).
Adapters = dict[str, LoRAPair]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLoRA:
    """A LoRA delta applied only to some of a batch's tokens: where `rows` (`[T, 1]`) is 1."""

    pair: LoRAPair
    rows: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotLoRA:
    """The resident adapters of one projection, one per slot (Punica / S-LoRA's multi-LoRA batch): a
    `[slots, in, rank]`, b `[slots, rank, out]` with each adapter's scale folded into its b, zero-padded to the
    slots' rank (with a leading layer axis when stacked). A slot's adapter can be replaced without a new shape."""

    a: Array
    b: Array


# The resident adapters by projection name, stacked over layers: what a serving step's tokens pick from.
LoRASlots = dict[str, SlotLoRA]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotDelta:
    """The per-token LoRA delta of a multi-adapter batch: token t adds the delta of the slot where `onehot[t]` is
    1 (a row of zeros: the base model)."""

    slots: SlotLoRA
    onehot: Array  # [T, slots]


def slot_onehot(slots: LoRASlots | None, token_slots: Array | None) -> Array | None:
    """`[T, slots]`: token t's row is 1 at its slot `token_slots[t]` (all 0 for -1, the base model); computed
    once per program and shared by every layer."""
    if slots is None:
        return None
    num_slots = next(iter(slots.values())).a.shape[1]
    return jax.nn.one_hot(token_slots, num_slots, dtype=jnp.float32)


def slot_deltas(slots: LoRASlots | None, index, onehot: Array | None) -> dict[str, SlotDelta] | None:
    """Layer `index`'s per-token deltas, each token's slot picked by its row of `onehot` (`slot_onehot`)."""
    if slots is None:
        return None
    return {name: SlotDelta(pair, onehot) for name, pair in layer_adapters(slots, index).items()}


def mix_adapters(groups) -> dict[str, tuple[TokenLoRA | SlotDelta, ...]]:
    """One layer's adapters for a batch whose token groups use different adapters: `groups` holds (adapters or
    None, `[T, 1]` row mask) pairs, or (per-token `slot_deltas`, None); each projection gets the deltas of the
    groups that adapt it."""
    mixed: dict[str, tuple[TokenLoRA | SlotDelta, ...]] = {}
    for adapters, rows in groups:
        for name, pair in (adapters or {}).items():
            mixed[name] = (*mixed.get(name, ()), pair if rows is None else TokenLoRA(pair, rows))
    return mixed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    embed: Array
    layers: tuple[LayerParams, ...]
    final_norm: Array
    lm_head: Array | None = None  # None when the embedding is tied

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self))


def layer_adapters(lora: Adapters | None, index) -> Adapters | None:
    """Layer `index`'s adapters out of the stacked tree (a static or traced index); None stays None."""
    if lora is None:
        return None
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), lora)


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one layer's tensors for this config."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "attn_norm": (d,),
        "q_proj": (d, cfg.q_size),
        "k_proj": (d, cfg.kv_size),
        "v_proj": (d, cfg.kv_size),
        "o_proj": (cfg.q_size, d),
        "mlp_norm": (d,),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    if cfg.qkv_bias:
        shapes.update(q_bias=(cfg.q_size,), k_bias=(cfg.kv_size,), v_bias=(cfg.kv_size,))
    if cfg.o_bias:
        shapes["o_bias"] = (d,)
    return shapes


def param_shapes(cfg: ModelConfig) -> Params:
    """The `Params` tree of `jax.ShapeDtypeStruct`s for a config (no memory allocated)."""
    dtype = jnp.dtype(cfg.dtype)

    def spec(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype)

    shapes = layer_shapes(cfg)
    return Params(
        embed=spec(cfg.vocab_size, cfg.hidden_size),
        layers=tuple(LayerParams(**{k: spec(*s) for k, s in shapes.items()}) for _ in range(cfg.num_layers)),
        final_norm=spec(cfg.hidden_size),
        lm_head=None if cfg.tie_word_embeddings else spec(cfg.hidden_size, cfg.vocab_size),
    )


def init_params(cfg: ModelConfig, seed: int = 0, *, init_std: float = 0.02, shardings: Params | None = None) -> Params:
    """Random weights as HF initializes them: normal(0, init_std) matrices, unit norms, zero biases. One array at
    a time (one small program per distinct shape, not one over every weight, which at 8B shapes is slow to
    compile). With `shardings` (a tree of them, `sharding.param_shardings`) each device makes only its part; the
    values do not depend on it."""
    leaves, treedef = jax.tree.flatten_with_path(param_shapes(cfg))
    places = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    key = jax.random.key(seed)
    out = []
    for i, ((path, spec), place) in enumerate(zip(leaves, places, strict=True)):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        if name.endswith("norm"):
            out.append(jnp.ones(spec.shape, spec.dtype, device=place))
        elif name.endswith("bias"):
            out.append(jnp.zeros(spec.shape, spec.dtype, device=place))
        else:
            out.append(_normal(jax.random.fold_in(key, i), spec.shape, spec.dtype, init_std, place))
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _normal(key, shape, dtype, std, sharding):
    values = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return values if sharding is None else jax.lax.with_sharding_constraint(values, sharding)
