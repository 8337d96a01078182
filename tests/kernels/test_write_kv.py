"""write_kv: one decode token's K/V per sequence into its page slot, in place, never into the null page."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harli_jax.kernels import paged_attention_reference, write_kv

SHAPE = (6, 3, 2, 2, 8, 16)  # [num_pages, layers, 2, kv_heads, page_tokens, head_dim]


def _inputs(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    arena = rng.standard_normal(SHAPE).astype(np.float32)
    k = rng.standard_normal((4, 2, 16)).astype(np.float32)
    v = rng.standard_normal((4, 2, 16)).astype(np.float32)
    page_ids = np.array([3, 0, 5, 1], np.int32)  # slot 1 is empty: the null page
    offsets = np.array([7, 2, 0, 4], np.int32)
    return arena, k, v, page_ids, offsets


def test_writes_exactly_the_intended_slots():
    arena, k, v, page_ids, offsets = _inputs(0)
    layer = 2
    out = jax.jit(write_kv)(jnp.asarray(arena), jnp.int32(layer), jnp.asarray(k), jnp.asarray(v),
                            jnp.asarray(page_ids), jnp.asarray(offsets))
    expected = arena.copy()
    for b, (page, offset) in enumerate(zip(page_ids, offsets, strict=True)):
        if page:
            expected[page, layer, 0, :, offset] = k[b]
            expected[page, layer, 1, :, offset] = v[b]
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(out)[0], arena[0])  # the null page is never written


def test_casts_to_the_arena_dtype_and_feeds_attention():
    _, k, v, page_ids, offsets = _inputs(1)
    offsets[0] = 0
    out = write_kv(jnp.zeros(SHAPE, jnp.bfloat16), 0, k, v, page_ids, offsets)
    assert out.dtype == jnp.bfloat16
    # A sequence whose only token was just written attends to exactly that token's V.
    q = jnp.ones((1, 2, 16), jnp.bfloat16)
    block_tables = jnp.asarray([[page_ids[0], 0]], jnp.int32)
    attended = paged_attention_reference(q, out, 0, block_tables, jnp.ones((1,), jnp.int32))
    np.testing.assert_array_equal(np.asarray(attended[0]), np.asarray(jnp.asarray(v[0], jnp.bfloat16)))


def test_donated_arena_is_updated_in_place():
    arena, k, v, page_ids, offsets = _inputs(2)
    args = (jnp.asarray(arena), jnp.int32(1), jnp.asarray(k), jnp.asarray(v), jnp.asarray(page_ids),
            jnp.asarray(offsets))
    compiled = jax.jit(write_kv, donate_argnums=0).lower(*args).compile()
    assert compiled.memory_analysis().alias_size_in_bytes >= arena.nbytes


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(k=np.zeros((4, 3, 16), np.float32)), "k must be"),
        (dict(v=np.zeros((3, 2, 16), np.float32)), "batch sizes differ"),
        (dict(page_ids=np.zeros((4,), np.int64)), "page_ids must be int32"),
        (dict(offsets=np.zeros((5,), np.int32)), "offsets must be int32"),
        (dict(arena=np.zeros((6, 3, 1, 2, 8, 16), np.float32)), "arena must be"),
    ],
)
def test_bad_arguments_raise(changes, message):
    arena, k, v, page_ids, offsets = _inputs(3)
    args = {**dict(arena=arena, k=k, v=v, page_ids=page_ids, offsets=offsets), **changes}
    with pytest.raises(ValueError, match=message):
        write_kv(args["arena"], 0, args["k"], args["v"], args["page_ids"], args["offsets"])
