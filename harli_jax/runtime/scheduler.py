"""The inference scheduler (policy) and the only writer of request state.

`schedule()` decides the next step: which sequences run with how many tokens (continuous batching with chunked
prefill, decode first), whom to preempt when the arena is full, which prefilled K/V to import, which
trainer leases the page table took back to make room, and which resident adapter slot each admitted request's
adapter takes. A waiting request is admitted only when `admission` (the engine's admission control) says the step
with it keeps the promise made to the running ones. `update(plan, tokens, now)` applies the step's output:
it appends tokens, asks the output processor whether a request ends, finishes and frees it. `add`, `abort` and
`expire` (the queue timeout) are the other ways a request's state changes; all of them run on the engine thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from harli_jax.runtime.adapters import SlotTable
from harli_jax.runtime.arena import Owner, PageTable
from harli_jax.runtime.config import SchedulerConfig
from harli_jax.runtime.processing import OutputProcessor
from harli_jax.runtime.request import Event, FinishedEvent, FinishReason, SamplingParams, TokenEvent, TokenLogprob
from harli_jax.runtime.state import RequestState


class SeqWork(NamedTuple):
    """One sequence's part of a step: `tokens` at positions `start..`, written into its pages."""

    block_table: Sequence[int]
    tokens: Sequence[int]
    start: int
    sampling: SamplingParams
    counter: int  # tokens generated so far (the sampling RNG's position)
    adapter: str | None = None  # its LoRA adapter (None: the base model)
    adapter_slot: int = -1  # that adapter's resident slot


@dataclasses.dataclass
class StepPlan:
    """Everything one step needs: the sequences (their state and their work, in the same order), the K/V
    pages to import before it runs, who was preempted and which leases were reclaimed to make room."""

    states: list[RequestState] = dataclasses.field(default_factory=list)
    work: list[SeqWork] = dataclasses.field(default_factory=list)
    imports: list[tuple[list[int], np.ndarray]] = dataclasses.field(default_factory=list)
    preempted: list[RequestState] = dataclasses.field(default_factory=list)
    reclaimed: list[Owner] = dataclasses.field(default_factory=list)
    # A plan made ahead (`schedule_ahead`): per sequence, its index in the previous plan, whose output is its
    # input token (its `tokens` are a placeholder). Empty: every input token is known.
    previous: list[int] = dataclasses.field(default_factory=list)
    chunks: int = 0  # sequences that run a chunk of their prompt (what `prefill_interval` paces)

    @property
    def num_tokens(self) -> int:
        return sum(len(w.tokens) for w in self.work)

    @property
    def context(self) -> int:
        """Tokens of K/V the step attends, summed over its sequences."""
        return sum(w.start + len(w.tokens) for w in self.work)


Admission = Callable[[StepPlan, "RequestState", int], bool]  # may the plan take n more tokens of this sequence?


def admit_all(plan: StepPlan, seq: RequestState, n: int) -> bool:
    return True


