"""Device-side sampling: greedy, top-k, top-p, temperature, seeds."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.model.sampling import SamplingRows
from harli_jax.model.sampling import sample as sample_eager

sample = jax.jit(sample_eager)


def _rows(n, temperature=1.0, top_k=0, top_p=1.0, seed=0, counter=None):
    return SamplingRows(temperature=jnp.full(n, temperature, jnp.float32), top_k=jnp.full(n, top_k, jnp.int32),
                        top_p=jnp.full(n, top_p, jnp.float32), seed=jnp.full(n, seed, jnp.uint32),
                        counter=jnp.arange(n, dtype=jnp.int32) if counter is None else jnp.asarray(counter))


LOGITS = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05], jnp.float32))


def test_greedy_and_top_k_1_take_the_argmax():
    logits = jnp.tile(LOGITS, (4, 1)).at[2].set(LOGITS[::-1])
    assert sample(logits, _rows(4, temperature=0.0)).tolist() == [0, 0, 3, 0]
    assert sample(logits, _rows(4, top_k=1)).tolist() == [0, 0, 3, 0]


def test_temperature_sampling_follows_the_distribution():
    n = 4000
    draws = np.asarray(sample(jnp.tile(LOGITS, (n, 1)), _rows(n)))
    freq = np.bincount(draws, minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_top_k_and_top_p_cut_the_tail():
    n = 2000
    logits = jnp.tile(LOGITS, (n, 1))
    assert set(np.asarray(sample(logits, _rows(n, top_k=2))).tolist()) == {0, 1}
    # top_p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it, so tokens 0 and 1 remain.
    top_p = np.asarray(sample(logits, _rows(n, top_p=0.7)))
    assert set(top_p.tolist()) == {0, 1}
    assert abs(np.mean(top_p == 0) - 0.5 / 0.8) < 0.04


def test_draws_depend_on_seed_and_counter_not_on_the_row():
    logits = jnp.tile(LOGITS, (3, 1))
    a = sample(logits, _rows(3, seed=7, counter=[5, 6, 7]))
    b = sample(logits[:1], _rows(1, seed=7, counter=[6]))
    assert int(a[1]) == int(b[0])
    many = [int(sample(LOGITS[None], _rows(1, seed=s, counter=[0]))[0]) for s in range(40)]
    assert len(set(many)) > 1


def test_a_draw_does_not_depend_on_how_its_cut_was_found():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((2, 300)), jnp.float32)
    for seed in range(20):
        alone = sample(logits[:1], _rows(1, top_k=5, seed=seed, counter=[seed]))  # lax.top_k
        rows = _rows(2, top_k=5, seed=seed, counter=[seed, 0])
        rows = dataclasses.replace(rows, top_p=rows.top_p.at[1].set(0.5))  # the other row needs the sort
        assert int(sample(logits, rows)[0]) == int(alone[0])
        assert int(alone[0]) in np.argsort(-np.asarray(logits[0]))[:5].tolist()
