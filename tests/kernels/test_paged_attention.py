"""Paged-attention decode: the reference against dense attention, the Pallas kernel (interpret mode)
against the reference, garbage in free pages, and the kernel's lowering for CUDA."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import with_garbage
from harli_jax.kernels import paged_attention, paged_attention_reference
from harli_jax.kernels.common import check_attention_args
from harli_jax.kernels.paged_attention_kernel import plan_kernel

LAYERS = 2
LAYER = 1
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def make_case(seed, *, lengths, q_heads, kv_heads, head_dim, page_tokens, max_pages, dtype, spare_pages=2):
    """A paged batch: dense K/V per sequence scattered into randomly permuted arena pages.

    Returns the arena's valid tokens as a mask (everything else is free for garbage), the dense K/V the
    pages hold and the call arguments.
    """
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    context = max_pages * page_tokens
    used = [math.ceil(n / page_tokens) for n in lengths]
    num_pages = 1 + sum(used) + spare_pages
    page_ids = rng.permutation(np.arange(1, num_pages))
    block_tables = np.zeros((batch, max_pages), np.int32)  # null-page padding
    k = rng.standard_normal((batch, context, kv_heads, head_dim), np.float32)
    v = rng.standard_normal((batch, context, kv_heads, head_dim), np.float32)
    arena = np.zeros((num_pages, LAYERS, 2, kv_heads, page_tokens, head_dim), np.float32)
    valid = np.zeros(arena.shape, bool)
    next_page = 0
    for b, n in enumerate(lengths):
        for p in range(used[b]):
            page = page_ids[next_page]
            next_page += 1
            block_tables[b, p] = page
            tokens = slice(p * page_tokens, min((p + 1) * page_tokens, n))
            count = tokens.stop - tokens.start
            arena[page, LAYER, 0, :, :count] = k[b, tokens].transpose(1, 0, 2)
            arena[page, LAYER, 1, :, :count] = v[b, tokens].transpose(1, 0, 2)
            valid[page, LAYER, :, :, :count] = True
    q = rng.standard_normal((batch, q_heads, head_dim), np.float32)

    def cast(x):  # round through the dtype so the dense oracle sees exactly the stored values
        return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))

    return dict(
        q=jnp.asarray(q, dtype),
        arena=jnp.asarray(arena, dtype),
        block_tables=jnp.asarray(block_tables),
        lengths=jnp.asarray(lengths, jnp.int32),
        valid=valid,
        dense=(cast(q), cast(k), cast(v)),
    )


def dense_attention(q, k, v, lengths):
    """Softmax attention over the un-paged K/V, in float64."""
    batch, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    out = np.zeros((batch, q_heads, head_dim))
    for b, n in enumerate(lengths):
        for h in range(q_heads):
            if n == 0:
                continue
            logits = k[b, :n, h // group].astype(np.float64) @ q[b, h] / math.sqrt(head_dim)
            weights = np.exp(logits - logits.max())
            out[b, h] = weights / weights.sum() @ v[b, :n, h // group]
    return out


def call(fn, case, arena=None, **kwargs):
    arena = case["arena"] if arena is None else arena
    args = (case["q"], arena, jnp.int32(LAYER), case["block_tables"], case["lengths"])
    return jax.jit(functools.partial(fn, **kwargs))(*args)


def length_sweep(page_tokens, max_pages):
    """Lengths 1, page-1, page, page+1, the maximum and 0, in one batch."""
    return [1, page_tokens - 1, page_tokens, page_tokens + 1, max_pages * page_tokens, 0]


# A covering array of (GQA ratio, page_tokens, head_dim, dtype): every pair of values appears at least once.
SWEEP = [
    (1, 8, 64, jnp.float32),
    (1, 16, 128, jnp.bfloat16),
    (2, 8, 128, jnp.bfloat16),
    (2, 16, 64, jnp.float32),
    (4, 8, 64, jnp.bfloat16),
    (4, 16, 128, jnp.float32),
    (8, 8, 128, jnp.float32),
    (8, 16, 64, jnp.bfloat16),
]
SWEEP_IDS = [f"gqa{r}-page{p}-dim{d}-{jnp.dtype(t).name}" for r, p, d, t in SWEEP]


@pytest.mark.parametrize("ratio,page_tokens,head_dim,dtype", SWEEP, ids=SWEEP_IDS)
def test_reference_matches_dense_attention(ratio, page_tokens, head_dim, dtype):
    max_pages = 4
    lengths = length_sweep(page_tokens, max_pages)
    case = make_case(0, lengths=lengths, q_heads=2 * ratio, kv_heads=2, head_dim=head_dim,
                     page_tokens=page_tokens, max_pages=max_pages, dtype=dtype)
    expected = dense_attention(*case["dense"], lengths)
    out = call(paged_attention_reference, case, arena=with_garbage(case, "nan"))
    assert out.dtype == dtype and out.shape == case["q"].shape
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=TOLERANCE[dtype], rtol=0)
    np.testing.assert_array_equal(np.asarray(out)[lengths.index(0)], 0)


@pytest.mark.parametrize("block_pages", [1, 3, None], ids=["block1", "block3", "default"])
def test_reference_walks_blocks_of_any_size_over_contexts_up_to_8192(block_pages):
    lengths = [8192, 1, 2047, 0, 130, 16]
    case = make_case(3, lengths=lengths, q_heads=8, kv_heads=2, head_dim=16, page_tokens=16, max_pages=512,
                     dtype=jnp.float32)
    out = call(paged_attention_reference, case, arena=with_garbage(case, "nan"), block_pages=block_pages)
    np.testing.assert_allclose(np.asarray(out, np.float64), dense_attention(*case["dense"], lengths), atol=2e-5,
                               rtol=0)
    np.testing.assert_array_equal(np.asarray(out)[lengths.index(0)], 0)


@pytest.mark.parametrize("ratio,page_tokens,head_dim,dtype", SWEEP, ids=SWEEP_IDS)
def test_kernel_matches_reference(ratio, page_tokens, head_dim, dtype):
    # Blocks of 16 tokens, two blocks per split: several splits, each looping over several blocks.
    max_pages = 8 if page_tokens == 8 else 4
    pages_per_block = 16 // page_tokens
    lengths = length_sweep(page_tokens, max_pages)
    case = make_case(1, lengths=lengths, q_heads=ratio, kv_heads=1, head_dim=head_dim,
                     page_tokens=page_tokens, max_pages=max_pages, dtype=dtype)
    kernel = functools.partial(paged_attention, impl="pallas", pages_per_block=pages_per_block,
                               pages_per_split=2 * pages_per_block)
    expected = call(paged_attention_reference, case)
    out = call(kernel, case)
    assert out.dtype == dtype and out.shape == case["q"].shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                               atol=TOLERANCE[dtype], rtol=0)
    np.testing.assert_array_equal(np.asarray(out)[lengths.index(0)], 0)
    for kind in ("nan", "huge"):
        np.testing.assert_array_equal(np.asarray(call(kernel, case, arena=with_garbage(case, kind))),
                                      np.asarray(out), err_msg=f"garbage ({kind}) in free pages changed the output")


@pytest.mark.parametrize(
    "q_heads,kv_heads,pages_per_block,pages_per_split,dtype",
    [
        (8, 2, None, None, jnp.float32),
        (4, 2, 2, 8, jnp.bfloat16),
        (4, 2, 2, 2, jnp.float32),
        (32, 1, 1, 3, jnp.float32),
    ],
    ids=["auto-plan", "one-split-bf16", "split-per-block", "group32-odd-split"],
)
def test_kernel_tilings_agree(q_heads, kv_heads, pages_per_block, pages_per_split, dtype):
    """Every split count (one split, the float32 merge of many, a last split that is cut short)."""
    page_tokens, max_pages = 16, 8
    lengths = [page_tokens * max_pages, 3 * page_tokens + 5, 0, 1]
    case = make_case(2, lengths=lengths, q_heads=q_heads, kv_heads=kv_heads, head_dim=64,
                     page_tokens=page_tokens, max_pages=max_pages, dtype=dtype)
    kernel = functools.partial(paged_attention, impl="pallas", pages_per_block=pages_per_block,
                               pages_per_split=pages_per_split)
    out = call(kernel, case, arena=with_garbage(case, "nan"))
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(call(paged_attention_reference, case), np.float32),
                               atol=TOLERANCE[dtype], rtol=0)


def test_kernel_handles_extreme_logits():
    """Logits far below 0 (a masked token's would-be logit) must not underflow the softmax to 0/0."""
    case = make_case(4, lengths=[1, 3], q_heads=2, kv_heads=1, head_dim=64, page_tokens=8, max_pages=2,
                     dtype=jnp.float32)
    _, k, v = case["dense"]
    q = case["q"].at[0].set(-jnp.asarray(k[0, 0]))  # the only logit of sequence 0 is about -64 * scale
    case = {**case, "q": q}
    kwargs = dict(sm_scale=50.0)
    out = call(paged_attention, case, impl="pallas", **kwargs)
    np.testing.assert_allclose(np.asarray(out[0]), np.broadcast_to(v[0, 0, 0], (2, 64)), atol=2e-5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(call(paged_attention_reference, case, **kwargs)),
                               atol=2e-5)


def test_plan_covers_every_page():
    dims = check_attention_args(*(jax.ShapeDtypeStruct(s, d) for s, d in [
        ((2, 8, 64), jnp.float32), ((9, 1, 2, 2, 8, 64), jnp.float32), ((), jnp.int32),
        ((2, 7), jnp.int32), ((2,), jnp.int32)]))
    plan = plan_kernel(dims)
    assert plan.pages_per_block * 8 >= 16 and plan.pages_per_split % plan.pages_per_block == 0
    assert plan.num_splits * plan.pages_per_split >= 7 > (plan.num_splits - 1) * plan.pages_per_split
    assert plan.group_pad == 16
    assert plan_kernel(dims, pages_per_split=6).pages_per_block == 2  # a block never straddles two splits
    big = dims._replace(batch=64, kv_heads=8, max_pages=128, page_tokens=16, head_dim=128, q_heads=32)
    assert plan_kernel(big).num_splits == 2  # 64 x 8 programs need one more split to fill the GPU


def test_auto_is_the_kernel_on_gpu_else_the_reference_and_sm_scale_applies():
    case = make_case(3, lengths=[5, 17], q_heads=4, kv_heads=2, head_dim=64, page_tokens=8, max_pages=3,
                     dtype=jnp.float32)
    chosen = call(paged_attention, case, impl="pallas" if jax.default_backend() == "gpu" else "reference")
    np.testing.assert_array_equal(np.asarray(call(paged_attention, case)), np.asarray(chosen))
    scaled = call(paged_attention, case, impl="pallas", sm_scale=0.5)
    np.testing.assert_allclose(np.asarray(scaled),
                               np.asarray(call(paged_attention_reference, case, sm_scale=0.5)), atol=2e-5)
    assert not np.allclose(np.asarray(scaled), np.asarray(call(paged_attention_reference, case)), atol=1e-3)


def _args(**changes):
    args = dict(q=jnp.zeros((2, 4, 64)), arena=jnp.zeros((5, 2, 2, 2, 8, 64)), layer=jnp.int32(0),
                block_tables=jnp.zeros((2, 3), jnp.int32), lengths=jnp.zeros((2,), jnp.int32))
    return {**args, **changes}


@pytest.mark.parametrize(
    "changes,kwargs,message",
    [
        (dict(q=jnp.zeros((2, 4, 32))), {}, "head_dim of q"),
        (dict(q=jnp.zeros((2, 3, 64))), {}, "multiple of the arena's kv_heads"),
        (dict(q=jnp.zeros((2, 4, 64), jnp.bfloat16)), {}, "q dtype"),
        (dict(arena=jnp.zeros((5, 2, 3, 2, 8, 64))), {}, "arena must be"),
        (dict(block_tables=jnp.zeros((3, 3), jnp.int32)), {}, "block_tables must be"),
        (dict(block_tables=jnp.zeros((2, 3), jnp.float32)), {}, "block_tables must be int32"),
        (dict(lengths=jnp.zeros((2,), jnp.float32)), {}, "lengths must be int32"),
        (dict(lengths=jnp.zeros((3,), jnp.int32)), {}, "lengths must be"),
        (dict(layer=jnp.zeros((1,), jnp.int32)), {}, "layer must be an integer scalar"),
        ({}, dict(impl="triton"), "unknown impl"),
        (dict(arena=jnp.zeros((5, 2, 2, 2, 6, 64))), dict(impl="pallas"), "power-of-two page_tokens"),
        ({}, dict(impl="pallas", pages_per_block=1), "pages_per_block"),
        ({}, dict(impl="pallas", pages_per_block=2, pages_per_split=3), "pages_per_split"),
    ],
)
def test_bad_arguments_raise(changes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paged_attention(**_args(**changes), **kwargs)


# Llama-3-8B decode: 32 query heads on 8 KV heads of 128, pages of 16, batch 64 with 128 pages each.
LLAMA3_8B_DECODE = [
    jax.ShapeDtypeStruct((64, 32, 128), jnp.bfloat16),
    jax.ShapeDtypeStruct((64 * 128 + 1, 32, 2, 8, 16, 128), jnp.bfloat16),
    jax.ShapeDtypeStruct((), jnp.int32),
    jax.ShapeDtypeStruct((64, 128), jnp.int32),
    jax.ShapeDtypeStruct((64,), jnp.int32),
]


def _cuda_lowering_available():
    try:
        import jax._src.pallas.triton.pallas_call_registration  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _cuda_lowering_available(),
    reason="this jaxlib ships no Triton MLIR bindings, so Pallas cannot lower for CUDA without a GPU",
)
@pytest.mark.parametrize("pages_per_split", [None, 128], ids=["split-k", "one-split"])
def test_kernel_lowers_for_cuda_at_llama3_8b_decode_shapes(pages_per_split):
    fn = functools.partial(paged_attention, impl="pallas", interpret=False, pages_per_split=pages_per_split)
    text = jax.jit(fn).trace(*LLAMA3_8B_DECODE).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    # The layer is read inside the kernel: nothing outside it slices or gathers the arena.
    assert "dynamic_slice" not in text and "gather" not in text
