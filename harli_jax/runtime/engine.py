"""The engine loop: requests in, one scheduling iteration per `step()`, tokens and finished outputs out.

The scheduler (policy) decides who runs, the page table (memory) who owns which page, the model runner
(mechanism) runs the compiled step program; the engine joins them and keeps the per-request state.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from harli_jax.errors import HarliError
from harli_jax.lora.adapters import load_peft
from harli_jax.model.loader import LoadedModel, load_model
from harli_jax.runtime.arena import PageTable, page_bytes, pages_from_memory
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.finetune import FinetuneJob, FinetuneRunner, JobHandle
from harli_jax.runtime.metrics import StepRecord
from harli_jax.runtime.request import (
    Event,
    FinishedEvent,
    FinishReason,
    GenerationOutput,
    PrefilledKV,
    Request,
    SamplingParams,
    TokenEvent,
)
from harli_jax.runtime.runner import ModelRunner, SeqWork
from harli_jax.runtime.scheduler import Scheduler
from harli_jax.runtime.state import RequestState

log = logging.getLogger("harli_jax")


class RequestError(HarliError, ValueError):
    """A request that cannot be served as given; only that request is refused."""


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, *, warmup: bool = True):
        config = config or EngineConfig()
        cfg, params = model.cfg, model.params
        if config.dtype and config.dtype != cfg.dtype:
            cfg = cfg.replace(dtype=config.dtype)
            params = jax.tree.map(lambda x: x.astype(config.dtype), params)
        self.cfg, self.config, self.tokenizer = cfg, config, model.tokenizer
        self.seq_len = config.seq_len(cfg)
        num_pages = self._num_pages(params)
        self.page_table = PageTable(num_pages, config.page_tokens, config.max_pages_per_seq(cfg))
        self.runner = ModelRunner(cfg, params, config, num_pages)
        self.scheduler = Scheduler(self.page_table, config.max_batch, config.prefill_chunk)
        self.step_records: list[StepRecord] = []
        self._requests: dict[str, RequestState] = {}
        self._inbox: deque[RequestState] = deque()  # submitted, not yet seen by the scheduler
        self._events: list[Event] = []  # produced outside a step (aborts), returned by the next one
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._job: FinetuneRunner | None = None
        log.info("engine: %s, %d arena pages of %d tokens, max batch %d, prefill chunk %d, context %d",
                 cfg.name, num_pages, config.page_tokens, config.max_batch, config.prefill_chunk, self.seq_len)
        if warmup:
            self.runner.warmup()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **kwargs) -> Engine:
        """An engine over an HF checkpoint directory."""
        return cls(load_model(path, dtype=config.dtype if config else None), config, **kwargs)

    @classmethod
    def from_config(cls, yaml_path: str | Path, config: EngineConfig | None = None, seed: int = 0,
                    **kwargs) -> Engine:
        """An engine over a YAML model config with random weights from `seed`."""
        return cls(load_model(yaml_path, dtype=config.dtype if config else None, seed=seed), config, **kwargs)

    def _num_pages(self, params) -> int:
        config = self.config
        if config.num_pages is not None:
            return config.num_pages
        device = jax.devices()[0]
        if device.platform == "cpu":
            per_page = page_bytes(self.cfg, config.page_tokens, self.cfg.dtype)
            # Room for every slot at full context twice over (the trainer leases the rest), within the budget.
            enough = 2 * config.max_batch * config.max_pages_per_seq(self.cfg) + 1
            return max(2, min(config.cpu_arena_mb * 2**20 // per_page, enough))
        weights = sum(x.nbytes for x in jax.tree.leaves(params))
        probe = ModelRunner(self.cfg, params, config, num_pages=2)
        workspace = probe.compile(probe.buckets[-1]).memory_analysis().temp_size_in_bytes
        return pages_from_memory(self.cfg, config.page_tokens, self.cfg.dtype, config.memory_fraction,
                                 weights, workspace, device)

    # Finetuning and adapters -------------------------------------------------------------------------------

    def finetune(self, job: FinetuneJob) -> JobHandle:
        """Registers a LoRA finetune job over this engine's weights and arena; returns its handle at once.
        The job trains whenever the engine steps without inference work (`handle.wait()` drives it)."""
        if self._job is not None and not JobHandle(self._job, self).done():
            raise HarliError(f"job {self._job.job.name!r} is still registered; stop it first")
        runner = FinetuneRunner(job, self.cfg, self.runner.params, self.tokenizer, self.page_table, self.runner)
        self.page_table.on_reclaim = runner.on_reclaim
        self._job = runner
        log.info("finetune job %r: %d training samples, %s eval samples, %d optimizer steps", job.name,
                 len(runner.train_set), len(runner.eval_set) if runner.eval_set is not None else 0,
                 runner.total_steps)
        return JobHandle(runner, self)

    def use_adapter(self, adapter: JobHandle | str | Path | None) -> None:
        """Serves with a LoRA adapter: a job's current weights, an HF PEFT directory, or None for the base model.
        A new adapter shape recompiles the step programs."""
        if isinstance(adapter, JobHandle):
            lora = adapter.adapters
        elif adapter is None:
            lora = None
        else:
            lora = load_peft(adapter, self.cfg)[1]
        self.runner.set_lora(lora)
        self.runner.warmup()

    # Requests ----------------------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Sequence[int] | str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids")
            if not prompt:
                raise RequestError("the prompt is empty")
            return tuple(self.tokenizer.encode(prompt))
        ids = tuple(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise RequestError("prompt token ids must be integers")
        bad = [int(t) for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:8]} are outside the vocabulary (size {self.cfg.vocab_size})")
        return tuple(int(t) for t in ids)

    def submit(self, request: Request | Sequence[int] | str, sampling: SamplingParams | None = None, *,
               prefilled_kv: PrefilledKV | None = None, arrival_time: float | None = None) -> str:
        """Queues a request; returns its id. Raises RequestError for an invalid request (and queues nothing)."""
        if not isinstance(request, Request):
            request = Request(prompt=request, sampling=sampling or SamplingParams())
        s = request.sampling
        problems = s.problems()
        if problems:
            raise RequestError("; ".join(problems))
        prompt_ids = self._prompt_ids(request.prompt)
        if len(prompt_ids) + s.max_tokens > self.seq_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({s.max_tokens}) exceeds the "
                               f"context length {self.seq_len}")
        if self.page_table.pages_for_tokens(len(prompt_ids) + s.max_tokens) > self.page_table.capacity:
            raise RequestError(f"the request needs more pages than the arena has ({self.page_table.capacity})")
        stop_ids = set(s.stop_token_ids)
        if not s.ignore_eos:
            stop_ids |= set(self.cfg.eos_token_ids)
        with self._lock:
            request_id = request.request_id or f"req-{next(self._ids)}"
            if request_id in self._requests:
                raise RequestError(f"request id {request_id!r} is already in use")
            if prefilled_kv is not None:
                self._check_prefilled(prefilled_kv, prompt_ids)
            state = RequestState(request_id=request_id, prompt_ids=prompt_ids, sampling=s,
                                 stop_ids=frozenset(stop_ids),
                                 arrival_time=time.perf_counter() if arrival_time is None else arrival_time)
            self._requests[request_id] = state
            if prefilled_kv is None:
                self._inbox.append(state)
                return request_id
            # Decode role: the prompt's K/V is imported on admission; the first token was sampled by the
            # prefill side and is this request's first output.
            state.prefilled = prefilled_kv
            state.num_computed = len(prompt_ids)
            state.output_ids.append(prefilled_kv.first_token)
            state.token_times.append(time.perf_counter())
            self._events.append(TokenEvent(request_id, prefilled_kv.first_token, 0, state.token_times[0]))
            finished = self._check_finished(state)
            if finished:
                self._finish(state, *finished)
            else:
                self._inbox.append(state)
        return request_id

    def _check_prefilled(self, kv: PrefilledKV, prompt_ids: tuple[int, ...]) -> None:
        want = (self.page_table.pages_for_tokens(len(prompt_ids)), self.cfg.num_layers, 2, self.cfg.num_kv_heads,
                self.config.page_tokens, self.cfg.head_dim)
        if tuple(kv.prompt_ids) != prompt_ids:
            raise RequestError("prefilled_kv was computed for a different prompt")
        if kv.page_tokens != self.config.page_tokens or tuple(kv.kv.shape) != want:
            raise RequestError(f"prefilled_kv has shape {tuple(kv.kv.shape)} with page_tokens {kv.page_tokens}; "
                               f"this engine needs {want} with page_tokens {self.config.page_tokens}")
        if not 0 <= kv.first_token < self.cfg.vocab_size:
            raise RequestError(f"prefilled_kv.first_token {kv.first_token} is outside the vocabulary")

    def abort(self, request_id: str) -> None:
        """Stops a request; its FinishedEvent (aborted) comes with the next step's events."""
        with self._lock:
            state = self._requests.get(request_id)
            if state is None:
                raise RequestError(f"unknown request id {request_id!r} (never submitted, or already finished)")
            self._finish(state, FinishReason.ABORTED)

    def export_kv(self, request_id: str) -> PrefilledKV:
        """The K/V of a running request's prompt and its first token, for a decode engine to import."""
        state = self._requests.get(request_id)
        if state is None:
            raise RequestError(f"unknown request id {request_id!r}")
        if not state.output_ids or state.num_computed < len(state.prompt_ids):
            raise RequestError(f"request {request_id!r} has not finished its prefill yet")
        pages = self.page_table.block_table(request_id)[: self.page_table.pages_for_tokens(len(state.prompt_ids))]
        return PrefilledKV(prompt_ids=state.prompt_ids, first_token=state.output_ids[0],
                           kv=self.runner.read_pages(pages), page_tokens=self.config.page_tokens)

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self.scheduler.has_work() or self._events)

    # The loop ----------------------------------------------------------------------------------------------

    def _finish(self, state: RequestState, reason: FinishReason, error: str | None = None) -> None:
        """Caller holds the lock."""
        if state in self._inbox:
            self._inbox.remove(state)
        self.scheduler.remove(state)
        self._requests.pop(state.request_id, None)
        if self.tokenizer is not None and state.text is None:
            shown = state.output_ids[:-1] if reason is FinishReason.STOP and state.output_ids and \
                state.output_ids[-1] in state.stop_ids else state.output_ids
            state.text = self.tokenizer.decode(shown)
        self._events.append(FinishedEvent(state.output(reason, error)))

    def _check_finished(self, state: RequestState) -> tuple[FinishReason] | None:
        s = state.sampling
        if state.output_ids[-1] in state.stop_ids:
            return (FinishReason.STOP,)
        if s.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(state.output_ids)
            hits = [i for i in (text.find(stop) for stop in s.stop) if i >= 0]
            if hits:
                state.text = text[: min(hits)]
                return (FinishReason.STOP,)
        if len(state.output_ids) >= s.max_tokens:
            return (FinishReason.LENGTH,)
        return None

    def step(self) -> list[Event]:
        """One scheduling iteration: admit, run one step program, emit tokens and finished outputs."""
        with self._lock:
            while self._inbox:
                self.scheduler.add(self._inbox.popleft())
            plan = self.scheduler.schedule()
            for state, _ in plan.work:
                if state.prefilled is not None:
                    self.runner.write_pages(self.page_table.block_table(state.request_id)[: len(state.prefilled.kv)],
                                            state.prefilled.kv)
                    state.prefilled = None
            work = [SeqWork(block_table=self.page_table.block_table(state.request_id),
                            tokens=state.pending_ids(n), start=state.num_computed, sampling=state.sampling,
                            counter=len(state.output_ids)) for state, n in plan.work]
            events, self._events = self._events, []
        if not work:
            if self._job is not None and self._job.active:
                self._job.train_microbatch()
            return events
        start = time.perf_counter()
        next_tokens, bucket = self.runner.execute(work)
        end = time.perf_counter()
        with self._lock:
            decode = 0
            for (state, n), token in zip(plan.work, next_tokens, strict=True):
                decode += n == 1 and bool(state.output_ids)
                state.num_computed += n
                if state.num_pending or state.request_id not in self._requests:
                    continue  # mid-prompt, or aborted while the step ran
                state.output_ids.append(int(token))
                state.token_times.append(end)
                events.append(TokenEvent(state.request_id, int(token), len(state.output_ids) - 1, end))
                finished = self._check_finished(state)
                if finished:
                    self._finish(state, *finished)
            events.extend(self._events)
            self._events = []
        contexts = [w.start + len(w.tokens) for w in work]
        self.step_records.append(StepRecord(
            index=len(self.step_records), start=start, end=end, decode_seqs=decode,
            prefill_seqs=len(work) - decode, prefill_tokens=sum(len(w.tokens) for w in work) - decode,
            total_context=sum(contexts), max_context=max(contexts), bucket_seqs=bucket.seqs,
            bucket_tokens=bucket.tokens, bucket_pages=bucket.pages, preempted=len(plan.preempted)))
        return events

    # Front ends --------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """Runs the prompts to completion; an invalid prompt gets a `rejected` output with the reason."""
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(samplings) != len(prompts):
            raise RequestError(f"{len(samplings)} sampling params for {len(prompts)} prompts")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        requests = [Request(p, s or SamplingParams(), request_id=i) for p, s, i in zip(prompts, samplings, ids,
                                                                                        strict=True)]
        done = {e.request_id: e.output for e in self.serve(requests, realtime=False) if isinstance(e, FinishedEvent)}
        return [done[i] for i in ids]

    def serve(self, requests: Iterable[Request] = (), *, realtime: bool = True) -> Iterator[Event]:
        """Serves `requests` (each submitted once `arrival` seconds have passed since the start, when
        `realtime`) and whatever `submit()` adds meanwhile from other threads, until all have finished.
        Yields token events and finished outputs in the order they happen; invalid requests come back as
        `rejected` outputs."""
        start = time.perf_counter()
        pending = iter(requests)
        upcoming = next(pending, None)
        while True:
            now = time.perf_counter()
            while upcoming is not None and (not realtime or start + upcoming.arrival <= now):
                arrival = start + upcoming.arrival if realtime else now
                try:
                    self.submit(upcoming, arrival_time=arrival)
                except RequestError as e:
                    yield FinishedEvent(self._rejected(upcoming, arrival, str(e)))
                upcoming = next(pending, None)
            if self.has_unfinished():
                yield from self.step()
            elif upcoming is None:
                return
            elif self._job is not None and self._job.active:
                self.step()  # idle until the next arrival: train
            else:
                time.sleep(max(0.0, start + upcoming.arrival - time.perf_counter()))

    def _rejected(self, request: Request, arrival: float, error: str) -> GenerationOutput:
        prompt = tuple(request.prompt) if not isinstance(request.prompt, str) else ()
        return GenerationOutput(request_id=request.request_id or f"rejected-{next(self._ids)}", prompt_ids=prompt,
                                token_ids=(), text=None, finish_reason=FinishReason.REJECTED, arrival_time=arrival,
                                first_token_time=None, token_times=(), error=error)
