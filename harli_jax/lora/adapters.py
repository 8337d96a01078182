"""LoRA adapters: configuration, initialization (PEFT's), HF PEFT export/import, and the resident slots a
multi-adapter serving step picks from."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from harli_jax.errors import CheckpointError, ConfigError
from harli_jax.model.config import ModelConfig
from harli_jax.model.params import PROJECTIONS, Adapters, LoRAPair, LoRASlots, SlotLoRA, layer_shapes
from harli_jax.options import option

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_HF_MODULE = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on `targets`: `W x + (alpha / rank) * B A x`, B = 0 at init."""

    rank: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha (the delta is scaled by alpha / rank)")
    dropout: float = option(0.0, "LoRA dropout (only 0 is supported)")
    targets: tuple[str, ...] = option(("q_proj", "k_proj", "v_proj", "o_proj"), "projections that get adapters")

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRAConfig.rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ConfigError(f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        if self.dropout != 0:
            raise ConfigError(f"LoRAConfig.dropout={self.dropout}: LoRA dropout is not supported yet; use 0")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            raise ConfigError(f"LoRAConfig.targets must be a non-empty subset of {PROJECTIONS}, got {self.targets}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def init_lora(cfg: ModelConfig, lora: LoRAConfig, seed: int = 0, dtype=jnp.float32) -> Adapters:
    """PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0; stacked over
    layers. Adapters train in float32 whatever the base dtype."""
    shapes = layer_shapes(cfg)
    keys = jax.random.split(jax.random.key(seed), len(lora.targets))
    out = {}
    for key, target in zip(keys, lora.targets, strict=True):
        d_in, d_out = shapes[target]
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, (cfg.num_layers, d_in, lora.rank), jnp.float32, -bound, bound).astype(dtype)
        out[target] = LoRAPair(a=a, b=jnp.zeros((cfg.num_layers, lora.rank, d_out), dtype), scale=lora.scale)
    return out


def export_peft(adapters: Adapters, lora: LoRAConfig, cfg: ModelConfig, path: str | Path,
                base_model: str | None = None) -> Path:
    """Writes `adapter_model.safetensors` and `adapter_config.json` that `peft.PeftModel.from_pretrained` loads."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the adapter directory {path}: {e}") from None
    tensors = {}
    for target, pair in adapters.items():
        a, b = np.asarray(pair.a, np.float32), np.asarray(pair.b, np.float32)
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[target]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [rank, in]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [out, rank]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "base_model_name_or_path": base_model,
    }
    safetensors.numpy.save_file(tensors, str(path / PEFT_WEIGHTS), metadata={"format": "pt"})
    (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def load_peft(path: str | Path, cfg: ModelConfig) -> tuple[LoRAConfig, Adapters]:
    """Reads an HF PEFT LoRA adapter directory (the inverse of `export_peft`); a CheckpointError naming the file
    for one that cannot be read or does not fit `cfg`."""
    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read the PEFT adapter config {config_file}: {e}") from None
    try:
        tensors = safetensors.numpy.load_file(str(weights_file))
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"cannot read the PEFT adapter weights {weights_file}: {e}") from None
    lora = _peft_config(config, config_file)
    shapes = layer_shapes(cfg)
    out = {}
    for target in lora.targets:
        d_in, d_out = shapes[target]

        def stacked(kind, want, target=target):
            names = [f"base_model.model.model.layers.{i}.{_HF_MODULE[target]}.lora_{kind}.weight"
                     for i in range(cfg.num_layers)]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise CheckpointError(f"{weights_file} lacks {missing[:3]}")
            wrong = [f"{n} {tensors[n].shape}" for n in names if tensors[n].shape != want]
            if wrong:
                raise CheckpointError(f"{weights_file}: {wrong[0]} is not of shape {want} (rank {lora.rank} in "
                                      f"{config_file}, model {cfg.name})")
            return jnp.asarray(np.stack([tensors[n].T for n in names]).astype(np.float32))

        out[target] = LoRAPair(a=stacked("A", (lora.rank, d_in)), b=stacked("B", (d_out, lora.rank)),
                               scale=lora.scale)
    bad = [t for t, pair in out.items() if not (np.isfinite(pair.a).all() and np.isfinite(pair.b).all())]
    if bad:
        raise CheckpointError(f"{weights_file} holds non-finite weights (on {', '.join(bad)})")
    return lora, out


def _peft_config(config, config_file: Path) -> LoRAConfig:
    """The LoRAConfig of a PEFT `adapter_config.json`; a CheckpointError naming the file when it is not one."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a PEFT adapter config (a JSON object)")
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise CheckpointError(f"{config_file}: only plain LoRA adapters are supported")
    targets = config.get("target_modules")
    targets = [t for t in PROJECTIONS if t in targets] if isinstance(targets, list) else []
    try:
        return LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=tuple(targets))
    except KeyError as e:
        raise CheckpointError(f"{config_file} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def empty_slots(cfg: ModelConfig, num_slots: int, rank: int, targets: tuple[str, ...] = PROJECTIONS,
                dtype=None) -> LoRASlots:
    """`num_slots` resident adapter slots of rank `rank` on `targets`, all zero (each serves as the base model)."""
    dtype = dtype or cfg.dtype
    shapes = layer_shapes(cfg)
    return {t: SlotLoRA(a=jnp.zeros((cfg.num_layers, num_slots, shapes[t][0], rank), dtype),
                        b=jnp.zeros((cfg.num_layers, num_slots, rank, shapes[t][1]), dtype)) for t in targets}


def slot_weights(adapters: Adapters, slots: LoRASlots) -> LoRASlots:
    """`adapters` as one slot's weights of `slots` (no slot axis): each scale folded into b, zero-padded to the
    slots' rank, zeros on the targets it does not adapt. A ConfigError when it does not fit."""
    some = next(iter(slots.values()))
    num_layers, _, _, rank = some.a.shape
    outside = sorted(set(adapters) - set(slots))
    if outside:
        raise ConfigError(f"the adapter adapts {outside}, which the resident slots do not hold "
                          f"(they hold {sorted(slots)})")
    out = {}
    for target, slot in slots.items():
        a = np.zeros((num_layers, *slot.a.shape[2:]), np.float32)
        b = np.zeros((num_layers, *slot.b.shape[2:]), np.float32)
        pair = adapters.get(target)
        if pair is not None:
            r = pair.a.shape[-1]
            if r > rank:
                raise ConfigError(f"the adapter's rank {r} exceeds the resident slots' rank {rank} "
                                  f"(raise max_lora_rank)")
            a[..., :r] = np.asarray(pair.a, np.float32)
            b[:, :r] = np.asarray(pair.b, np.float32) * pair.scale
        out[target] = SlotLoRA(a=a, b=b)
    return out


@functools.partial(jax.jit, donate_argnames=("slots",))
def write_slot(slots: LoRASlots, slot, weights: LoRASlots) -> LoRASlots:
    """`slots` with slot `slot` (traced: one program for every slot) holding `weights` (from `slot_weights`)."""
    return {t: SlotLoRA(a=s.a.at[:, slot].set(weights[t].a.astype(s.a.dtype)),
                        b=s.b.at[:, slot].set(weights[t].b.astype(s.b.dtype))) for t, s in slots.items()}
