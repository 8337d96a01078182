"""The inference scheduler (policy): which sequences run in the next step, with how many tokens each, and
whom to preempt when the arena is full. Continuous batching with chunked prefill; decode first."""

from __future__ import annotations

import dataclasses
from collections import deque

from harli_jax.runtime.arena import PageTable
from harli_jax.runtime.state import RequestState


@dataclasses.dataclass
class StepPlan:
    """The sequences of one step with the number of pending tokens each feeds, and who was preempted."""

    work: list[tuple[RequestState, int]] = dataclasses.field(default_factory=list)
    preempted: list[RequestState] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)


class Scheduler:
    def __init__(self, page_table: PageTable, max_batch: int, prefill_chunk: int):
        self.pages = page_table
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []  # in admission order: the last is the youngest

    def add(self, seq: RequestState) -> None:
        self.waiting.append(seq)

    def remove(self, seq: RequestState) -> None:
        """Drops a finished or aborted sequence and frees its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pages.free(seq.owner)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: RequestState, plan: StepPlan) -> None:
        """Frees the sequence's pages; it waits at the front and recomputes its KV when readmitted."""
        self.running.remove(seq)
        self.pages.free(seq.owner)
        seq.num_computed = 0
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        # 1. Decode: one token for every sequence past its prompt; preempt the youngest when pages run out.
        decoding = [s for s in self.running if s.num_pending == 1]
        for seq in list(decoding):
            if seq not in self.running:
                continue
            while not self.pages.grow_kv(seq.request_id, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq in self.running:
                plan.work.append((seq, 1))
        # 2. Prefill: continue partly prefilled sequences, then admit waiting ones, within the chunk budget.
        budget = self.prefill_chunk
        for seq in [s for s in self.running if s.num_pending > 1]:
            if budget == 0:
                break
            n = min(seq.num_pending, budget)
            if not self.pages.grow_kv(seq.request_id, seq.num_computed + n):
                continue
            plan.work.append((seq, n))
            budget -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if not self.pages.grow_kv(seq.request_id, seq.num_computed + n):
                break  # new requests wait for memory; they never preempt running ones
            self.waiting.popleft()
            self.running.append(seq)
            plan.work.append((seq, n))
            budget -= n
        if not plan.work and self.running:
            # Every running sequence is stuck mid-prompt without pages: free the youngest so the rest go on.
            self._preempt(self.running[-1], plan)
            retry = self.schedule()
            retry.preempted[:0] = plan.preempted
            return retry
        return plan