class Scheduler:
    def __init__(self, page_table: PageTable, settings: SchedulerConfig, output: OutputProcessor,
                 adapter_slots: SlotTable | None = None, admission: Admission = admit_all,
                 adapter_ready: Callable[[str], bool] = lambda name: True):
        self.pages = page_table
        self.adapter_slots = adapter_slots
        self.adapter_ready = adapter_ready  # are an adapter's weights in host memory? (the catalogue reads them)
        self.admission = admission
        self.queue_timeout = settings.queue_timeout_s
        self.max_batch, self.prefill_chunk = settings.max_batch, settings.prefill_chunk
        self.max_prefill_seqs, self.prefill_interval = settings.max_prefill_seqs, settings.prefill_interval
        self._steps_without_prefill = settings.prefill_interval  # steps run since the last chunk (none yet)
        self.output = output
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []  # in admission order: the last is the youngest
        self._requests: dict[str, RequestState] = {}

    # Request state: the only writers -------------------------------------------------------------------------

    def add(self, state: RequestState, now: float) -> list[Event]:
        """Queues a request. One with prefilled K/V (the decode role) arrives with its first token, sampled
        by the prefill side: that is its first output."""
        self._requests[state.request_id] = state
        if state.prefilled is None:
            self.waiting.append(state)
            return []
        state.num_computed = len(state.prompt_ids)
        events = self._append(state, state.prefilled.first_token, now)
        if state.request_id in self._requests:
            self.waiting.append(state)
        return events

    def abort(self, request_id: str) -> list[Event]:
        """Finishes a request as aborted; nothing if it already finished."""
        state = self._requests.get(request_id)
        return [] if state is None else [self._finish(state, FinishReason.ABORTED)]

    def expire(self, now: float) -> list[Event]:
        """Refuses the waiting requests never admitted within the queue timeout (a preempted one keeps waiting, and
        so does one that arrived with its prompt's K/V: its first token is already out)."""
        if self.queue_timeout is None:
            return []
        late = [s for s in self.waiting if s.scheduled_time is None and not s.output_ids
                and now - s.arrival_time > self.queue_timeout]
        return [self._finish(s, FinishReason.REFUSED, f"not admitted within the queue timeout of "
                                                      f"{self.queue_timeout:g} s: the server is overloaded, retry "
                                                      f"later") for s in late]

    def reject_adapter(self, name: str, error: str) -> list[Event]:
        """Rejects the waiting requests that name adapter `name`, whose weights could not be read (`error`)."""
        return [self._finish(s, FinishReason.REJECTED, f"adapter {name!r} cannot be read: {error}")
                for s in [s for s in self.waiting if s.adapter == name]]

    def update(self, plan: StepPlan, tokens: Sequence[int], now: float,
               logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[Event]:
        """Applies a step's output: every sequence's K/V advanced; past its prompt, it gained one token (with
        its logprobs, `(token, top, top ids)` by planned sequence, for a request that asked for them)."""
        events: list[Event] = []
        self._steps_without_prefill = 0 if plan.chunks else self._steps_without_prefill + 1
        for i, (state, work, token) in enumerate(zip(plan.states, plan.work, tokens, strict=True)):
            if self._requests.get(state.request_id) is not state:
                continue  # it ended (a stop, an abort) after this plan was made ahead: its token is dropped
            state.num_computed += len(work.tokens)
            state.prefilled = None  # imported before the step ran
            if not state.num_pending:
                wanted = state.sampling.logprobs
                logprob = None if wanted is None or logprobs is None else TokenLogprob(
                    float(logprobs[0][i]), tuple(zip(logprobs[2][i, :wanted].tolist(),
                                                     logprobs[1][i, :wanted].tolist(), strict=True)))
                events.extend(self._append(state, int(token), now, logprob))
        return events

    def _append(self, state: RequestState, token: int, now: float,
                logprob: TokenLogprob | None = None) -> list[Event]:
        state.output_ids.append(token)
        state.token_times.append(now)
        state.logprobs.append(logprob)
        text, reason = self.output.new_token(state)
        events: list[Event] = [TokenEvent(state.request_id, token, len(state.output_ids) - 1, now, text, logprob)]
        if reason is not None:
            events.append(self._finish(state, reason))
        return events

    def _finish(self, state: RequestState, reason: FinishReason, error: str | None = None) -> FinishedEvent:
        if state in self.running:
            self.running.remove(state)
        elif state in self.waiting:
            self.waiting.remove(state)
        self.pages.free(state.owner)
        self._release_adapter(state)
        del self._requests[state.request_id]
        state.text = self.output.finished_text(state)
        return FinishedEvent(state.output(reason, error))

    def _preempt(self, seq: RequestState, plan: StepPlan) -> None:
        """Frees the sequence's pages; it waits at the front and recomputes its KV when readmitted."""
        self.running.remove(seq)
        self.pages.free(seq.owner)
        self._release_adapter(seq)
        seq.num_computed = 0
        seq.prefilled = None  # its pages are gone: the prompt is recomputed
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _acquire_adapter(self, seq: RequestState) -> bool:
        """Gives an admitted sequence its adapter's resident slot; False when every slot is in use or the
        adapter's weights are not in a slot or in host memory yet."""
        if seq.adapter is None:
            return True
        if not self.adapter_slots.holds(seq.adapter) and not self.adapter_ready(seq.adapter):
            return False
        slot = self.adapter_slots.acquire(seq.adapter)
        if slot is None:
            return False
        seq.adapter_slot = slot
        return True

    def drop_adapter(self, name: str) -> bool:
        """Frees the resident slot of adapter `name` for good (it is no longer served); False, and nothing changes,
        while a request that names it waits or runs."""
        if any(s.adapter == name for s in self._requests.values()):
            return False
        if self.adapter_slots is not None:
            self.adapter_slots.forget(name)
        return True

    def _release_adapter(self, seq: RequestState) -> None:
        if seq.adapter_slot >= 0:
            self.adapter_slots.release(seq.adapter)
            seq.adapter_slot = -1

    # Queries ------------------------------------------------------------------------------------------------

    def get(self, request_id: str) -> RequestState | None:
        return self._requests.get(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # Scheduling ---------------------------------------------------------------------------------------------

    def _grow(self, seq: RequestState, num_tokens: int, plan: StepPlan) -> bool:
        growth = self.pages.grow_kv(seq.request_id, num_tokens)
        plan.reclaimed.extend(growth.reclaimed)
        return growth.ok

    def _run(self, seq: RequestState, n: int, plan: StepPlan) -> None:
        plan.states.append(seq)
        plan.work.append(SeqWork(block_table=tuple(self.pages.block_table(seq.request_id)),
                                 tokens=seq.pending_ids(n), start=seq.num_computed, sampling=seq.sampling,
                                 counter=len(seq.output_ids), adapter=seq.adapter, adapter_slot=seq.adapter_slot))

    def schedule_ahead(self, plan: StepPlan) -> StepPlan | None:
        """The step after `plan`, made before `plan`'s tokens are known: the plan `schedule()` would make after
        `update(plan)`, except that a sequence whose token turns out to end it (a stop) is still in it and
        `update` drops its token. Only for a plan after which every running sequence decodes and nothing waits;
        None otherwise, or when a sequence would need pages that are not free (the plan then needs `plan`'s
        tokens: a preemption, an admission, a prefill chunk)."""
        index_of = {id(state): i for i, state in enumerate(plan.states)}
        if self.waiting or len(index_of) != len(self.running) or any(id(s) not in index_of for s in self.running):
            return None
        order = [index_of[id(state)] for state in self.running]  # the order `schedule()` takes them in
        computed = {i: plan.work[i].start + len(plan.work[i].tokens) for i in order}
        if any(computed[i] < len(plan.states[i].prompt_ids) for i in order):
            return None  # one is still prefilling after `plan`
        ahead = StepPlan()
        for index in order:
            state = plan.states[index]
            generated = len(state.output_ids) + 1
            if generated >= state.sampling.max_tokens:
                continue  # `plan`'s token is its last
            growth = self.pages.grow_kv(state.request_id, computed[index] + 1)
            ahead.reclaimed.extend(growth.reclaimed)
            if not growth.ok:
                return None
            ahead.states.append(state)
            ahead.work.append(SeqWork(block_table=tuple(self.pages.block_table(state.request_id)), tokens=(0,),
                                      start=computed[index], sampling=state.sampling, counter=generated,
                                      adapter=state.adapter, adapter_slot=state.adapter_slot))
            ahead.previous.append(index)
        return ahead

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        # 1. Decode: one token for every sequence past its prompt; preempt the youngest when pages run out.
        for seq in [s for s in self.running if s.num_pending == 1]:
            if seq not in self.running:
                continue
            while not self._grow(seq, seq.num_computed + 1, plan):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq in self.running:
                self._run(seq, 1, plan)
        # 2. Prefill: continue partly prefilled sequences, then admit waiting ones, within the chunk budget and
        # the number of sequences that may prefill in one step; while others decode, prompt chunks run every
        # `prefill_interval` steps (admitting a request whose K/V was imported is no chunk: it is not paced).
        paced = bool(plan.work) and self._steps_without_prefill + 1 < self.prefill_interval
        budget, prefills = self.prefill_chunk, 0
        for seq in [s for s in self.running if s.num_pending > 1]:
            if paced or budget == 0 or prefills == self.max_prefill_seqs:
                break
            n = min(seq.num_pending, budget)
            if not self.admission(plan, seq, n) or not self._grow(seq, seq.num_computed + n, plan):
                continue
            self._run(seq, n, plan)
            budget, prefills, plan.chunks = budget - n, prefills + 1, plan.chunks + 1
        while (budget > 0 and prefills < self.max_prefill_seqs and self.waiting
               and len(self.running) < self.max_batch):
            seq = self.waiting[0]
            if paced and seq.prefilled is None:
                break
            n = min(seq.num_pending, budget)
            if self.running and not self.admission(plan, seq, n):
                break  # the running requests' TPOT or KV would suffer: it waits (first come, first admitted)
            if not self._acquire_adapter(seq):
                break  # its adapter waits for its weights, or for a resident slot no running request uses
            if not self._grow(seq, seq.num_computed + n, plan):
                self._release_adapter(seq)
                break  # new requests wait for memory; they never preempt running ones
            self.waiting.popleft()
            self.running.append(seq)
            if seq.scheduled_time is None:
                seq.scheduled_time = time.perf_counter()
            plan.chunks += seq.prefilled is None
            self._run(seq, n, plan)
            budget, prefills = budget - n, prefills + 1
        if not plan.work and self.running:
            # Every running sequence is stuck mid-prompt without pages: free the youngest so the rest go on.
            self._preempt(self.running[-1], plan)
            retry = self.schedule()
            retry.preempted[:0] = plan.preempted
            retry.reclaimed[:0] = plan.reclaimed
            return retry
        for seq, work in zip(plan.states, plan.work, strict=True):
            if seq.prefilled is not None:
                plan.imports.append((list(work.block_table[: len(seq.prefilled.kv)]), seq.prefilled.kv))
        return plan
