"""Ragged paged attention: the reference against a dense float64 oracle, the Pallas kernel (interpret mode)
against the reference, garbage in free pages, consistency with decode attention, and the CUDA lowering."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import with_garbage
from harli_jax.kernels import (
    paged_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_pallas,
    ragged_paged_attention_reference,
)

LAYERS = 2
LAYER = 1
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def random_mix(rng, *, batch, max_query, max_context, long_rows=None):
    """Query and context lengths of a mixed step: chunks, single queries, idle and empty sequences.

    Sequences at or past `long_rows` get at most one query. Every mix has a full chunk, a decode token,
    a sequence with no query but a context and an empty sequence.
    """
    long_rows = batch if long_rows is None else long_rows
    query_lens, context_lens = [], []
    for b in range(batch):
        if b < long_rows:
            options = [0, 1, max_query, int(rng.integers(1, max_query + 1))]
            n = [max_query, 1, 0, 0][b] if b < 4 else int(rng.choice(options))
        else:
            n = int(rng.integers(0, 2))
        empty = b == 3 or (n == 0 and rng.random() < 0.3)
        query_lens.append(n)
        context_lens.append(0 if empty else int(rng.integers(max(n, 1), max_context + 1)))
    return query_lens, context_lens


def make_case(seed, *, query_lens, context_lens, tokens, q_heads, kv_heads, head_dim, page_tokens, max_pages,
              dtype, spare_pages=2):
    """A ragged step: dense K/V per sequence scattered into randomly permuted arena pages.

    The unused entries of the block tables name random pages (other sequences' or free ones). Returns the
    arena's valid tokens as a mask (everything else is free for garbage), the dense q/K/V and the call
    arguments; q has `tokens` rows, those past the last sequence's are padding.
    """
    rng = np.random.default_rng(seed)
    batch = len(query_lens)
    context = max_pages * page_tokens
    assert all(q <= c <= context or c == 0 for q, c in zip(query_lens, context_lens, strict=True))
    used = [math.ceil(n / page_tokens) for n in context_lens]
    num_pages = 1 + sum(used) + spare_pages
    page_ids = rng.permutation(np.arange(1, num_pages))
    block_tables = rng.integers(0, num_pages, (batch, max_pages)).astype(np.int32)
    k = rng.standard_normal((batch, context, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((batch, context, kv_heads, head_dim), np.float32)
    arena = np.zeros((num_pages, LAYERS, 2, kv_heads, page_tokens, head_dim), np.float32)
    valid = np.zeros(arena.shape, bool)
    next_page = 0
    for b, n in enumerate(context_lens):
        for p in range(used[b]):
            page = page_ids[next_page]
            next_page += 1
            block_tables[b, p] = page
            span = slice(p * page_tokens, min((p + 1) * page_tokens, n))
            count = span.stop - span.start
            arena[page, LAYER, 0, :, :count] = k[b, span].transpose(1, 0, 2)
            arena[page, LAYER, 1, :, :count] = v[b, span].transpose(1, 0, 2)
            valid[page, LAYER, :, :, :count] = True
    query_start = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    assert query_start[-1] <= tokens
    q = rng.standard_normal((tokens, q_heads, head_dim), np.float32)

    def cast(x):  # round through the dtype so the dense oracle sees exactly the stored values
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))

    return dict(
        q=jnp.asarray(q, dtype),
        arena=jnp.asarray(arena, dtype),
        block_tables=jnp.asarray(block_tables),
        query_start=jnp.asarray(query_start),
        context_lens=jnp.asarray(context_lens, jnp.int32),
        valid=valid,
        dense=(cast(q), cast(k), cast(v)),
    )


def dense_oracle(q, k, v, query_start, context_lens):
    """Causal attention of each sequence's last queries over its un-paged K/V, in float64, token by token.

    A query with no key at or before its position (an empty sequence's) gets zeros.
    """
    tokens, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros((tokens, q_heads, head_dim))
    for b, n in enumerate(context_lens):
        query_len = query_start[b + 1] - query_start[b]
        for j in range(query_len):
            position = n - query_len + j
            for h in range(q_heads if position >= 0 else 0):
                keys = k[b, : position + 1, h // group].astype(np.float64)
                logits = keys @ q[query_start[b] + j, h] / math.sqrt(head_dim)
                weights = np.exp(logits - logits.max())
                out[query_start[b] + j, h] = weights / weights.sum() @ v[b, : position + 1, h // group]
    return out


@functools.cache
def jitted(fn, **kwargs):
    """One jitted function per (function, static arguments), so repeated calls reuse the compiled program."""
    return jax.jit(functools.partial(fn, **kwargs))


def call(fn, case, arena=None, **kwargs):
    arena = case["arena"] if arena is None else arena
    args = (case["q"], arena, jnp.int32(LAYER), case["block_tables"], case["query_start"], case["context_lens"])
    return jitted(fn, **kwargs)(*args)


def padding_rows(case):
    """The q rows past the last sequence's queries."""
    return np.arange(case["q"].shape[0]) >= int(case["query_start"][-1])


@pytest.mark.parametrize(
    "ratio,dtype,long_rows",
    [(1, jnp.float32, None), (2, jnp.bfloat16, 4), (4, jnp.float32, 5), (8, jnp.bfloat16, None)],
    ids=["gqa1-f32", "gqa2-bf16-long4", "gqa4-f32-long5", "gqa8-bf16"],
)
def test_reference_matches_dense_oracle(ratio, dtype, long_rows):
    batch, max_query, page_tokens, max_pages = 7, 8, 8, 5
    long_bound = batch if long_rows is None else long_rows
    tokens = long_bound * max_query + (batch - long_bound) + 3  # the mix's bound plus padding
    fn = functools.partial(ragged_paged_attention_reference, max_query=max_query, long_rows=long_rows)
    for seed in range(3):
        query_lens, context_lens = random_mix(np.random.default_rng(seed), batch=batch, max_query=max_query,
                                              max_context=page_tokens * max_pages, long_rows=long_rows)
        case = make_case(seed, query_lens=query_lens, context_lens=context_lens, tokens=tokens, q_heads=2 * ratio,
                         kv_heads=2, head_dim=32, page_tokens=page_tokens, max_pages=max_pages, dtype=dtype)
        expected = dense_oracle(*case["dense"], np.asarray(case["query_start"]), context_lens)
        for kind in ("nan", "huge"):
            out = call(fn, case, arena=with_garbage(case, kind))
            assert out.dtype == dtype and out.shape == case["q"].shape
            np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=TOLERANCE[dtype], rtol=0,
                                       err_msg=f"seed {seed}, garbage {kind}")
            np.testing.assert_array_equal(np.asarray(out)[padding_rows(case)], 0)


def test_reference_long_rows_changes_only_the_cost():
    """With the promise kept, long_rows < batch gives what long_rows = batch gives; decode steps use max_query 1."""
    query_lens, context_lens = [8, 3, 1, 0, 1, 1], [20, 3, 9, 7, 1, 40]
    case = make_case(5, query_lens=query_lens, context_lens=context_lens, tokens=16, q_heads=4, kv_heads=2,
                     head_dim=32, page_tokens=8, max_pages=5, dtype=jnp.float32)
    every = call(ragged_paged_attention_reference, case, max_query=8)
    for long_rows in (2, 3):
        np.testing.assert_allclose(np.asarray(call(ragged_paged_attention_reference, case, max_query=8,
                                                   long_rows=long_rows)), np.asarray(every), atol=1e-6)
    decode = make_case(6, query_lens=[1, 1, 0, 1], context_lens=[5, 40, 0, 17], tokens=4, q_heads=4, kv_heads=2,
                       head_dim=32, page_tokens=8, max_pages=5, dtype=jnp.float32)
    expected = dense_oracle(*decode["dense"], np.asarray(decode["query_start"]), [5, 40, 0, 17])
    for long_rows in (0, None):
        out = call(ragged_paged_attention_reference, decode, max_query=1, long_rows=long_rows)
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("block_pages", [1, 3, None], ids=["block1", "block3", "default"])
def test_reference_walks_blocks_of_any_size_over_contexts_up_to_8192(block_pages):
    # One step: prefill chunks at 8,192 and 130 tokens of context, decode tokens at 8,192, 2,047 and 1, an empty
    # sequence; free pages and unused block-table entries hold garbage.
    query_lens, context_lens = [8, 1, 1, 1, 8, 0], [8192, 8192, 1, 2047, 130, 0]
    case = make_case(7, query_lens=query_lens, context_lens=context_lens, tokens=sum(query_lens) + 3, q_heads=4,
                     kv_heads=2, head_dim=16, page_tokens=16, max_pages=512, dtype=jnp.float32)
    expected = dense_oracle(*case["dense"], np.asarray(case["query_start"]), context_lens)
    out = call(ragged_paged_attention_reference, case, arena=with_garbage(case, "nan"), max_query=8,
               block_pages=block_pages)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=2e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out)[padding_rows(case)], 0)


