"""The scheduler with no model, in vLLM's style: plans driven by hand-made step outputs. Prefill chunk budget,
decode first, preemption of the youngest, leases reclaimed for KV reported in the plan, finishing, and the
scheduler as the only writer of request state."""

import ast
from pathlib import Path

import numpy as np

from conftest import REPO
from harli_jax.runtime.arena import Owner, PageTable
from harli_jax.runtime.config import SchedulerConfig
from harli_jax.runtime.processing import OutputProcessor
from harli_jax.runtime.request import FinishedEvent, FinishReason, PrefilledKV, SamplingParams, TokenEvent
from harli_jax.runtime.scheduler import Scheduler
from harli_jax.runtime.state import RequestState

EOS = 2


def _state(rid, prompt_len, max_tokens=4, prefilled=None):
    return RequestState(request_id=rid, prompt_ids=tuple(range(10, 10 + prompt_len)),
                        sampling=SamplingParams(max_tokens=max_tokens), stop_ids=frozenset({EOS}), arrival_time=0.0,
                        prefilled=prefilled)


def _scheduler(num_pages=64, page_tokens=4, max_batch=4, prefill_chunk=8, max_prefill_seqs=4, prefill_interval=1,
               queue_timeout_s=None, **kwargs):
    table = PageTable(num_pages, page_tokens, max_pages_per_seq=16)
    settings = SchedulerConfig(max_batch=max_batch, prefill_chunk=prefill_chunk, max_prefill_seqs=max_prefill_seqs,
                               prefill_interval=prefill_interval, queue_timeout_s=queue_timeout_s)
    return Scheduler(table, settings, OutputProcessor(None), **kwargs), table


def _shape(plan):
    return [(s.request_id, len(w.tokens), w.start) for s, w in zip(plan.states, plan.work, strict=True)]


def test_prefill_chunk_budget_then_decode_first():
    sched, table = _scheduler()
    for rid, n in (("a", 5), ("b", 6), ("c", 10)):
        sched.add(_state(rid, n), now=0.0)
    plan = sched.schedule()
    assert _shape(plan) == [("a", 5, 0), ("b", 3, 0)]  # 8 prompt tokens per step; c waits
    assert list(plan.work[0].tokens) == list(range(10, 15)) and list(plan.work[0].block_table) == [1, 2]
    events = sched.update(plan, [7, 99], now=1.0)  # b is mid-prompt: its sampled token means nothing
    assert events == [TokenEvent("a", 7, 0, 1.0, None)]
    plan = sched.schedule()
    assert _shape(plan) == [("a", 1, 5), ("b", 3, 3), ("c", 5, 0)]  # decode first, then prefill
    assert list(plan.work[0].tokens) == [7] and plan.work[0].counter == 1
    sched.update(plan, [8, 9, 99], now=2.0)
    assert sched.get("b").output_ids == [9] and sched.get("c").num_computed == 5
    table.check_invariants()


def test_at_most_max_prefill_seqs_prefill_in_one_step():
    sched, table = _scheduler(max_prefill_seqs=2)
    for rid in "abc":
        sched.add(_state(rid, 2), now=0.0)
    plan = sched.schedule()
    assert _shape(plan) == [("a", 2, 0), ("b", 2, 0)]  # budget left for c, but two prefills already
    sched.update(plan, [7, 8], now=1.0)
    assert _shape(sched.schedule()) == [("a", 1, 2), ("b", 1, 2), ("c", 2, 0)]  # decodes do not count
    table.check_invariants()


def _step(sched):
    """Schedules a step and applies it (every sampled token 7); the plan."""
    plan = sched.schedule()
    sched.update(plan, [7] * len(plan.work), now=0.0)
    return plan


def test_prefill_chunks_are_paced_while_others_decode():
    sched, table = _scheduler(prefill_chunk=4, prefill_interval=3)
    sched.add(_state("a", 2, max_tokens=20), now=0.0)
    assert _shape(_step(sched)) == [("a", 2, 0)]  # nothing decodes: prefill at once
    sched.add(_state("b", 10), now=1.0)
    shapes = [_shape(_step(sched)) for _ in range(3)]
    assert shapes == [[("a", 1, 2)], [("a", 1, 3)], [("a", 1, 4), ("b", 4, 0)]]  # a chunk every third step
    kv = np.zeros((2, 1, 2, 1, 4, 8), np.float32)
    sched.add(_state("d", 6, prefilled=PrefilledKV(tuple(range(10, 16)), first_token=4, kv=kv, page_tokens=4)),
              now=2.0)
    shapes = [_shape(_step(sched)) for _ in range(4)]
    assert shapes == [[("a", 1, 5), ("d", 1, 6)],  # imported K/V is no chunk: admitted at once, not counted
                      [("a", 1, 6), ("d", 1, 7)], [("a", 1, 7), ("d", 1, 8), ("b", 4, 4)], [("a", 1, 8)]]
    sched.abort("a")
    assert _shape(_step(sched)) == [("b", 2, 8)]  # alone: no reason to wait
    table.check_invariants()


