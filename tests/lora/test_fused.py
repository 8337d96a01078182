"""Fused steps: a micro-batch's forward in token chunks or in layer windows inside inference steps, then backward
slices, gives the single program's LoRA gradients; the inference step it rides in is unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from conftest import SEQ, assert_tree_close, resident_slots, train_batch
from harli_jax.lora.adapters import LoRAConfig, init_lora
from harli_jax.lora.fused import forward_tokens, forward_window, read_loss_gradient, token_stash_pages
from harli_jax.lora.trainer import (
    OptimizerConfig,
    backward_chunk,
    embed_step,
    forward_chunk,
    grad_step,
    init_state,
    loss_step,
    make_optimizer,
)
from harli_jax.model import ModelConfig, init_params
from harli_jax.model.paged import ArenaLayout, TokenBatch, paged_step
from harli_jax.model.params import LoRAPair
from harli_jax.model.sampling import SamplingRows
from harli_jax.model.sharding import ARENA_SPEC

FORWARD = jax.jit(forward_tokens, static_argnames=("layout", "chunk", "attention_impl"))
WINDOW = jax.jit(forward_window, static_argnames=("layout", "layers", "attention_impl"))
FORWARD_CHUNK = jax.jit(forward_chunk, static_argnames=("layout",))
LOSS = jax.jit(loss_step, static_argnames=("cfg",))
BACKWARD = jax.jit(backward_chunk, static_argnames=("layout",))
STEP = jax.jit(paged_step, static_argnames=("cfg", "attention_impl", "mesh"))
PAGE_TOKENS, NUM_PAGES = 8, 48
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.0, max_grad_norm=1.0)


def _lora(cfg, seed):
    lora = init_lora(cfg, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj")), seed=seed)
    return {k: LoRAPair(p.a, 0.1 * jax.random.normal(jax.random.key(seed + i), p.b.shape), p.scale)
            for i, (k, p) in enumerate(lora.items())}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tiny_yaml):
    cfg = ModelConfig.from_yaml(tiny_yaml).replace(num_layers=4)
    if request.param == "qwen2":
        cfg = cfg.replace(architecture="qwen2", qkv_bias=True)
    params = init_params(cfg, seed=1, init_std=0.1)
    return cfg, params, _lora(cfg, 2), resident_slots(cfg, [_lora(cfg, 7), _lora(cfg, 11)]), train_batch(
        cfg.vocab_size)


def _decode_batch(cfg, seqs=3, pages_each=2):
    """`seqs` decode tokens over pages 1 .. seqs * pages_each (the stash lives above them)."""
    rng = np.random.default_rng(3)
    tables = np.arange(1, 1 + seqs * pages_each, dtype=np.int32).reshape(seqs, pages_each)
    positions = rng.integers(0, pages_each * PAGE_TOKENS, seqs).astype(np.int32)
    i32 = jnp.int32
    return TokenBatch(tokens=jnp.asarray(rng.integers(3, cfg.vocab_size, seqs), i32), positions=jnp.asarray(positions),
                      page_ids=jnp.asarray(tables[np.arange(seqs), positions // PAGE_TOKENS]),
                      offsets=jnp.asarray(positions % PAGE_TOKENS), block_tables=jnp.asarray(tables),
                      query_start=jnp.arange(seqs + 1, dtype=i32), context_lens=jnp.asarray(positions + 1),
                      sample_index=jnp.arange(seqs, dtype=i32), adapter_slots=jnp.asarray([0, -1, 1][:seqs], i32),
                      sampling=SamplingRows(temperature=jnp.zeros(seqs), top_k=jnp.zeros(seqs, i32),
                                            top_p=jnp.ones(seqs), seed=jnp.zeros(seqs, jnp.uint32),
                                            counter=jnp.zeros(seqs, i32)))


def _fused_micro_batch(cfg, params, lora, serving, batch, chunk, layers, with_inference, mesh=None, window=None):
    """Token chunks of `chunk` positions (each inside a decode step when `with_inference`) or, with `window`,
    forward windows of `window` layers each inside a decode step up to the last layer, which runs with the loss
    as a micro-step; then backward slices of `layers` layers; returns (loss sum, tokens, gradients, [(fused next
    tokens, unfused next tokens)]). With a tensor-parallel `mesh` (the weights and adapters placed on it by the
    caller) the arena is split over it."""
    layout = ArenaLayout(cfg, PAGE_TOKENS, mesh)
    arena = jax.random.normal(jax.random.key(0), layout.shape(NUM_PAGES), jnp.float32).astype(cfg.dtype)
    if mesh is not None:
        arena = jax.device_put(arena, NamedSharding(mesh, ARENA_SPEC))
    rows, seq_len = batch.tokens.shape
    need = token_stash_pages(layout, rows * seq_len)
    stash = jnp.asarray(np.random.default_rng(0).permutation(np.arange(7, NUM_PAGES))[:need], jnp.int32)
    decode = _decode_batch(cfg)
    totals, served = (jnp.float32(0), jnp.float32(0)), []
    if window is not None:
        x, last = embed_step(params, batch), cfg.num_layers - 1
        for start in range(0, last, window):
            _, alone = STEP(params, cfg, arena, decode, attention_impl="reference", lora=serving, mesh=mesh)
            arena, x, fused = WINDOW(params, layout, lora, arena, x, batch, stash, jnp.int32(start),
                                     layers=min(window, last - start), inference=decode, serving_lora=serving,
                                     attention_impl="reference")
            served.append((fused, alone))
        arena, x = FORWARD_CHUNK(params.layers[last:], layout, lora, arena, x, batch, stash, jnp.int32(last))
        *totals, g = LOSS(params, cfg, x, batch)
    for start in range(0, seq_len, chunk) if window is None else ():
        if with_inference:
            _, alone = STEP(params, cfg, arena, decode, attention_impl="reference", lora=serving, mesh=mesh)
            arena, totals, fused = FORWARD(params, layout, lora, arena, batch, stash, jnp.int32(start), totals,
                                           chunk=chunk, inference=decode, serving_lora=serving,
                                           attention_impl="reference")
            served.append((fused, alone))
        else:
            arena, totals, _ = FORWARD(params, layout, lora, arena, batch, stash, jnp.int32(start), totals,
                                       chunk=chunk)
    if window is None:
        g = read_loss_gradient(layout, arena, stash, (rows, seq_len, cfg.hidden_size))
    grads = jax.tree.map(jnp.zeros_like, lora)
    for end in range(cfg.num_layers, 0, -layers):
        n = min(layers, end)
        g, grads = BACKWARD(params.layers[end - n: end], layout, lora, arena, g, grads, batch, stash, jnp.int32(end))
    return *totals, grads, served


@pytest.mark.parametrize("chunk,layers,with_inference", [(4, 1, True), (8, 2, True), (SEQ, 4, True),
                                                          (4, 4, False), (SEQ, 1, False)])
def test_fused_gradients_equal_the_single_program(model, chunk, layers, with_inference):
    cfg, params, lora, serving, batch = model
    state = init_state(lora, make_optimizer(OPTIMIZER))
    state, total, count = jax.jit(grad_step, static_argnames=("cfg", "remat"))(params, cfg, state, batch)
    f_total, f_count, f_grads, served = _fused_micro_batch(cfg, params, lora, serving, batch, chunk, layers,
                                                           with_inference)
    assert float(f_count) == float(count)
    np.testing.assert_allclose(float(f_total), float(total), rtol=1e-6)
    assert_tree_close(f_grads, state.accum, 1e-5)
    for fused, alone in served:  # the inference step it rode in gives the tokens it gives alone
        np.testing.assert_array_equal(np.asarray(fused), np.asarray(alone))


@pytest.mark.parametrize("window,layers", [(1, 1), (2, 4)])
def test_fused_windows_give_the_single_program_gradients(model, window, layers):
    """Forward windows inside decode steps (the last one shorter where the layers do not divide), then the last
    layer and the loss as a micro-step, then backward slices."""
    cfg, params, lora, serving, batch = model
    state = init_state(lora, make_optimizer(OPTIMIZER))
    state, total, count = jax.jit(grad_step, static_argnames=("cfg", "remat"))(params, cfg, state, batch)
    f_total, f_count, f_grads, served = _fused_micro_batch(cfg, params, lora, serving, batch, None, layers, True,
                                                           window=window)
    assert len(served) == -(-(cfg.num_layers - 1) // window)
    assert float(f_count) == float(count)
    np.testing.assert_allclose(float(f_total), float(total), rtol=1e-6)
    assert_tree_close(f_grads, state.accum, 1e-5)
    for fused, alone in served:
        np.testing.assert_array_equal(np.asarray(fused), np.asarray(alone))
