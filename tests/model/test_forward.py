"""The reference forward: packing, positions, named scopes."""

import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax.model import ModelConfig, forward, init_params
from harli_jax.model.transformer import segment_positions


@pytest.fixture(scope="module")
def tiny(tiny_yaml):
    cfg = ModelConfig.from_yaml(tiny_yaml)
    return cfg, init_params(cfg, seed=0, init_std=0.1)


def test_segment_positions_restart():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 1, 2]])


def test_packed_sequences_equal_separate_forwards(tiny):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 11), rng.integers(0, cfg.vocab_size, 7)
    packed = np.concatenate([a, b])[None].astype(np.int32)
    seg = np.array([[1] * 11 + [2] * 7], np.int32)
    out = np.asarray(forward(params, cfg, packed, segment_ids=seg))
    np.testing.assert_allclose(out[0, :11], np.asarray(forward(params, cfg, a[None].astype(np.int32)))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 11:], np.asarray(forward(params, cfg, b[None].astype(np.int32)))[0], atol=1e-5)


def test_explicit_positions(tiny):
    cfg, params = tiny
    ids = np.arange(1, 9, dtype=np.int32)[None]
    base = np.asarray(forward(params, cfg, ids))
    np.testing.assert_allclose(np.asarray(forward(params, cfg, ids, positions=np.arange(8)[None])), base, atol=1e-6)
    # RoPE is relative: a constant shift changes nothing, a gap changes the tokens after it.
    np.testing.assert_allclose(np.asarray(forward(params, cfg, ids, positions=np.arange(8)[None] + 5)), base,
                               atol=1e-5)
    gapped = np.asarray(forward(params, cfg, ids, positions=np.array([[0, 1, 2, 3, 10, 11, 12, 13]])))
    np.testing.assert_allclose(gapped[0, :4], base[0, :4], atol=1e-6)
    assert np.abs(gapped[0, 4:] - base[0, 4:]).max() > 1e-3


def test_logits_are_float32_for_bfloat16_weights(tiny):
    cfg, _ = tiny
    cfg16 = cfg.replace(dtype="bfloat16")
    out = forward(init_params(cfg16), cfg16, np.zeros((2, 5), np.int32))
    assert out.dtype == jnp.float32 and out.shape == (2, 5, cfg.vocab_size)


def test_bad_shapes_are_reported(tiny):
    cfg, params = tiny
    with pytest.raises(ValueError, match=r"token_ids must be an integer array \[batch, tokens\]"):
        forward(params, cfg, np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="segment_ids must have the shape of token_ids"):
        forward(params, cfg, np.zeros((1, 5), np.int32), segment_ids=np.zeros((1, 4), np.int32))


def test_named_scopes_label_the_blocks(tiny):
    cfg, params = tiny
    text = forward.lower(params, cfg, np.zeros((1, 4), np.int32)).as_text(debug_info=True)
    for scope in ("embed", "layer", "attention", "qkv", "rope", "o_proj", "mlp", "lm_head"):
        assert f"{scope}/" in text or f"/{scope}" in text, scope