def test_reference_temp_memory_does_not_grow_with_the_block_table():
    """The reference walks each sequence's pages a block at a time, up to the longest context (read at run
    time): its temporaries are those of one block, whether the block table holds 16 pages or 1,024."""

    def temp_bytes(max_pages):
        args = (jax.ShapeDtypeStruct((40, 4, 32), jnp.float32),
                jax.ShapeDtypeStruct((64, LAYERS, 2, 2, 8, 32), jnp.float32),
                jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((6, max_pages), jnp.int32),
                jax.ShapeDtypeStruct((7,), jnp.int32), jax.ShapeDtypeStruct((6,), jnp.int32))
        fn = functools.partial(ragged_paged_attention_reference, max_query=16, long_rows=2)
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(16), temp_bytes(1024)
    table_growth = 2 * 6 * (1024 - 16) * 4  # the block table, padded to whole blocks: a copy or two
    assert large <= small + table_growth, (small, large)


# (GQA ratio, page_tokens, pages_per_block, block_q, dtype): one or several query blocks per sequence, a
# block size that does not divide max_query, a group that is not a power of two, the default tiling.
KERNEL_TILINGS = [
    (1, 8, 2, 8, jnp.float32),
    (2, 16, 1, 4, jnp.bfloat16),
    (4, 8, None, None, jnp.float32),
    (3, 16, 2, 3, jnp.bfloat16),
]


