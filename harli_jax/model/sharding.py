"""Tensor parallelism over a `jax.sharding` mesh with one `tp` axis, Megatron-style: q/k/v/gate/up split by their
output columns, o/down by their input rows, the embedding and the LM head by vocabulary, the arena by KV heads, and
each LoRA pair split as its base projection (column-parallel: B by columns; row-parallel: A by rows). XLA's SPMD
partitioner inserts the collectives; the attention kernels run per device on their heads under `shard_map`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from harli_jax.errors import ConfigError
from harli_jax.model.config import ModelConfig
from harli_jax.model.params import Adapters, LayerParams, LoRAPair, LoRASlots, Params, SlotLoRA, param_shapes

TP = "tp"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# The arena `[pages, layers, 2, kv_heads, page_tokens, head_dim]` by KV heads.
ARENA_SPEC = P(None, None, None, TP, None, None)
# Attention's q `[tokens, heads, head_dim]` (and new k/v) by heads.
HEADS_SPEC = P(None, TP, None)
# Hidden states `[tokens, hidden]` by their elements (how the trainer's stash keeps them).
HIDDEN_SPEC = P(None, TP)

log = logging.getLogger("harli_jax")


def check_tensor_parallel(cfg: ModelConfig, tp: int, num_devices: int) -> None:
    """A ConfigError naming every size that `tp` does not divide."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tensor_parallel must be a positive integer, got {tp!r}")
    sizes = {"the device count": num_devices, "the KV heads": cfg.num_kv_heads, "the attention heads": cfg.num_heads,
             "the intermediate size": cfg.intermediate_size, "the hidden size": cfg.hidden_size}
    bad = [f"{name} ({size})" for name, size in sizes.items() if size % tp]
    if bad:
        raise ConfigError(f"tensor_parallel={tp} does not divide {', '.join(bad)} of {cfg.name}; "
                          f"choose a degree that divides each")


def tp_mesh(cfg: ModelConfig, tp: int) -> Mesh | None:
    """The mesh of the first `tp` devices, its one axis `tp`; None for one device (the programs then carry no
    sharding at all). Across processes (`jax.distributed`) the mesh spans every process's devices."""
    devices = jax.devices()
    check_tensor_parallel(cfg, tp, len(devices))
    if jax.process_count() > 1 and tp != len(devices):
        raise ConfigError(f"a multi-process engine spans the devices of all {jax.process_count()} processes: "
                          f"tensor_parallel must be {len(devices)}, got {tp}")
    if tp == 1:
        return None
    if cfg.vocab_size % tp:
        log.warning("tensor_parallel=%d does not divide the vocabulary (%d) of %s: the embedding and the LM head "
                    "stay whole on every device", tp, cfg.vocab_size, cfg.name)
    return jax.make_mesh((tp,), (TP,), axis_types=(AxisType.Auto,), devices=devices[:tp])


def mesh_of(tree) -> Mesh | None:
    """The tensor-parallel mesh that a placed tree's first array lies on (None: a single device)."""
    sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def _vocab_split(cfg: ModelConfig, tp: int) -> str | None:
    return TP if cfg.vocab_size % tp == 0 else None


def param_specs(cfg: ModelConfig, params: Params, tp: int) -> Params:
    """The `PartitionSpec` of every weight (the embedding and LM head stay whole when `tp` does not divide the
    vocabulary)."""
    column, row = P(None, TP), P(TP, None)
    specs = {**dict.fromkeys(COLUMN_PARALLEL, column), **dict.fromkeys(ROW_PARALLEL, row),
             "q_bias": P(TP), "k_bias": P(TP), "v_bias": P(TP), "o_bias": P(), "attn_norm": P(), "mlp_norm": P()}

    def layer(lp: LayerParams) -> LayerParams:
        return LayerParams(**{name: None if getattr(lp, name) is None else specs[name]
                              for name in LayerParams.__dataclass_fields__})

    vocab = _vocab_split(cfg, tp)
    return Params(embed=P(vocab, None), layers=tuple(layer(lp) for lp in params.layers), final_norm=P(),
                  lm_head=None if params.lm_head is None else P(None, vocab))


