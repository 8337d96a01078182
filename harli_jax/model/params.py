"""Weight pytrees with stacked layers (`[num_layers, ...]`), their shapes, and random initialization."""

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
    """One decoder layer's weights; in `Params.layers` every leaf has a leading `num_layers` axis."""

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
class Params:
    embed: Array
    layers: LayerParams | tuple[LayerParams, ...]  # stacked `[num_layers, ...]`, or one per layer (`per_layer`)
    final_norm: Array
    lm_head: Array | None = None  # None when the embedding is tied

    def num_parameters(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self))

    def per_layer(self) -> Params:
        """The same weights with one LayerParams per layer (a copy of each layer, taken out of the stack)."""
        if not isinstance(self.layers, LayerParams):
            return self
        count = jax.tree.leaves(self.layers)[0].shape[0]
        layers = tuple(jax.tree.map(lambda a, i=i: a[i], self.layers) for i in range(count))
        return dataclasses.replace(self, layers=layers)


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes (without the stacked layer axis) of the tensors this config has."""
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

    layers = LayerParams(**{k: spec(cfg.num_layers, *s) for k, s in layer_shapes(cfg).items()})
    return Params(
        embed=spec(cfg.vocab_size, cfg.hidden_size),
        layers=layers,
        final_norm=spec(cfg.hidden_size),
        lm_head=None if cfg.tie_word_embeddings else spec(cfg.hidden_size, cfg.vocab_size),
    )


def init_params(cfg: ModelConfig, seed: int = 0, *, init_std: float = 0.02) -> Params:
    """Random weights as HF initializes them: normal(0, init_std) matrices, unit norms, zero biases."""
    shapes = param_shapes(cfg)

    @jax.jit
    def init(key):
        leaves, treedef = jax.tree.flatten_with_path(shapes)
        keys = jax.random.split(key, len(leaves))
        out = []
        for (path, s), k in zip(leaves, keys, strict=True):
            name = jax.tree_util.keystr(path[-1:], simple=True)
            if name.endswith("norm"):
                out.append(jnp.ones(s.shape, s.dtype))
            elif name.endswith("bias"):
                out.append(jnp.zeros(s.shape, s.dtype))
            else:
                out.append((init_std * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype))
        return jax.tree.unflatten(treedef, out)

    return init(jax.random.key(seed))
