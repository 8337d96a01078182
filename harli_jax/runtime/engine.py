"""The engine loop: requests in, one scheduling iteration per `step()`, tokens and finished outputs out.

The scheduler (policy) decides who runs, the page table (memory) who owns which page, the model runner
(mechanism) runs the compiled step program; the engine joins them and keeps the per-request state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
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
from harli_jax.runtime.arena import Owner, PageTable, page_bytes, pages_from_memory
from harli_jax.runtime.colocation import WindowContext, largest_chunk, make_policy, micro_sequence
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.finetune import FinetuneJob, FinetuneRunner, JobHandle
from harli_jax.runtime.metrics import IdleTraining, StepRecord
from harli_jax.runtime.predictor import LatencyPredictor
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
        self.idle_training = IdleTraining()
        self._requests: dict[str, RequestState] = {}
        self._inbox: deque[RequestState] = deque()  # submitted, not yet seen by the scheduler
        self._events: list[Event] = []  # produced outside a step (aborts), returned by the next one
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._job: FinetuneRunner | None = None
        self.predictor = LatencyPredictor(config.predictor_quantile)
        self.policy = make_policy(config.policy, self._micro_cost, self.chunk_options(),
                                  temporal_k=config.temporal_k, temporal_chunk=config.temporal_chunk,
                                  static_layers=config.static_layers, bank_cap=config.bank_cap)
        self._steps_since_train = 0
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
        runner.warmup(self.chunk_options() if self.config.policy != "decode-only" else ())
        if self.config.tpot_slo_ms:
            self.calibrate()
        log.info("finetune job %r: %d training samples, %s eval samples, %d optimizer steps", job.name,
                 len(runner.train_set), len(runner.eval_set) if runner.eval_set is not None else 0,
                 runner.total_steps)
        return JobHandle(runner, self)

    @contextlib.contextmanager
    def profile(self, directory: str | Path):
        """Records a JAX profiler session (Perfetto trace) while the block runs: inference steps are
        `StepTraceAnnotation("inference")`, training windows `train_micro_step` / `train_alone`, the policy's
        decisions `schedule`; inside the programs every block has a named scope."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(directory), create_perfetto_trace=True):
            yield Path(directory)

    def _micro_cost(self, kind) -> float:
        return self.predictor.micro(kind).bound

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
            if self.predictor.unfitted >= 64:  # refit off the serving path, while nothing is to be served
                self.predictor.fit()
            if self._job is not None and self._job.active:
                self._train_alone()
            return events
        start = time.perf_counter()
        with jax.profiler.StepTraceAnnotation("inference", step_num=len(self.step_records)):
            next_tokens, bucket, pack_time = self.runner.execute(work)
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
        key = (bucket.seqs, bucket.tokens, bucket.pages)
        self.predictor.observe_step(key, sum(contexts), end - start)
        window = self._train_window() if self._job is not None and self._job.active else {}
        if window.get("train"):
            self.predictor.observe_window(key, sum(contexts), window.pop("micro"), end - start + window["train_time"])
        window.pop("micro", None)
        usage = self.page_table.usage()
        self.step_records.append(StepRecord(
            index=len(self.step_records), start=start, end=end, decode_seqs=decode,
            prefill_seqs=len(work) - decode, prefill_tokens=sum(len(w.tokens) for w in work) - decode,
            total_context=sum(contexts), max_context=max(contexts), bucket_seqs=bucket.seqs,
            bucket_tokens=bucket.tokens, bucket_pages=bucket.pages, preempted=len(plan.preempted), pack_time=pack_time,
            kv_pages=usage["kv"], lease_pages=usage["lease"], free_pages=usage["free"], **window))
        return events

    # Co-location -------------------------------------------------------------------------------------------

    def _train_alone(self) -> None:
        """No request to serve: finish a micro-batch in flight, then train at full speed in one program."""
        job = self._job
        started, tokens = time.perf_counter(), job.tokens
        with jax.profiler.TraceAnnotation("train_alone"):
            if job.current is not None:
                while (pending := job.pending_micro_step()) is not None:
                    job.micro_step(largest_chunk(self.chunk_options(), pending[1]))
                if job.current is not None:  # abandoned: its lease was reclaimed
                    job.micro_step()
            else:
                job.train_microbatch()
        idle = self.idle_training
        idle.calls, idle.seconds = idle.calls + 1, idle.seconds + time.perf_counter() - started
        idle.tokens += job.tokens - tokens

    def _next_step_prediction(self) -> float:
        """Predicted bound of the next inference step, assuming a prefill chunk whenever a prompt waits."""
        running = self.scheduler.running
        waiting = bool(self.scheduler.waiting or self._inbox)
        prefill = waiting or any(s.num_pending > 1 for s in running)
        seqs = max(1, min(self.config.max_batch, len(running) + waiting))
        decode = sum(s.num_pending <= 1 for s in running)
        tokens = decode + (self.config.prefill_chunk if prefill else 0)
        pages = max((self.page_table.pages_for_tokens(s.num_computed + 1) for s in running), default=1)
        if prefill:
            pages = max(pages, self.page_table.pages_for_tokens(self.config.prefill_chunk))
        bucket = self.runner.bucket_for(seqs, tokens, min(pages, self.page_table.max_pages_per_seq))
        context = sum(s.num_computed + 1 for s in running)
        return self.predictor.step((bucket.seqs, bucket.tokens, bucket.pages), context).bound

    def _kv_reserve(self) -> int:
        """Pages the running and waiting requests may still need: the trainer leases only above it."""
        need = 0
        for state in [*self.scheduler.running, *self.scheduler.waiting, *self._inbox]:
            total = len(state.prompt_ids) + state.sampling.max_tokens
            need += self.page_table.pages_for_tokens(total) - len(self.page_table.block_table(state.request_id))
        return need

    def _train_window(self) -> dict:
        """The training micro-steps the policy puts after this inference step; their record fields."""
        job, config = self._job, self.config
        decided = time.perf_counter()
        slo = (config.tpot_slo_ms or 0.0) / 1e3
        if not slo and config.policy == "harli":
            return {}  # no SLO to protect: nothing is banked while requests run
        reserve = self._kv_reserve()
        held = len(self.page_table.pages(Owner("lease", job.current.lease_id))) if job.current is not None else 0
        can_start = self.page_table.num_free + held - job.stash_pages_needed() >= reserve
        deadlines = [s.token_times[0] + len(s.output_ids) * slo for s in self.scheduler.running
                     if s.output_ids and s.num_pending <= 1]
        ctx = WindowContext(now=decided, slo=slo, margin=slo * config.slo_margin,
                            next_step_bound=self._next_step_prediction() if slo else 0.0, deadlines=deadlines,
                            num_layers=self.cfg.num_layers, pending=job.pending_micro_step(), can_start=can_start,
                            inference_steps=self._steps_since_train)
        with jax.profiler.TraceAnnotation("schedule"):
            plan = self.policy.plan(ctx)
        decision_time = time.perf_counter() - decided
        ran, micro, train_time = [], [], 0.0
        for _, layers in plan.steps:
            if job.current is None and not job.start_microbatch(layers, watermark=reserve):
                break
            with jax.profiler.TraceAnnotation(f"train_micro_step layers={layers}"):
                done = job.micro_step(layers)
            if done == "abandoned":
                break
            ran.append(f"{done}:{layers}")
            micro.append((done, layers))
            train_time += job.last_micro_time
            self.predictor.observe_micro((done, layers), job.last_micro_time)
            if not job.active:
                break
        self._steps_since_train = 0 if ran else self._steps_since_train + 1
        return {"train": tuple(ran), "train_time": train_time, "budget": plan.budget, "predicted": plan.predicted,
                "decision_time": decision_time, "micro": micro}

    def calibrate(self) -> LatencyPredictor:
        """The predictor's calibration sweep: every inference program, and with a job every micro-step kind,
        timed `calibration_runs` times. Cached on disk by model, buckets, device, dtype and JAX version."""
        cache = self._calibration_file()
        loaded = LatencyPredictor.load(cache) if cache is not None else None
        if loaded is not None:
            log.info("predictor calibration loaded from %s", cache)
            self.predictor = loaded
            return loaded
        started = time.perf_counter()
        runs = self.config.calibration_runs
        with self._scratch_page() as page:
            for bucket in self.runner.buckets:
                for i in range(runs + 1):
                    context, seconds = self.runner.time_synthetic(bucket, seed=i, scratch_page=page)
                    if i:  # the first run of each program only warms it
                        self.predictor.observe_step((bucket.seqs, bucket.tokens, bucket.pages), context, seconds)
        job = self._job
        if job is not None and job.current is None:
            chunks = self.chunk_options()
            for chunk in chunks:
                for i in range(runs + 1):
                    if not job.start_microbatch(chunk, calibration=True):
                        break
                    for _, layers in micro_sequence(None, True, self.cfg.num_layers, chunk, chunks):
                        kind = job.micro_step(layers)
                        if i:  # the first micro-batch compiles the programs
                            self.predictor.observe_micro((kind, layers), job.last_micro_time)
        self.predictor.fit()
        log.info("predictor calibrated in %.1fs", time.perf_counter() - started)
        if cache is not None and job is not None:
            self.predictor.save(cache)
        return self.predictor

    @contextlib.contextmanager
    def _scratch_page(self):
        """A free page that synthetic timing batches write their K/V into (0, nothing written, if none is free)."""
        scratch = Owner("calibration", "scratch")
        page = self.page_table.allocate(scratch, 1)[0] if self.page_table.num_free else 0
        try:
            yield page
        finally:
            self.page_table.free(scratch)

    def time_decode_step(self, batch: int, runs: int = 7) -> float:
        """Median latency of a solo decode step of `batch` sequences at the longest context bucket."""
        bucket = self.runner.bucket_for(batch, batch, self.runner.page_buckets[-1])
        with self._scratch_page() as page:
            times = sorted(self.runner.time_synthetic(bucket, seed=i, scratch_page=page)[1] for i in range(runs))
        return times[len(times) // 2]

    def chunk_options(self) -> tuple[int, ...]:
        """Layers per micro-step, each compiled at warm-up: powers of two, all layers, and the chunk of the
        `static` or `temporal-K` policy. A micro-step over fewer layers than a chunk takes the largest that fits."""
        layers, config = self.cfg.num_layers, self.config
        sizes = {1 << i for i in range(layers.bit_length()) if 1 << i <= layers} | {layers}
        own = {"static": config.static_layers, "temporal-K": config.temporal_chunk}.get(config.policy)
        if own is not None and 0 < own <= layers:
            sizes.add(own)
        return tuple(sorted(sizes))

    def _calibration_file(self) -> Path | None:
        job = self._job
        key = json.dumps({"model": dataclasses.asdict(self.cfg), "engine": dataclasses.asdict(self.config),
                          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                          "job": None if job is None else [job.job.micro_batch_rows, job.job.seq_len,
                                                           dataclasses.asdict(job.job.lora)]},
                         sort_keys=True, default=str)
        root = Path(self.config.calibration_dir or Path.home() / ".cache" / "harli_jax")
        return root / f"predictor-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"

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
