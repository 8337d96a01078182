"""Parity with HF PEFT (torch CPU): loss, LoRA gradients, and the exported adapter."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from harli_jax.lora.adapters import LoRAConfig, export_peft, init_lora, load_peft
from harli_jax.lora.trainer import TrainBatch, loss_sum
from harli_jax.model import forward, load_hf_checkpoint
from harli_jax.model.params import LoRAPair

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module", params=["llama-gqa2", "qwen2-tied"])
def peft_pair(request, hf_checkpoint, tmp_path_factory):
    """A PEFT model with random (non-zero) B, its adapter saved by PEFT and read back by us."""
    model, path = hf_checkpoint(request.param)
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS),
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    adapter_dir = tmp_path_factory.mktemp("peft")
    peft_model.save_pretrained(adapter_dir)
    cfg, params = load_hf_checkpoint(path)
    lora_cfg, adapters = load_peft(adapter_dir, cfg)
    return peft_model, cfg, params, lora_cfg, adapters


def _batch(vocab):
    rng = np.random.default_rng(5)
    ids = rng.integers(3, vocab, (2, 24)).astype(np.int64)
    labels = ids.copy()
    labels[0, :7] = -100  # a prompt without loss
    labels[1, 20:] = -100
    targets = np.roll(ids, -1, axis=1)
    mask = np.roll(labels != -100, -1, axis=1)
    mask[:, -1] = False
    ours = TrainBatch(tokens=jnp.asarray(ids, jnp.int32), targets=jnp.asarray(targets, jnp.int32),
                      loss_mask=jnp.asarray(mask, jnp.float32), segment_ids=jnp.ones(ids.shape, jnp.int32),
                      positions=jnp.tile(jnp.arange(ids.shape[1], dtype=jnp.int32), (2, 1)))
    return torch.from_numpy(ids), torch.from_numpy(labels), ours


def test_loss_and_gradients_match_peft(peft_pair):
    peft_model, cfg, params, lora_cfg, adapters = peft_pair
    assert lora_cfg.scale == 2.0 and set(adapters) == set(TARGETS)
    ids, labels, batch = _batch(cfg.vocab_size)
    peft_model.zero_grad()
    hf_loss = peft_model(input_ids=ids, labels=labels).loss
    hf_loss.backward()

    def mean_loss(lora):
        total, count = loss_sum(lora, params, cfg, batch)
        return total / count

    loss, grads = jax.value_and_grad(mean_loss)(adapters)
    np.testing.assert_allclose(float(loss), hf_loss.item(), rtol=1e-5)
    named = dict(peft_model.named_parameters())
    for target, pair in grads.items():
        for layer in range(cfg.num_layers):
            module = [n for n in named if f"layers.{layer}." in n and f"{target}.lora_A" in n][0]
            hf_a = named[module].grad.numpy().T
            hf_b = named[module.replace("lora_A", "lora_B")].grad.numpy().T
            for ours, ref in ((pair.a[layer], hf_a), (pair.b[layer], hf_b)):
                err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
                assert err <= 1e-4, (target, layer, err)


def test_exported_adapter_loads_in_peft(peft_pair, hf_checkpoint, tmp_path):
    _, cfg, params, lora_cfg, _ = peft_pair
    ours = init_lora(cfg, LoRAConfig(rank=4, alpha=16, targets=("q_proj", "v_proj", "down_proj")), seed=9)
    ours = {k: LoRAPair(p.a, 0.3 * jax.random.normal(jax.random.key(1), p.b.shape), p.scale)
            for k, p in ours.items()}
    export_peft(ours, LoRAConfig(rank=4, alpha=16, targets=("q_proj", "v_proj", "down_proj")), cfg, tmp_path)
    ids, _, batch = _batch(cfg.vocab_size)
    expected = np.asarray(forward(params, cfg, batch.tokens, lora=ours))
    base = np.asarray(forward(params, cfg, batch.tokens))
    assert np.abs(expected - base).max() > 1e-2, "the adapter changes nothing"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_checkpoint("llama-gqa2" if cfg.architecture == "llama"
                                                               else "qwen2-tied")[1])
    loaded = PeftModel.from_pretrained(model, tmp_path).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
