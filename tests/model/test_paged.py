"""The paged inference step over stacked layer weights (one scanned layer) and over per-layer weights (unrolled):
the same step."""

import jax
import numpy as np

from harli_jax.lora.adapters import LoRAConfig, init_lora
from harli_jax.model import ModelConfig, init_params
from harli_jax.model.paged import ArenaLayout, TokenBatch, paged_step
from harli_jax.model.params import LayerParams, LoRAPair
from harli_jax.model.sampling import SamplingRows

PAGE = 4


def _batch(cfg):
    """A 5-token prefill chunk (positions 0..4) and a decode token at position 9, over separate pages."""
    rng = np.random.default_rng(0)
    positions = np.array([0, 1, 2, 3, 4, 9], np.int32)
    seq_index = np.array([0, 0, 0, 0, 0, 1], np.int32)
    tables = np.array([[1, 2, 0], [3, 4, 5]], np.int32)
    return TokenBatch(tokens=rng.integers(3, cfg.vocab_size, 6).astype(np.int32), positions=positions,
                      seq_index=seq_index, page_ids=tables[seq_index, positions // PAGE],
                      offsets=positions % PAGE, block_tables=tables, sample_index=np.array([4, 5], np.int32),
                      sampling=SamplingRows(np.zeros(2, np.float32), np.zeros(2, np.int32), np.ones(2, np.float32),
                                            np.zeros(2, np.uint32), np.zeros(2, np.int32)))


def test_per_layer_weights_give_the_stacked_step(tiny_yaml):
    cfg = ModelConfig.from_yaml(tiny_yaml).replace(num_layers=3)
    params = init_params(cfg, seed=0, init_std=0.1)
    lora = init_lora(cfg, LoRAConfig(rank=2, alpha=4), seed=1)
    lora = {k: LoRAPair(p.a, 0.1 * jax.random.normal(jax.random.key(i), p.b.shape), p.scale)
            for i, (k, p) in enumerate(lora.items())}
    per_layer = params.per_layer()
    assert isinstance(params.layers, LayerParams) and len(per_layer.layers) == 3
    rng = np.random.default_rng(1)
    arena = rng.standard_normal(ArenaLayout(cfg, PAGE).shape(6)).astype(np.float32)  # garbage in unused slots
    step = jax.jit(paged_step, static_argnames=("cfg",))
    for adapters in (None, lora):
        stacked_arena, stacked_tokens = step(params, cfg, arena, _batch(cfg), lora=adapters)
        unrolled_arena, unrolled_tokens = step(per_layer, cfg, arena, _batch(cfg), lora=adapters)
        np.testing.assert_array_equal(unrolled_tokens, stacked_tokens)
        np.testing.assert_allclose(unrolled_arena, stacked_arena, rtol=1e-5, atol=1e-6)
        assert not np.allclose(stacked_arena, arena)  # the step wrote its K/V
