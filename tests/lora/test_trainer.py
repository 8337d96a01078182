"""Training programs: micro-step gradients equal the single program's and jax.grad of the reference forward."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROWS, SEQ, assert_tree_close, train_batch
from harli_jax.lora.adapters import LoRAConfig, init_lora
from harli_jax.lora.trainer import (
    OptimizerConfig,
    backward_chunk,
    commit,
    embed_step,
    exact_matches,
    forward_chunk,
    grad_step,
    init_state,
    loss_step,
    make_optimizer,
)
from harli_jax.model import ModelConfig, forward, init_params
from harli_jax.model.paged import ArenaLayout
from harli_jax.model.params import LoRAPair

# The gradient tests never apply an update: any schedule will do.
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, weight_decay=0.0, max_grad_norm=1.0)
FORWARD_CHUNK = jax.jit(forward_chunk, static_argnames=("layout",), donate_argnames=("arena",))
BACKWARD_CHUNK = jax.jit(backward_chunk, static_argnames=("layout",))


@pytest.fixture(scope="module")
def setup(tiny_yaml):
    cfg = ModelConfig.from_yaml(tiny_yaml).replace(num_layers=4)
    params = init_params(cfg, seed=1, init_std=0.1)
    lora_cfg = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    lora = init_lora(cfg, lora_cfg, seed=2)
    # Non-zero B so that the gradients of A are not trivially zero.
    lora = {k: LoRAPair(p.a, 0.1 * jax.random.normal(jax.random.key(i), p.b.shape), p.scale)
            for i, (k, p) in enumerate(lora.items())}
    return cfg, params, lora, train_batch(cfg.vocab_size)


def _reference_grads(cfg, params, lora, batch):
    def loss(lora):
        logits = forward(params, cfg, batch.tokens, batch.positions, batch.segment_ids, lora)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch.loss_mask)
    return jax.value_and_grad(loss)(lora)


def _single_program(cfg, params, lora, batch, remat):
    state = init_state(lora, make_optimizer(OPTIMIZER))
    state, total, count = jax.jit(grad_step, static_argnames=("cfg", "remat"))(params, cfg, state, batch, remat)
    return total, count, state.accum


def _micro_steps(cfg, params, lora, batch, layers_per_chunk, page_tokens=8):
    layout = ArenaLayout(cfg, page_tokens)
    arena = layout.zeros(40)
    need = layout.stash_pages(ROWS * SEQ)
    stash = jnp.asarray(np.random.default_rng(0).permutation(np.arange(1, 40))[:need], jnp.int32)
    fwd, bwd = FORWARD_CHUNK, BACKWARD_CHUNK
    x = embed_step(params, batch)
    starts = list(range(0, cfg.num_layers, layers_per_chunk))
    for start in starts:
        n = min(layers_per_chunk, cfg.num_layers - start)
        arena, x = fwd(params.layers[start: start + n], layout, lora, arena, x, batch, stash, jnp.int32(start))
    total, count, g = jax.jit(loss_step, static_argnames="cfg")(params, cfg, x, batch)
    grads = jax.tree.map(jnp.zeros_like, lora)
    for start in reversed(starts):
        n = min(layers_per_chunk, cfg.num_layers - start)
        g, grads = bwd(params.layers[start: start + n], layout, lora, arena, g, grads, batch, stash,
                       jnp.int32(start + n))
    state = init_state(lora, make_optimizer(OPTIMIZER))
    state, _ = commit(state, grads, count)
    return total, count, state.accum


@pytest.mark.parametrize("remat", [False, True])
def test_single_program_equals_jax_grad_of_forward(setup, remat):
    cfg, params, lora, batch = setup
    ref_loss, ref_grads = _reference_grads(cfg, params, lora, batch)
    total, count, grads = _single_program(cfg, params, lora, batch, remat)
    assert float(count) == float(batch.loss_mask.sum())
    np.testing.assert_allclose(float(total), float(ref_loss), rtol=1e-6)
    assert_tree_close(grads, ref_grads, 1e-5)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("layers_per_chunk", [1, 2, 3, 4])
def test_micro_steps_equal_the_single_program(setup, layers_per_chunk):
    cfg, params, lora, batch = setup
    total, count, grads = _single_program(cfg, params, lora, batch, remat=False)
    programs = FORWARD_CHUNK._cache_size(), BACKWARD_CHUNK._cache_size()
    m_total, m_count, m_grads = _micro_steps(cfg, params, lora, batch, layers_per_chunk)
    # One program per chunk size (a chunk's layers are arguments), whatever layer the chunk starts at.
    sizes = len({min(layers_per_chunk, cfg.num_layers - s) for s in range(0, cfg.num_layers, layers_per_chunk)})
    assert FORWARD_CHUNK._cache_size() - programs[0] <= sizes and BACKWARD_CHUNK._cache_size() - programs[1] <= sizes
    assert float(m_count) == float(count)
    np.testing.assert_allclose(float(m_total), float(total), rtol=1e-6)
    assert_tree_close(m_grads, grads, 1e-5)


def test_micro_steps_when_a_hidden_state_straddles_pages(tiny_yaml):
    # hidden 96 does not divide a page of 4 layers x 2 x 2 KV heads x 8 tokens x 16 = 2048 elements.
    cfg = ModelConfig.from_yaml(tiny_yaml).replace(num_layers=4, hidden_size=96, num_heads=6, head_dim=16)
    params = init_params(cfg, seed=1, init_std=0.1)
    lora = init_lora(cfg, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "o_proj")), seed=2)
    lora = {k: LoRAPair(p.a, 0.1 * jax.random.normal(jax.random.key(i), p.b.shape), p.scale)
            for i, (k, p) in enumerate(lora.items())}
    batch = train_batch(cfg.vocab_size)
    total, _, grads = _single_program(cfg, params, lora, batch, remat=False)
    m_total, _, m_grads = _micro_steps(cfg, params, lora, batch, layers_per_chunk=2)
    np.testing.assert_allclose(float(m_total), float(total), rtol=1e-6)
    assert_tree_close(m_grads, grads, 1e-5)


def test_exact_matches_score_each_packed_sample_by_all_its_trained_tokens():
    # Two rows: row 0 packs samples 1 and 2, row 1 holds sample 1 and padding. A sample is exact when every
    # position of its loss mask has the greedy token; untrained positions (prompts, padding) never count.
    targets = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    arrays = {"targets": targets,
              "loss_mask": np.array([[0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0]], np.float32),
              "segment_ids": np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0]])}
    greedy = targets.copy()
    greedy[0, 0] = greedy[1, 3] = 99  # untrained positions
    assert exact_matches(greedy, arrays) == (3, 3)
    greedy[0, 4] = 99  # sample 2 of row 0 misses one answer token
    assert exact_matches(greedy, arrays) == (2, 3)
    greedy[1, 2] = 99
    assert exact_matches(greedy, arrays) == (1, 3)
