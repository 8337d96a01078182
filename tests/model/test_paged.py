"""The paged inference step: per-layer weights read in place (no layer weight copied or sliced in the compiled
step, the arena updated where it lies, one RoPE table for all layers), and the step's tokens equal to the dense
forward's."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.lora.adapters import LoRAConfig, init_lora
from harli_jax.model import ModelConfig, forward, init_params
from harli_jax.model.paged import ArenaLayout, TokenBatch, paged_step
from harli_jax.model.params import LoRAPair, layer_shapes
from harli_jax.model.sampling import SamplingRows

PAGE = 4
# An HLO instruction's result type and opcode: `%name = f32[64,128]{1,0} copy(...)`.
INSTRUCTION = re.compile(r"= (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w-]+)\(")


def _batch(cfg, lengths=(5, 4)):
    """A prefill chunk per sequence (positions 0 .. length-1), each sequence over its own pages."""
    rng = np.random.default_rng(0)
    positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    seq_index = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    tables = np.array([[1, 2, 0], [3, 4, 5]], np.int32)
    n = len(lengths)
    query_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return TokenBatch(tokens=rng.integers(3, cfg.vocab_size, len(positions)).astype(np.int32), positions=positions,
                      page_ids=tables[seq_index, positions // PAGE], offsets=positions % PAGE, block_tables=tables,
                      query_start=query_start, context_lens=np.array(lengths, np.int32),
                      sample_index=query_start[1:] - 1, max_query=max(lengths),
                      sampling=SamplingRows(np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                                            np.zeros(n, np.uint32), np.zeros(n, np.int32)))


def _lora(cfg):
    lora = init_lora(cfg, LoRAConfig(rank=2, alpha=4), seed=1)
    return {k: LoRAPair(p.a, 0.1 * jax.random.normal(jax.random.key(i), p.b.shape), p.scale)
            for i, (k, p) in enumerate(lora.items())}


# Instructions that name a value without computing it.
VIEWS = ("parameter", "get-tuple-element", "bitcast")


def values_of_shapes(hlo: str, shapes: set[tuple[int, ...]], opcodes: tuple[str, ...] | None = None) -> list[str]:
    """The instructions of `hlo` (fused computations included) that compute a value of one of `shapes`, size-1
    axes ignored (all but parameters and views, or only `opcodes`)."""
    found = []
    for line in hlo.splitlines():
        m = INSTRUCTION.search(line)
        if m and (m.group(3) in opcodes if opcodes else m.group(3) not in VIEWS):
            shape = tuple(int(d) for d in m.group(2).split(",") if d and d != "1")
            if shape in shapes:
                found.append(line.strip()[:160])
    return found


def test_compiled_step_reads_layer_weights_and_the_arena_in_place(tiny_yaml):
    cfg = ModelConfig.from_yaml(tiny_yaml).replace(num_layers=3)
    params, lora = init_params(cfg), _lora(cfg)
    layout = ArenaLayout(cfg, PAGE)
    arena = jax.ShapeDtypeStruct(layout.shape(6), jnp.float32)
    batch = _batch(cfg)
    weights = {s for s in layer_shapes(cfg).values() if len(s) == 2}
    activations = {(len(batch.tokens), cfg.hidden_size), (len(batch.tokens), cfg.q_size)}
    assert weights and not weights & activations  # the shapes the check looks for are only weights'
    step = jax.jit(paged_step, static_argnames=("cfg",), donate_argnames=("arena",))
    for adapters in (None, lora):
        lowered = step.lower(params, cfg, arena, batch, lora=adapters)
        # One RoPE table for every layer in the program (XLA:CPU may still recompute it inside its fusions).
        assert lowered.as_text().count("stablehlo.cosine") == 1
        hlo = lowered.compile().as_text()
        assert values_of_shapes(hlo, weights) == []  # no copy, slice or dynamic-slice of a weight, fused or not
        assert values_of_shapes(hlo, {layout.shape(6)}, ("copy",)) == []  # the donated arena is updated in place


def test_step_tokens_equal_the_dense_forward(tiny_yaml):
    cfg = ModelConfig.from_yaml(tiny_yaml).replace(num_layers=3)
    params = init_params(cfg, seed=0, init_std=0.1)
    rng = np.random.default_rng(1)
    arena = rng.standard_normal(ArenaLayout(cfg, PAGE).shape(6)).astype(np.float32)  # garbage in unused slots
    batch = _batch(cfg)
    step = jax.jit(paged_step, static_argnames=("cfg",))
    for adapters in (None, _lora(cfg)):
        new_arena, tokens = step(params, cfg, arena, batch, lora=adapters)
        want = []
        for s, n in enumerate((5, 4)):
            ids = np.asarray(batch.tokens)[batch.query_start[s]: batch.query_start[s + 1]][None]
            want.append(int(np.argmax(forward(params, cfg, jnp.asarray(ids), lora=adapters)[0, n - 1])))
        assert np.asarray(tokens).tolist() == want
        assert not np.allclose(new_arena, arena)  # the step wrote its K/V
