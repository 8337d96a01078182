"""The arena: its layout, the page table's ownership invariants under random submit/step/abort, and the trainer's
lease API."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from harli_jax import Engine, EngineConfig, RequestError, SamplingParams
from harli_jax.model import load_model
from harli_jax.model.config import ModelConfig
from harli_jax.model.paged import ArenaLayout
from harli_jax.runtime.arena import Arena, Growth, Owner, PageTable


@pytest.mark.parametrize("hidden,page_tokens", [(64, 16), (96, 4), (100, 3)])
def test_the_stash_view_holds_whole_rows_of_pages_and_hidden_states(hidden, page_tokens):
    tiny = ModelConfig.from_yaml("configs/models/tiny.yaml")
    layout = ArenaLayout(tiny.replace(hidden_size=hidden), page_tokens)
    arena = Arena(layout, num_pages=7, max_pages_per_seq=4)
    assert arena.buffer.shape == layout.shape(7) and arena.buffer.nbytes == 7 * layout.page_bytes
    rows = layout.stash_rows(arena.buffer)
    assert rows.shape[0] == 7 and rows.shape[1] * rows.shape[2] == layout.page_elements
    assert hidden % layout.stash_row == 0  # a hidden state is whole rows
    tokens = 24
    assert layout.stash_pages(tokens) * layout.page_elements >= tiny.num_layers * tokens * hidden
    assert (layout.stash_pages(tokens) - 1) * layout.page_elements < tiny.num_layers * tokens * hidden


def test_programs_hand_the_buffer_back_to_its_one_owner():
    layout = ArenaLayout(ModelConfig.from_yaml("configs/models/tiny.yaml"), 4)
    arena = Arena(layout, num_pages=3, max_pages_per_seq=2)
    old = arena.buffer
    assert arena.update(lambda buffer: (buffer + 1, "out")) == "out"
    assert arena.buffer is not old and float(arena.buffer.min()) == 1.0


def test_lease_respects_the_watermark_and_growth_returns_what_it_reclaimed():
    table = PageTable(num_pages=11, page_tokens=4, max_pages_per_seq=8)
    assert table.lease("a", 3, watermark=5) == [1, 2, 3]
    assert table.lease("b", 3, watermark=5) is None  # would leave 4 < 5 free
    assert table.lease("b", 2, watermark=5) == [4, 5]
    assert table.usage() == {"free": 5, "kv": 0, "lease": 5}
    assert table.grow_kv("r1", 4 * 3) == Growth(True)  # fits in the free pages: no lease is touched
    grown = table.grow_kv("r1", 4 * 7)  # 4 more pages, 2 free: the newest lease goes
    assert grown == Growth(True, (Owner("lease", "b"),)) and table.reclaims == 1
    failed = table.grow_kv("r2", 4 * 9)  # not enough even with every lease: still, KV comes first
    assert not failed and failed.reclaimed == (Owner("lease", "a"),)
    assert table.release("a") == 0
    table.check_invariants()
    assert table.usage() == {"free": 3, "kv": 7, "lease": 0}


def test_the_null_page_is_never_handed_out():
    table = PageTable(num_pages=5, page_tokens=2, max_pages_per_seq=4)
    assert sorted(table.allocate(Owner("kv", "x"), 4)) == [1, 2, 3, 4]
    with pytest.raises(Exception, match="needs 1 pages, 0 free"):
        table.allocate(Owner("kv", "y"), 1)


@pytest.fixture(scope="module")
def tight_engine(tiny_yaml):
    config = EngineConfig(max_batch=3, prefill_chunk=8, max_seq_len=64, num_pages=10, page_tokens=8,
                          compile_threads=2)
    return Engine(load_model(tiny_yaml), config)


class EngineMachine(RuleBasedStateMachine):
    """Random submits, steps and aborts against a tiny arena; the page table stays consistent throughout."""

    engine: Engine = None

    def __init__(self):
        super().__init__()
        assert not self.engine.has_unfinished()  # the last example's teardown drained it
        self.live: set[str] = set()

    @rule(length=st.integers(1, 40), max_tokens=st.integers(1, 24), seed=st.integers(0, 3))
    def submit(self, length, max_tokens, seed):
        prompt = np.random.default_rng(seed).integers(3, 500, length).tolist()
        try:
            self.live.add(self.engine.submit(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        except RequestError:
            assert length + max_tokens > self.engine.seq_len

    @rule()
    def step(self):
        for event in self.engine.step():
            if hasattr(event, "output"):
                self.live.discard(event.request_id)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.engine.abort(rid)
        self.live.discard(rid)

    @invariant()
    def pages_are_consistent(self):
        table = self.engine.arena.table
        table.check_invariants()
        for state in self.engine.scheduler.running:
            assert len(table.block_table(state.request_id)) >= table.pages_for_tokens(state.num_computed)
        for state in self.engine.scheduler.waiting:
            assert state.num_computed == 0 or state.prefilled is not None

    def teardown(self):
        while self.engine.has_unfinished():
            self.engine.step()
        assert self.engine.arena.table.usage() == {"free": 9, "kv": 0, "lease": 0}


def test_page_table_invariants_under_random_traffic(tight_engine):
    EngineMachine.engine = tight_engine
    run_state_machine_as_test(EngineMachine, settings=settings(
        max_examples=12, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow]))
    assert sum(r.preempted for r in tight_engine.step_records) > 0, "the traffic never forced a preemption"
