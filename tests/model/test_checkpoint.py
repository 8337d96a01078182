"""HF checkpoint loading: sharded files, and a clear error for every kind of bad input."""

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
from transformers import AutoModelForCausalLM

from harli_jax.errors import CheckpointError, ConfigError
from harli_jax.model import ModelConfig, forward, init_params, load_hf_checkpoint, save_hf_checkpoint


@pytest.fixture
def checkpoint(hf_checkpoint, tmp_path):
    """A private, editable copy of a tiny Llama checkpoint."""
    _, src = hf_checkpoint("llama-gqa2")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    file = path / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(file))
    edit(tensors)
    safetensors.numpy.save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(ConfigError, match="missing config.json"):
        load_hf_checkpoint(checkpoint)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_hf_checkpoint(tmp_path / "nope")


def test_missing_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_checkpoint(checkpoint)


def test_unexpected_tensor(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.extra\.weight"):
        load_hf_checkpoint(checkpoint)


def test_rotary_buffers_of_old_checkpoints_are_ignored(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(16, np.float32)}))
    cfg, _ = load_hf_checkpoint(checkpoint)
    assert cfg.num_layers == 2


def test_shape_mismatch(checkpoint):
    _edit_config(checkpoint, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight .* shape \[96, 64\], "
                                              r"expected \[128, 64\]"):
        load_hf_checkpoint(checkpoint)


def test_unsupported_architecture(checkpoint):
    _edit_config(checkpoint, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConfigError, match="unsupported architectures.*GPT2LMHeadModel"):
        load_hf_checkpoint(checkpoint)


def test_unsupported_activation(checkpoint):
    _edit_config(checkpoint, hidden_act="gelu")
    with pytest.raises(ConfigError, match="unsupported activation hidden_act='gelu'"):
        load_hf_checkpoint(checkpoint)


def test_unsupported_rope_type(checkpoint):
    _edit_config(checkpoint, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match="unsupported rope_type 'yarn'"):
        load_hf_checkpoint(checkpoint)


def test_corrupt_safetensors(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x00this is not a safetensors file" * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_hf_checkpoint(checkpoint)


def test_truncated_safetensors(checkpoint):
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read"):
        load_hf_checkpoint(checkpoint)


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load_hf_checkpoint(checkpoint)


def test_unsupported_dtype(checkpoint):
    with pytest.raises(ConfigError, match="unsupported dtype 'int8'"):
        load_hf_checkpoint(checkpoint, dtype="int8")


def test_sharded_round_trip(tiny_yaml, tmp_path):
    cfg = ModelConfig.from_yaml(tiny_yaml)
    params = init_params(cfg, seed=3)
    save_hf_checkpoint(tmp_path, cfg, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()

    cfg2, params2 = load_hf_checkpoint(tmp_path)
    assert cfg2.replace(name=cfg.name) == cfg
    for a, b in zip(params.layers, params2.layers, strict=True):
        np.testing.assert_array_equal(a.down_proj, b.down_proj)

    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = np.arange(20, dtype=np.int32)[None] * 7 % cfg.vocab_size
    import torch
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(params2, cfg2, ids)), ref, atol=1e-4, rtol=0)


def test_index_naming_a_missing_shard(tiny_yaml, tmp_path):
    cfg = ModelConfig.from_yaml(tiny_yaml)
    save_hf_checkpoint(tmp_path, cfg, init_params(cfg), max_shard_bytes=100_000)
    shard = sorted(tmp_path.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names shard file.*{shard.name}"):
        load_hf_checkpoint(tmp_path)


def test_resave_replaces_old_shards(tiny_yaml, tmp_path):
    cfg = ModelConfig.from_yaml(tiny_yaml)
    save_hf_checkpoint(tmp_path, cfg, init_params(cfg), max_shard_bytes=100_000)
    save_hf_checkpoint(tmp_path, cfg, init_params(cfg, seed=1))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    load_hf_checkpoint(tmp_path)


def test_save_rejects_params_of_another_config(tiny_yaml, tmp_path):
    cfg = ModelConfig.from_yaml(tiny_yaml)
    with pytest.raises(CheckpointError, match=r"wrong tensors: .*mlp\.gate_proj"):
        save_hf_checkpoint(tmp_path, cfg.replace(intermediate_size=32), init_params(cfg))
    assert not list(tmp_path.iterdir())