def test_update_finishes_on_max_tokens_and_stop_ids_and_frees_pages():
    sched, table = _scheduler()
    sched.add(_state("long", 3, max_tokens=2), now=0.0)
    sched.add(_state("eos", 3, max_tokens=10), now=0.0)
    sched.update(sched.schedule(), [5, EOS], now=1.0)
    assert sched.get("eos") is None and sched.get("long").output_ids == [5]
    events = sched.update(sched.schedule(), [6], now=2.0)
    assert [type(e) for e in events] == [TokenEvent, FinishedEvent]
    assert events[1].output.finish_reason is FinishReason.LENGTH and events[1].output.token_ids == (5, 6)
    assert events[1].output.token_times == (1.0, 2.0)
    assert not sched.has_work() and table.usage() == {"free": 63, "kv": 0, "lease": 0}


def test_eos_does_not_end_a_request_before_min_tokens():
    sched, _ = _scheduler()
    state = _state("m", 3, max_tokens=10)
    state.sampling = SamplingParams(max_tokens=10, min_tokens=2)
    sched.add(state, now=0.0)
    sched.update(sched.schedule(), [EOS], now=1.0)  # the first token: EOS is not a stop yet
    assert sched.get("m").output_ids == [EOS]
    events = sched.update(sched.schedule(), [EOS], now=2.0)  # the second may stop
    assert events[-1].output.finish_reason is FinishReason.STOP and events[-1].output.token_ids == (EOS, EOS)
    assert SamplingParams(max_tokens=2, min_tokens=3).problems() == ["min_tokens (3) must not exceed max_tokens (2)"]


def test_abort_finishes_once():
    sched, table = _scheduler()
    sched.add(_state("a", 3), now=0.0)
    sched.update(sched.schedule(), [5], now=1.0)
    (event,) = sched.abort("a")
    assert event.output.finish_reason is FinishReason.ABORTED and event.output.token_ids == (5,)
    assert sched.abort("a") == [] and table.usage()["kv"] == 0


def test_the_youngest_is_preempted_and_waits_at_the_front():
    # 4 usable pages of 4 tokens: two sequences of 7 tokens fill them; the next decode token needs a page.
    sched, table = _scheduler(num_pages=5, prefill_chunk=16)
    sched.add(_state("old", 7, max_tokens=8), now=0.0)
    sched.add(_state("young", 7, max_tokens=8), now=0.0)
    sched.update(sched.schedule(), [1, 1], now=1.0)
    plan = sched.schedule()  # both decode at position 7: 8 tokens, still 2 pages each
    sched.update(plan, [1, 1], now=2.0)
    plan = sched.schedule()  # position 8 needs a third page for old: young gives its pages up
    assert [s.request_id for s in plan.preempted] == ["young"]
    assert _shape(plan) == [("old", 1, 8)]
    young = sched.get("young")
    assert young.num_computed == 0 and young.preemptions == 1 and sched.waiting[0] is young
    assert table.block_table("young") == [] and len(table.block_table("old")) == 3
    table.check_invariants()


def test_leases_reclaimed_for_kv_are_in_the_plan():
    sched, table = _scheduler(num_pages=9, prefill_chunk=12)
    assert table.lease("job-0", 3) and table.lease("job-1", 3)  # 6 of 8 pages leased, 2 free
    sched.add(_state("a", 12), now=0.0)  # 3 pages: the newest lease goes, the older stays
    plan = sched.schedule()
    assert plan.reclaimed == [Owner("lease", "job-1")] and _shape(plan) == [("a", 12, 0)]
    assert table.pages(Owner("lease", "job-0")) and not table.pages(Owner("lease", "job-1"))
    sched.update(plan, [5], now=1.0)
    assert sched.schedule().reclaimed == []  # the decode token fits the pages it has


def test_prefilled_kv_is_imported_with_the_first_decode_step():
    sched, table = _scheduler()
    kv = np.zeros((2, 1, 2, 1, 4, 8), np.float32)
    state = _state("d", 6, prefilled=PrefilledKV(tuple(range(10, 16)), first_token=4, kv=kv, page_tokens=4))
    events = sched.add(state, now=0.5)
    assert events == [TokenEvent("d", 4, 0, 0.5, None)] and state.num_computed == 6
    plan = sched.schedule()
    assert _shape(plan) == [("d", 1, 6)] and list(plan.work[0].tokens) == [4]
    assert [(pages, id(block)) for pages, block in plan.imports] == [(table.block_table("d")[:2], id(kv))]
    sched.update(plan, [5], now=1.0)
    assert state.prefilled is None and state.output_ids == [4, 5]
    assert sched.schedule().imports == []


