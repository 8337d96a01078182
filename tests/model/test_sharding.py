"""Tensor-parallel placement without several devices: which sizes a degree must divide, and where each weight
and adapter is split (the runs over emulated devices are tests/runtime/test_tensor_parallel.py)."""

import pytest
from jax.sharding import PartitionSpec as P

from harli_jax import Engine, EngineConfig
from harli_jax.errors import ConfigError
from harli_jax.lora.adapters import LoRAConfig, init_lora
from harli_jax.model import load_model
from harli_jax.model.config import ModelConfig
from harli_jax.model.params import PROJECTIONS, param_shapes
from harli_jax.model.sharding import _pair_specs, check_tensor_parallel, param_specs, tp_mesh
from harli_jax.runtime.distributed import initialize

CFG = ModelConfig(name="t", architecture="qwen2", max_position_embeddings=64, vocab_size=96, hidden_size=32,
                  intermediate_size=40, num_layers=1, num_heads=8, num_kv_heads=4, head_dim=4, qkv_bias=True)


@pytest.mark.parametrize("tp, names", [(8, ["the KV heads (4)"]),
                                       (16, ["the device count (8)", "the KV heads (4)", "the attention heads (8)",
                                             "the intermediate size (40)"])])
def test_a_degree_must_divide_every_split_size(tp, names):
    with pytest.raises(ConfigError) as e:
        check_tensor_parallel(CFG, tp, num_devices=8)
    listed = str(e.value).split(" of t;")[0].split("does not divide ")[1].split(", ")
    assert listed == names
    check_tensor_parallel(CFG, 4, num_devices=8)  # divides all


def test_an_engine_at_a_degree_beyond_its_devices_says_so(tiny_yaml):
    with pytest.raises(ConfigError, match=r"tensor_parallel=2 does not divide the device count \(1\)"):
        Engine(load_model(tiny_yaml), EngineConfig(tensor_parallel=2, num_pages=4), warmup=False)
    with pytest.raises(ConfigError, match="tensor_parallel must be a positive integer"):
        EngineConfig(tensor_parallel=0)
    assert tp_mesh(CFG, 1) is None  # one device: no mesh, no sharding


def test_megatron_splits():
    specs = param_specs(CFG, param_shapes(CFG), 4)
    layer = specs.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert getattr(layer, name) == P(None, "tp")  # by output columns
    assert layer.o_proj == layer.down_proj == P("tp", None)  # by input rows
    assert layer.q_bias == layer.k_bias == layer.v_bias == P("tp")
    assert layer.attn_norm == layer.mlp_norm == specs.final_norm == P()
    assert specs.embed == P("tp", None) and specs.lm_head == P(None, "tp")  # by vocabulary
    assert param_specs(CFG, param_shapes(CFG), 5).embed == P(None, None)  # 96 % 5: the embedding stays whole


def test_lora_is_split_as_its_projection():
    lora = init_lora(CFG, LoRAConfig(rank=2, targets=PROJECTIONS))
    for name, pair in lora.items():
        a, b = _pair_specs(name, pair.a.ndim - 2)
        if name in ("o_proj", "down_proj"):  # row-parallel: A `[layers, in, rank]` by its input rows
            assert (a, b) == (P(None, "tp", None), P())
        else:  # column-parallel: B `[layers, rank, out]` by its output columns
            assert (a, b) == (P(), P(None, None, "tp"))
    assert _pair_specs("q_proj", 2)[1] == P(None, None, None, "tp")  # resident slots `[layers, slots, rank, out]`


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="127.0.0.1:1234"), "missing --num-processes, --process-id"),
    (dict(coordinator="localhost", num_processes=2, process_id=0), "HOST:PORT"),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), r"--process-id must be in \[0, "),
    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=0, timeout_s=0), "at least 1 second"),
])
def test_multi_process_flags_are_checked_before_joining(kwargs, message, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=message):
        initialize(**kwargs)
    assert initialize() is False  # nothing given: one process


def test_multi_process_flags_from_the_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        initialize()