def place(x, sharding: NamedSharding) -> jax.Array:
    """`x` (every process passes the same value) laid out as `sharding`; across processes each one puts only its
    own devices' parts. An array laid out so already is `x` itself."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _put(tree, specs, mesh: Mesh):
    return jax.tree.map(lambda x, spec: place(x, NamedSharding(mesh, spec)), tree, specs,
                        is_leaf=lambda s: isinstance(s, P))


def param_shardings(cfg: ModelConfig, mesh: Mesh | None) -> Params | None:
    """Where each weight of `cfg` lies on the mesh (a `Params` tree of shardings; None without a mesh): what the
    loaders place each tensor by as they read it, so no device ever holds a whole model it should split."""
    if mesh is None:
        return None
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(cfg, param_shapes(cfg), mesh.shape[TP]),
                        is_leaf=lambda s: isinstance(s, P))


def shard_params(cfg: ModelConfig, params: Params, mesh: Mesh | None) -> Params:
    """The weights placed on the mesh; without one, on one device (gathered if they were loaded onto a mesh)."""
    if mesh is None:
        return params if mesh_of(params) is None else jax.device_put(params, jax.devices()[0])
    return _put(params, param_specs(cfg, params, mesh.shape[TP]), mesh)


def _pair_specs(target: str, lead: int) -> tuple[P, P]:
    """(A, B) specs of a projection's LoRA with `lead` leading axes (layers, slots)."""
    none = (None,) * lead
    if target in ROW_PARALLEL:
        return P(*none, TP, None), P()
    return P(), P(*none, None, TP)


def shard_adapters(adapters: Adapters, mesh: Mesh | None) -> Adapters:
    """A stacked `[layers, ...]` LoRA tree split as its base projections (unchanged without a mesh)."""
    if mesh is None:
        return adapters
    out = {}
    for target, pair in adapters.items():
        a, b = _pair_specs(target, pair.a.ndim - 2)
        out[target] = LoRAPair(place(pair.a, NamedSharding(mesh, a)), place(pair.b, NamedSharding(mesh, b)),
                               pair.scale)
    return out


def shard_slots(slots: LoRASlots | None, mesh: Mesh | None) -> LoRASlots | None:
    """The resident adapter slots `[layers, slots, ...]` split as their base projections."""
    if slots is None or mesh is None:
        return slots
    out = {}
    for target, slot in slots.items():
        a, b = _pair_specs(target, slot.a.ndim - 2)
        out[target] = SlotLoRA(place(slot.a, NamedSharding(mesh, a)), place(slot.b, NamedSharding(mesh, b)))
    return out


def on_mesh(tree, mesh: Mesh | None):
    """`tree` with every array that is not on the mesh yet placed whole on each of its devices (so that a program
    takes them together with split ones, and a checkpoint restores them there)."""
    if mesh is None:
        return tree
    whole = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: x if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else place(x, whole), tree)


def whole(tree, mesh: Mesh | None):
    """Inside a program: `tree`'s arrays whole on every device of the mesh (outputs that the host reads)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P())), tree)


def sharded_zeros(shape: tuple[int, ...], dtype, mesh: Mesh | None, spec: P) -> jax.Array:
    """Zeros made in place on each device (never a whole copy on one device first)."""
    if mesh is None:
        return jnp.zeros(shape, dtype)
    return _zeros(shape, jnp.dtype(dtype), NamedSharding(mesh, spec))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape, dtype, sharding):
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


def per_device(fn: Callable, mesh: Mesh | None, in_specs: tuple, out_specs) -> Callable:
    """`fn` run on each device over its own parts of the arrays (`shard_map`: its heads, its part of a hidden
    state), or `fn` itself without a mesh."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def shape_of(x: jax.Array) -> jax.ShapeDtypeStruct:
    """`x`'s shape and dtype, and its mesh sharding if it lies on one (an array on one device stays unplaced:
    a program compiled for it takes uncommitted arrays, as jit would)."""
    sharding = x.sharding if isinstance(x.sharding, NamedSharding) else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def device_bytes(x: jax.Array) -> int:
    """Bytes of `x` on its first device."""
    return x.addressable_shards[0].data.nbytes
