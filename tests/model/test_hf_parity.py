"""Logits of `forward` against HF transformers on tiny random checkpoints, and the save round trip."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import HF_VARIANTS
from harli_jax.model import forward, load_hf_checkpoint, save_hf_checkpoint

LENGTHS = [50, 37, 9, 1]  # a batch of different lengths, right-padded


def _batch(vocab: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    valid = np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]
    return ids, valid


def _hf_logits(model, ids, valid):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(valid).long())
    return out.logits.float().numpy()


def _our_logits(cfg, params, ids, valid):
    segment_ids = (~valid).astype(np.int32)  # padding is a segment of its own
    return np.asarray(forward(params, cfg, ids, segment_ids=segment_ids))


@pytest.mark.parametrize("variant", sorted(HF_VARIANTS))
def test_forward_matches_transformers(hf_checkpoint, variant):
    model, path = hf_checkpoint(variant)
    cfg, params = load_hf_checkpoint(path)
    ids, valid = _batch(cfg.vocab_size)
    ref = _hf_logits(model, ids, valid)
    ours = _our_logits(cfg, params, ids, valid)
    assert np.abs(ref[valid]).max() > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)


def test_variants_cover_the_architecture(hf_checkpoint):
    cfgs = {v: load_hf_checkpoint(hf_checkpoint(v)[1])[0] for v in HF_VARIANTS}
    assert {c.num_heads // c.num_kv_heads for c in cfgs.values()} >= {1, 2, 4}
    assert cfgs["llama3-rope"].rope_scaling.rope_type == "llama3"
    assert cfgs["llama-gqa2"].head_dim == 32 != cfgs["llama-gqa2"].hidden_size // cfgs["llama-gqa2"].num_heads
    qwen = cfgs["qwen2-tied"]
    assert qwen.tie_word_embeddings and qwen.qkv_bias and not qwen.o_bias


@pytest.mark.parametrize("variant", ["llama3-rope", "qwen2-tied"])
def test_save_round_trip_through_transformers(hf_checkpoint, tmp_path, variant):
    model, path = hf_checkpoint(variant)
    cfg, params = load_hf_checkpoint(path)
    save_hf_checkpoint(tmp_path, cfg, params)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, valid = _batch(cfg.vocab_size, seed=2)
    np.testing.assert_allclose(_hf_logits(reloaded, ids, valid)[valid], _hf_logits(model, ids, valid)[valid],
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(_our_logits(cfg, params, ids, valid)[valid],
                               _hf_logits(reloaded, ids, valid)[valid], atol=1e-4, rtol=0)


def test_bfloat16_checkpoint(hf_checkpoint):
    model, path = hf_checkpoint("llama-gqa2", torch.bfloat16)
    cfg, params = load_hf_checkpoint(path)
    assert cfg.dtype == "bfloat16"
    assert params.layers[1].q_proj.dtype.name == "bfloat16"
    hf_q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params.layers[1].q_proj, np.float32), hf_q.T)
    ids, valid = _batch(cfg.vocab_size)
    ours, ref = _our_logits(cfg, params, ids, valid), _hf_logits(model, ids, valid)
    assert np.abs(ours[valid] - ref[valid]).max() < 0.1 * np.abs(ref[valid]).max()

    cfg32, params32 = load_hf_checkpoint(path, dtype="float32")
    assert cfg32.dtype == "float32" and params32.embed.dtype.name == "float32"
    np.testing.assert_array_equal(np.asarray(params32.layers[1].q_proj), hf_q.T)


def test_float16_checkpoint(hf_checkpoint):
    model, path = hf_checkpoint("qwen2-tied", torch.float16)
    cfg, params = load_hf_checkpoint(path)
    assert cfg.dtype == "float16" and params.layers[0].q_bias.dtype.name == "float16"
    np.testing.assert_array_equal(np.asarray(params.layers[0].q_bias),
                                  model.model.layers[0].self_attn.q_proj.bias.detach().numpy())