STATE_FIELDS = {"output_ids", "token_times", "num_computed", "preemptions", "prefilled", "text"}


def test_only_the_scheduler_writes_request_state():
    """No module but the scheduler assigns, augments or appends to a RequestState field."""
    writers = set()
    for path in sorted((REPO / "harli_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "append", "extend", "pop", "clear", "insert"):
                targets = [node.func.value]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in STATE_FIELDS and not (
                        isinstance(target.value, ast.Name) and target.value.id == "self"):
                    writers.add(Path(path).relative_to(REPO).as_posix())
    assert writers == {"harli_jax/runtime/scheduler.py"}


def test_pending_ids_cross_from_prompt_into_output():
    state = _state("r", 5)
    state.output_ids = [6, 7, 8]
    tokens = [*state.prompt_ids, 6, 7, 8]
    for start in range(len(tokens) + 1):
        state.num_computed = start
        assert [state.pending_ids(n) for n in range(len(tokens) - start + 1)] == [
            tokens[start:start + n] for n in range(len(tokens) - start + 1)]


def test_admission_holds_waiting_requests_while_others_run_and_never_blocks_an_empty_batch():
    asked = []
    open_ = {"a"}  # the admission control's answer: only these may join while others run

    def admission(plan, seq, n):
        asked.append((seq.request_id, n, [s.request_id for s in plan.states]))
        return seq.request_id in open_

    sched, table = _scheduler(admission=admission)
    sched.add(_state("b", 3), now=0.0)
    plan = sched.schedule()
    assert _shape(plan) == [("b", 3, 0)] and asked == []  # nothing runs: admitted without asking
    sched.update(plan, [7], now=1.0)
    sched.add(_state("c", 2), now=1.0)
    sched.add(_state("a", 2), now=1.0)
    plan = sched.schedule()
    assert _shape(plan) == [("b", 1, 3)]  # c is refused for now, and a behind it waits: first come first admitted
    assert asked == [("c", 2, ["b"])] and [s.request_id for s in sched.waiting] == ["c", "a"]
    open_.add("c")
    sched.update(plan, [8], now=2.0)
    assert _shape(sched.schedule()) == [("b", 1, 4), ("c", 2, 0), ("a", 2, 0)]
    table.check_invariants()


def test_a_request_not_admitted_within_the_queue_timeout_is_refused_and_frees_nothing_it_never_held():
    sched, table = _scheduler(max_batch=1, queue_timeout_s=5.0)
    sched.add(_state("a", 3, max_tokens=8), now=0.0)
    plan = sched.schedule()
    sched.update(plan, [7], now=1.0)
    late = _state("b", 2)
    late.arrival_time = 1.0
    sched.add(late, now=1.0)
    assert sched.expire(5.9) == []  # waited 4.9 s
    [event] = sched.expire(6.5)
    output = event.output
    assert output.request_id == "b" and output.finish_reason is FinishReason.REFUSED and output.token_ids == ()
    assert "queue timeout of 5 s" in output.error
    assert sched.get("b") is None and not sched.waiting and sched.get("a") is not None
    table.check_invariants()


def test_a_preempted_request_waits_past_the_queue_timeout():
    sched, table = _scheduler(num_pages=4, page_tokens=4, prefill_chunk=16, queue_timeout_s=1.0)
    sched.add(_state("a", 4, max_tokens=8), now=0.0)
    sched.add(_state("b", 4, max_tokens=8), now=0.0)
    plan = sched.schedule()
    sched.update(plan, [7, 8], now=0.5)
    plan = sched.schedule()  # 3 pages: a's growth preempts b, the youngest
    assert [s.request_id for s in plan.preempted] == ["b"]
    assert sched.expire(10.0) == []  # it was admitted once: it is owed its output
    assert [s.request_id for s in sched.waiting] == ["b"]


def test_a_request_that_arrived_with_its_kv_waits_past_the_queue_timeout():
    sched, _ = _scheduler(max_batch=1, queue_timeout_s=1.0)
    sched.add(_state("a", 3, max_tokens=8), now=0.0)
    sched.update(sched.schedule(), [7], now=0.5)
    kv = np.zeros((2, 1, 2, 1, 4, 8), np.float32)
    [first] = sched.add(_state("d", 6, prefilled=PrefilledKV(tuple(range(10, 16)), first_token=4, kv=kv,
                                                            page_tokens=4)), now=0.5)
    assert first.token == 4  # its first token is out: refusing it now would take back what the client has
    assert sched.expire(10.0) == [] and [s.request_id for s in sched.waiting] == ["d"]