@pytest.mark.parametrize("ratio,page_tokens,pages_per_block,block_q,dtype", KERNEL_TILINGS,
                         ids=["gqa1-f32-one-block", "gqa2-bf16", "gqa4-f32-auto", "gqa3-bf16-odd-block"])
def test_kernel_matches_reference(ratio, page_tokens, pages_per_block, block_q, dtype):
    batch, max_query, max_pages = 4, 8, 64 // page_tokens
    tokens = batch * max_query + 2
    kernel = functools.partial(ragged_paged_attention_pallas, max_query=max_query, interpret=True,
                               block_q=block_q, pages_per_block=pages_per_block)
    for seed in range(2):
        query_lens, context_lens = random_mix(np.random.default_rng(10 + seed), batch=batch, max_query=max_query,
                                              max_context=page_tokens * max_pages)
        case = make_case(seed, query_lens=query_lens, context_lens=context_lens, tokens=tokens, q_heads=ratio,
                         kv_heads=1, head_dim=32, page_tokens=page_tokens, max_pages=max_pages, dtype=dtype)
        expected = call(ragged_paged_attention_reference, case, max_query=max_query)
        out = call(kernel, case)
        assert out.dtype == dtype and out.shape == case["q"].shape
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                                   atol=TOLERANCE[dtype], rtol=0, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(np.asarray(out)[padding_rows(case)], 0)
        for kind in ("nan", "huge"):
            np.testing.assert_array_equal(np.asarray(call(kernel, case, arena=with_garbage(case, kind))),
                                          np.asarray(out), err_msg=f"garbage ({kind}) in free pages changed it")


def test_single_queries_match_decode_attention():
    """A decode-only step (every query_len 1) is decode attention, on both paths and with a wider window."""
    context_lens = [1, 7, 8, 9, 0, 40]
    case = make_case(7, query_lens=[1] * 6, context_lens=context_lens, tokens=6, q_heads=4, kv_heads=2,
                     head_dim=32, page_tokens=8, max_pages=5, dtype=jnp.float32)
    arena = with_garbage(case, "nan")
    decode = jax.jit(paged_attention_reference)(case["q"], arena, jnp.int32(LAYER), case["block_tables"],
                                                case["context_lens"])
    np.testing.assert_allclose(np.asarray(call(ragged_paged_attention_reference, case, arena=arena, max_query=1)),
                               np.asarray(decode), atol=1e-6)
    np.testing.assert_allclose(np.asarray(call(ragged_paged_attention_reference, case, arena=arena, max_query=4)),
                               np.asarray(decode), atol=1e-6)
    kernel = call(ragged_paged_attention_pallas, case, arena=arena, max_query=1, interpret=True)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(decode), atol=2e-5)


def test_auto_is_the_kernel_on_gpu_else_the_reference_and_sm_scale_applies():
    case = make_case(8, query_lens=[3, 1], context_lens=[11, 17], tokens=5, q_heads=4, kv_heads=2, head_dim=32,
                     page_tokens=8, max_pages=3, dtype=jnp.float32)
    reference = call(ragged_paged_attention_reference, case, max_query=4)
    chosen = call(ragged_paged_attention, case, max_query=4, impl="pallas" if jax.default_backend() == "gpu"
                  else "reference")
    np.testing.assert_array_equal(np.asarray(call(ragged_paged_attention, case, max_query=4)), np.asarray(chosen))
    scaled = call(ragged_paged_attention, case, max_query=4, impl="pallas", sm_scale=0.5)
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(call(ragged_paged_attention_reference, case,
                                                                   max_query=4, sm_scale=0.5)), atol=2e-5)
    assert not np.allclose(np.asarray(scaled), np.asarray(reference), atol=1e-3)


