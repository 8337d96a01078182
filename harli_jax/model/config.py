"""Static model configuration of the Llama family (Llama 2/3, Qwen2), read from HF config.json or YAML."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml

from harli_jax.errors import ConfigError

Architecture = Literal["llama", "qwen2"]
DTYPES = ("float32", "bfloat16", "float16")
HF_ARCHITECTURES: dict[str, Architecture] = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_CLASS_NAMES = {arch: name for name, arch in HF_ARCHITECTURES.items()}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (positions divided by factor) or Llama 3's smoothed `llama3`."""

    rope_type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ConfigError(f"unsupported rope_type {self.rope_type!r}; supported: default, linear, llama3")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                              f"{self.high_freq_factor} <= {self.low_freq_factor}")

    def to_hf(self) -> dict[str, Any]:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {"rope_type": "llama3", **{k: v for k, v in dataclasses.asdict(self).items() if k != "rope_type"}}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hashable, so it is passed to jitted functions as a static argument."""

    architecture: Architecture
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self):
        if self.architecture not in HF_CLASS_NAMES:
            raise ConfigError(f"unsupported architecture {self.architecture!r}; supported: {sorted(HF_CLASS_NAMES)}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("rms_norm_eps and rope_theta must be > 0")
        for token in (self.bos_token_id, *self.eos_token_ids):
            if token is not None and not 0 <= token < self.vocab_size:
                raise ConfigError(f"special token id {token} is outside the vocabulary (size {self.vocab_size})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def hf_class_name(self) -> str:
        return HF_CLASS_NAMES[self.architecture]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Builds a config from harli_jax's own field names (the YAML files in configs/models/)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model config field(s) {unknown}; known: {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"{source}: missing model config field(s) {missing}")
        values = dict(data)
        if isinstance(values.get("rope_scaling"), dict):
            values["rope_scaling"] = _rope_scaling_from_dict(values["rope_scaling"], source)
        values["eos_token_ids"] = _as_id_tuple(values.get("eos_token_ids", ()), source)
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        data = dict(data or {})
        data.setdefault("name", path.stem)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_hf(cls, config: str | Path | dict[str, Any]) -> ModelConfig:
        """Reads an HF config.json (a path to it, to its directory, or its parsed dict), v4 or v5 spelling."""
        source = "config.json"
        if not isinstance(config, dict):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"missing config.json: {path} does not exist")
            source = str(path)
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: invalid JSON: {e}") from None
        return _from_hf_dict(config, source)

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers (v5 spelling) builds this model from."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling.to_hf())
        out: dict[str, Any] = {
            "architectures": [self.hf_class_name],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _id_or_list(self.eos_token_ids),
        }
        if self.architecture == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = False
        else:
            out["use_sliding_window"] = False
        return out


def _from_hf_dict(c: dict[str, Any], source: str) -> ModelConfig:
    architectures = c.get("architectures") or []
    supported = [a for a in architectures if a in HF_ARCHITECTURES]
    if architectures and not supported:
        raise ConfigError(f"{source}: unsupported architectures {architectures}; "
                          f"supported: {sorted(HF_ARCHITECTURES)}")
    if supported:
        arch = HF_ARCHITECTURES[supported[0]]
    elif c.get("model_type") in HF_CLASS_NAMES:
        arch = c["model_type"]
    else:
        raise ConfigError(f"{source}: cannot tell the architecture (architectures={architectures}, "
                          f"model_type={c.get('model_type')!r}); supported: {sorted(HF_ARCHITECTURES)}")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: unsupported activation hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    if c.get("mlp_bias"):
        raise ConfigError(f"{source}: mlp_bias=true is not supported")
    if c.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError(f"{source}: pretraining_tp={c['pretraining_tp']} is not supported")
    if arch == "qwen2" and c.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true (sliding-window attention) is not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in c:
            raise ConfigError(f"{source}: missing required field {key!r}")

    rope_theta, rope_scaling = _hf_rope(c, source)
    num_heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // num_heads
    attention_bias = bool(c.get("attention_bias", False))
    dtype = c.get("dtype") or c.get("torch_dtype") or "float32"
    eos = c.get("eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=True if arch == "qwen2" else attention_bias,
        o_bias=False if arch == "qwen2" else attention_bias,
        dtype=str(dtype).removeprefix("torch."),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_as_id_tuple(eos if eos is not None else (), source),
        name=c.get("_name_or_path") or arch,
    )


def _hf_rope(c: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """RoPE settings from v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = c.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or ("rope_theta" not in params and "rope_type" not in params):
            raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported: {params}")
        theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = c.get("rope_theta", 10000.0)
        scaling = c.get("rope_scaling")
    if not scaling:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    return float(theta), _rope_scaling_from_dict({**scaling, "rope_type": rope_type}, source)


def _rope_scaling_from_dict(d: dict[str, Any], source: str) -> RopeScaling:
    rope_type = d.get("rope_type", d.get("type"))
    if rope_type not in ("linear", "llama3"):
        raise ConfigError(f"{source}: unsupported rope_type {rope_type!r}; supported: default, linear, llama3")
    if "factor" not in d:
        raise ConfigError(f"{source}: rope scaling {rope_type!r} needs a 'factor'")
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    return RopeScaling(**{k: v for k, v in d.items() if k in fields and k != "rope_type"}, rope_type=rope_type)


def _as_id_tuple(value: Any, source: str) -> tuple[int, ...]:
    ids = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ConfigError(f"{source}: token ids must be integers, got {value!r}")
    return tuple(ids)


def _id_or_list(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)
