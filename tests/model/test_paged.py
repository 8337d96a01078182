"""The paged inference step: per-layer weights read in place (no layer weight copied or sliced in the compiled
step, the arena updated where it lies, one RoPE table for all layers), and the step's tokens equal to the dense
forward's."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from conftest import resident_slots
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


def _lora(cfg, seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    lora = init_lora(cfg, LoRAConfig(rank=2, alpha=4, targets=targets), seed=seed)
    return {k: LoRAPair(p.a, 0.1 * jax.random.normal(jax.random.key(seed + i), p.b.shape), p.scale)
            for i, (k, p) in enumerate(lora.items())}


def _with_slots(batch, slots_by_seq):
    """`batch` with every token of sequence s in adapter slot `slots_by_seq[s]`."""
    lengths = np.diff(np.asarray(batch.query_start))
    return dataclasses.replace(batch, adapter_slots=np.repeat(np.asarray(slots_by_seq, np.int32), lengths))


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
    for adapters in (None, resident_slots(cfg, [lora, lora])):
        lowered = step.lower(params, cfg, arena, _with_slots(batch, [0, 1]), lora=adapters)
        # One RoPE table for every layer in the program (XLA:CPU may still recompute it inside its fusions).
        assert lowered.as_text().count("stablehlo.cosine") == 1
        hlo = lowered.compile().as_text()
        assert values_of_shapes(hlo, weights) == []  # no copy, slice or dynamic-slice of a weight, fused or not
        assert values_of_shapes(hlo, {layout.shape(6)}, ("copy",)) == []  # the donated arena is updated in place


def test_step_tokens_equal_the_dense_forward(tiny_yaml):
    """Each sequence of one step with its own adapter (or none) gives the dense forward's token with that adapter
    alone: adapters on different projections and of ranks under the slots' rank, through the resident slots."""
    cfg = ModelConfig.from_yaml(tiny_yaml).replace(num_layers=3)
    params = init_params(cfg, seed=0, init_std=0.1)
    rng = np.random.default_rng(1)
    arena = rng.standard_normal(ArenaLayout(cfg, PAGE).shape(6)).astype(np.float32)  # garbage in unused slots
    batch = _batch(cfg)
    step = jax.jit(paged_step, static_argnames=("cfg",))
    first, second = _lora(cfg, 1), _lora(cfg, 5, targets=("v_proj", "gate_proj", "down_proj"))
    slots = resident_slots(cfg, [first, second], rank=4)
    cases = [(None, [None, None]), (slots, [first, second]), (slots, [second, None]), (slots, [None, first])]
    for resident, adapters in cases:
        slot_of = [-1 if a is None else [first, second].index(a) for a in adapters]
        new_arena, tokens = step(params, cfg, arena, _with_slots(batch, slot_of), lora=resident)
        want = []
        for s, (n, adapter) in enumerate(zip((5, 4), adapters, strict=True)):
            ids = np.asarray(batch.tokens)[batch.query_start[s]: batch.query_start[s + 1]][None]
            logits = forward(params, cfg, jnp.asarray(ids), lora=adapter)[0, n - 1]
            want.append(int(np.argmax(logits)))
        assert np.asarray(tokens).tolist() == want, (slot_of, want)
        assert not np.allclose(new_arena, arena)  # the step wrote its K/V
    # The adapters change the tokens (the check above can tell them apart).
    ids = jnp.asarray(np.asarray(batch.tokens)[:5][None])
    assert len({int(np.argmax(forward(params, cfg, ids, lora=a)[0, 4])) for a in (None, first, second)}) > 1