def _args(**changes):
    args = dict(q=jnp.zeros((6, 4, 32)), arena=jnp.zeros((5, 2, 2, 2, 8, 32)), layer=jnp.int32(0),
                block_tables=jnp.zeros((2, 3), jnp.int32), query_start=jnp.zeros((3,), jnp.int32),
                context_lens=jnp.zeros((2,), jnp.int32))
    return {**args, **changes}


@pytest.mark.parametrize(
    "changes,kwargs,message",
    [
        (dict(q=jnp.zeros((6, 128))), {}, r"q must be \[tokens"),
        (dict(q=jnp.zeros((6, 4, 16))), {}, "head_dim of q"),
        (dict(q=jnp.zeros((6, 3, 32))), {}, "multiple of the arena's kv_heads"),
        (dict(q=jnp.zeros((6, 4, 32), jnp.bfloat16)), {}, "q dtype"),
        (dict(arena=jnp.zeros((5, 2, 3, 2, 8, 32))), {}, "arena must be"),
        (dict(block_tables=jnp.zeros((3, 3), jnp.int32)), {}, "block_tables must be"),
        (dict(context_lens=jnp.zeros((2,), jnp.float32)), {}, "context_lens must be int32"),
        (dict(context_lens=jnp.zeros((2, 1), jnp.int32)), {}, "context_lens must be int32"),
        (dict(query_start=jnp.zeros((2,), jnp.int32)), {}, r"query_start must be int32\[batch \+ 1=3\]"),
        (dict(query_start=jnp.zeros((3,), jnp.float32)), {}, "query_start must be int32"),
        (dict(layer=jnp.zeros((1,), jnp.int32)), {}, "layer must be an integer scalar"),
        ({}, dict(max_query=0), "max_query must be a positive"),
        ({}, dict(max_query=2.0), "max_query must be a positive"),
        ({}, dict(long_rows=3), "long_rows must be"),
        ({}, dict(long_rows=-1, impl="pallas"), "long_rows must be"),
        ({}, dict(impl="triton"), "unknown impl"),
        (dict(arena=jnp.zeros((5, 2, 2, 2, 6, 32))), dict(impl="pallas"), "power-of-two page_tokens"),
    ],
)
def test_bad_arguments_raise(changes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention(**_args(**changes), **{"max_query": 2, **kwargs})


@pytest.mark.parametrize("kwargs,message", [(dict(block_q=0), "block_q must be"),
                                            (dict(pages_per_block=1), "pages_per_block")])
def test_bad_tilings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention_pallas(**_args(), max_query=2, **kwargs)


def _cuda_lowering_available():
    try:
        import jax._src.pallas.triton.pallas_call_registration  # noqa: F401
    except ImportError:
        return False
    return True


def llama3_8b_step(batch, tokens, pages):
    """Llama-3-8B shapes: 32 query heads on 8 KV heads of 128, pages of 16, bf16."""
    return [
        jax.ShapeDtypeStruct((tokens, 32, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch * pages + 1, 32, 2, 8, 16, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((batch, pages), jnp.int32),
        jax.ShapeDtypeStruct((batch + 1,), jnp.int32),
        jax.ShapeDtypeStruct((batch,), jnp.int32),
    ]


@pytest.mark.skipif(
    not _cuda_lowering_available(),
    reason="this jaxlib ships no Triton MLIR bindings, so Pallas cannot lower for CUDA without a GPU",
)
@pytest.mark.parametrize("batch,tokens,max_query", [(32, 32 * 64, 64), (64, 64, 1)], ids=["mixed-chunks", "decode"])
def test_kernel_lowers_for_cuda_at_llama3_8b_shapes(batch, tokens, max_query):
    fn = functools.partial(ragged_paged_attention_pallas, max_query=max_query, interpret=False)
    text = jax.jit(fn).trace(*llama3_8b_step(batch, tokens, 128)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    # One program per (sequence, block of 16 queries x the GQA group of 4, KV head).
    assert f"grid_x = {batch} : i32, grid_y = {-(-max_query // 16)} : i32, grid_z = 8 : i32" in text
    # Queries are read and outputs stored in token order inside the kernel: nothing outside it gathers,
    # scatters or slices, and the zeroed output buffer is aliased, not copied into place.
    assert "gather" not in text and "scatter" not in text and "dynamic_slice" not in text
    assert "output_operand_aliases" in text
