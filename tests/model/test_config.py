"""ModelConfig from HF config.json (v4 and v5 spellings) and from the YAML files in configs/models/."""

import jax
import pytest

from conftest import REPO
from harli_jax.errors import ConfigError
from harli_jax.model import ModelConfig, RopeScaling, param_shapes
from harli_jax.model.layers import rope_inv_freq

V5 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu", "dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
V4 = {k: v for k, v in V5.items() if k not in ("rope_parameters", "dtype")} | {
    "torch_dtype": "bfloat16", "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}


def test_v4_and_v5_spellings_agree():
    v5, v4 = ModelConfig.from_hf(V5), ModelConfig.from_hf(V4)
    assert v4 == v5
    assert v5.rope_theta == 500000.0 and v5.dtype == "bfloat16" and v5.head_dim == 128
    assert v5.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert v5.eos_token_ids == (128001, 128008, 128009)


def test_legacy_rope_scaling_type_key():
    cfg = ModelConfig.from_hf(V4 | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope_scaling == RopeScaling("linear", 2.0)
    default = rope_inv_freq(cfg.replace(rope_scaling=None))
    assert (rope_inv_freq(cfg) == default / 2).all()


def test_llama3_scaling_changes_only_low_frequencies():
    cfg = ModelConfig.from_hf(V5)
    scaled, default = rope_inv_freq(cfg), rope_inv_freq(cfg.replace(rope_scaling=None))
    assert scaled[0] == default[0]  # the highest frequency is kept
    assert scaled[-1] == pytest.approx(default[-1] / 8)  # the lowest is divided by the factor


def test_hf_round_trip():
    cfg = ModelConfig.from_hf(V5)
    assert ModelConfig.from_hf(cfg.to_hf()).replace(name=cfg.name) == cfg


@pytest.mark.parametrize("name, low, high", [("tiny", 0.05e6, 1e6), ("small", 45e6, 55e6),
                                             ("llama3-8b", 8.02e9, 8.04e9), ("qwen2.5-7b", 7.6e9, 7.63e9)])
def test_model_yamls(name, low, high):
    cfg = ModelConfig.from_yaml(REPO / "configs" / "models" / f"{name}.yaml")
    count = sum(x.size for x in jax.tree.leaves(param_shapes(cfg)))
    assert low <= count <= high
    assert cfg.name == name


def test_tiny_has_gqa(tiny_yaml):
    cfg = ModelConfig.from_yaml(tiny_yaml)
    assert cfg.num_heads > cfg.num_kv_heads > 0


@pytest.mark.parametrize("changes, message", [
    ({"num_kv_heads": 3}, "must be a multiple of num_kv_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"dtype": "int4"}, "unsupported dtype 'int4'"),
    ({"architecture": "gpt2"}, "unsupported architecture 'gpt2'"),
    ({"eos_token_ids": (9999,)}, "outside the vocabulary"),
])
def test_invalid_fields(tiny_yaml, changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_yaml(tiny_yaml).replace(**changes)


def test_yaml_errors(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("architecture: llama\nhidden_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['hidden_sise'\]"):
        ModelConfig.from_yaml(unknown)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("architecture: [llama\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        ModelConfig.from_yaml(broken)


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "gelu_new"}, "unsupported activation"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    ({"num_hidden_layers": None}, "num_layers must be a positive integer"),
])
def test_hf_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(V5 | changes)
