"""The engine loop: `step()` is schedule → execute → update, then the training window before the next step.

The scheduler (policy) plans each step and is the only writer of request state; the model runner (mechanism)
runs the compiled program; the co-locator trains in the slack. The next step is scheduled before the window
after this one is planned, so the window's budget uses its exact shape. While only serving, a decode step is
dispatched before the previous one's tokens are read back (its input tokens taken on the device), so the
host's work for a step overlaps the device's; a stop is then seen one step late and the extra token dropped.
Other threads `submit` and `abort` through messages that the engine thread applies at the start of a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from harli_jax.errors import ConfigError, HarliError
from harli_jax.logs import show_progress
from harli_jax.lora.adapters import load_peft, slot_weights
from harli_jax.model.loader import LoadedModel, load_model
from harli_jax.model.paged import ArenaLayout
from harli_jax.model.params import LoRASlots
from harli_jax.model.sharding import device_bytes, shard_params, tp_mesh
from harli_jax.runtime.adapters import AdapterCatalog, ServedAdapter, SlotTable
from harli_jax.runtime.arena import Arena, pages_from_memory
from harli_jax.runtime.colocator import CoLocator, PreparedJob
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.distributed import Peers
from harli_jax.runtime.finetune import FinetuneJob, JobHandle
from harli_jax.runtime.job import FinetuneRunner
from harli_jax.runtime.metrics import IdleTraining, StepLog, StepRecord
from harli_jax.runtime.predictor import LatencyPredictor
from harli_jax.runtime.processing import InputProcessor, OutputProcessor, RequestError
from harli_jax.runtime.request import (
    Event,
    FinishedEvent,
    FinishReason,
    GenerationOutput,
    PrefilledKV,
    Request,
    SamplingParams,
)
from harli_jax.runtime.runner import InFlight, ModelRunner
from harli_jax.runtime.scheduler import Scheduler, StepPlan

log = logging.getLogger("harli_jax")

__all__ = ["Engine", "RequestError"]


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, *, warmup: bool = True):
        show_progress()
        config = config or EngineConfig()
        cfg, params = model.cfg, model.params
        dtype, cache, scheduler = config.runner.dtype, config.cache, config.scheduler
        if dtype and dtype != cfg.dtype:
            cfg = cfg.replace(dtype=dtype)
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        self.cfg, self.config, self.tokenizer = cfg, config, model.tokenizer
        self.mesh = tp_mesh(cfg, config.parallel.tensor_parallel)  # None: one device
        self.peers = Peers() if jax.process_count() > 1 else None  # the other processes of a multi-process engine
        if self.peers is not None and config.adapters.max_loras:
            raise ConfigError("a multi-process engine serves the base model only: set max_loras to 0")
        params = shard_params(cfg, params, self.mesh)
        self.seq_len = cache.seq_len(cfg)
        layout = ArenaLayout(cfg, cache.page_tokens, self.mesh)
        num_pages = self._num_pages(layout, params)
        self.arena = Arena(layout, num_pages, cache.max_pages_per_seq(cfg))
        self.adapters = AdapterCatalog(self._read_adapter, config.adapters.adapters_in_memory)
        self.runner = ModelRunner(cfg, params, config, self.arena, self.adapters, self.peers)
        self.inputs = InputProcessor(cfg, model.tokenizer, self.seq_len, cache.page_tokens, self.arena.table.capacity,
                                     config.runner.max_logprobs)
        slots = SlotTable(config.adapters.max_loras) if config.adapters.max_loras else None
        self.scheduler = Scheduler(self.arena.table, scheduler, OutputProcessor(model.tokenizer), slots,
                                   adapter_ready=self.adapters.ready)
        self.colocation = CoLocator(cfg, config, self.scheduler, self.arena, self.runner)
        self.scheduler.admission = self.colocation.admits  # the co-locator owns the predictor and the SLO
        self.step_records = StepLog(config.runner.step_record_limit)
        self._next_plan: StepPlan | None = None  # scheduled after the last step, before its training window
        self._in_flight: InFlight | None = None  # a step dispatched ahead, its tokens not read yet
        self._async_dispatch = (config.runner.async_dispatch if config.runner.async_dispatch is not None
                                else jax.default_backend() != "cpu")
        self._last_end = 0.0  # when the last step's tokens were read
        self._messages: deque[tuple[str, object]] = deque()  # submits and aborts, applied by the engine thread
        self._live: set[str] = set()  # ids submitted and not yet finished
        self._lock = threading.Lock()  # guards _messages and _live
        self._ids = itertools.count()
        log.info("engine: %s, %d arena pages of %d tokens, max batch %d, prefill chunk %d, context %d%s",
                 cfg.name, num_pages, cache.page_tokens, scheduler.max_batch, scheduler.prefill_chunk, self.seq_len,
                 "" if self.mesh is None else f", tensor parallel over {self.mesh.size} devices")
        if warmup and (self.peers is None or self.peers.leader):
            self.runner.warmup()  # process 0's warm-up runs are announced: the others run them in `follow`
            self._calibrate_admission()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **kwargs) -> Engine:
        """An engine over an HF checkpoint directory or a GGUF file (`model.load_model`)."""
        config = config or EngineConfig()
        return cls(load_model(path, dtype=config.runner.dtype, tensor_parallel=config.parallel.tensor_parallel),
                   config, **kwargs)

    @classmethod
    def from_config(cls, yaml_path: str | Path, config: EngineConfig | None = None, seed: int = 0,
                    **kwargs) -> Engine:
        """An engine over a YAML model config with random weights from `seed`."""
        config = config or EngineConfig()
        return cls(load_model(yaml_path, dtype=config.runner.dtype, seed=seed,
                              tensor_parallel=config.parallel.tensor_parallel), config, **kwargs)

    def _num_pages(self, layout: ArenaLayout, params) -> int:
        config, cache = self.config, self.config.cache
        if cache.num_pages is not None:
            return cache.num_pages
        devices = jax.devices()[:config.parallel.tensor_parallel]
        if devices[0].platform == "cpu":
            per_page = layout.page_bytes
            # Room for every slot at full context twice over (the trainer leases the rest), within the budget.
            enough = 2 * config.scheduler.max_batch * cache.max_pages_per_seq(self.cfg) + 1
            return max(2, min(cache.cpu_arena_mb * 2**20 // per_page, enough))
        weights = sum(device_bytes(x) for x in jax.tree.leaves(params))  # on one device
        probe = ModelRunner(self.cfg, params, config, Arena(layout, 2, cache.max_pages_per_seq(self.cfg)))
        workspace = probe.compile(probe.buckets[-1]).memory_analysis().temp_size_in_bytes  # per device
        local = [d for d in devices if d.process_index == jax.process_index()]
        pages = pages_from_memory(layout, cache.memory_fraction, weights, workspace, local, len(devices))
        if jax.process_count() > 1:  # every process's arena the same: the least any process's memory holds
            pages = int(np.min(multihost_utils.process_allgather(np.int64(pages))))
        return pages

    # Co-location, finetuning and adapters --------------------------------------------------------------------

    @property
    def training(self) -> bool:
        """A finetune job is registered and running."""
        return self.colocation.training

    @property
    def predictor(self) -> LatencyPredictor:
        return self.colocation.predictor

    @property
    def idle_training(self) -> IdleTraining:
        return self.colocation.idle_training

    def calibrate(self) -> LatencyPredictor:
        """The predictor's calibration sweep (see `CoLocator.calibrate`)."""
        return self.colocation.calibrate()

    def time_decode_step(self, batch: int, runs: int = 7) -> float:
        """Median latency of a solo decode step of `batch` sequences at the longest context bucket."""
        return self.colocation.time_decode_step(batch, runs)

    def set_tpot_slo(self, tpot_slo_ms: float | None) -> None:
        """Sets the TPOT SLO that co-location protects from the next window on (e.g. one derived from a measured
        decode step); a job registered afterwards is calibrated for it."""
        colocation = dataclasses.replace(self.config.colocation, tpot_slo_ms=tpot_slo_ms)
        self.config = dataclasses.replace(self.config, colocation=colocation)
        self.colocation.config = self.config
        self._calibrate_admission()

    def _calibrate_admission(self) -> None:
        """Admission control under an SLO predicts every step: the predictor's sweep runs once if it has none."""
        if self.config.colocation.tpot_slo_ms and self.config.scheduler.admission and not self.predictor.step_coef:
            self.calibrate()

    def chunk_options(self) -> tuple[int, ...]:
        """Layers per training micro-step, each compiled at warm-up."""
        return self.colocation.chunks

    def prepare_finetune(self, job: FinetuneJob) -> PreparedJob:
        """A finetune job's data, training state (resumed from its checkpoint directory if it has one) and compiled
        programs, ready for `finetune`, which then compiles nothing. Any thread may call it while the engine
        serves (`harli serve` does so on a thread of its own)."""
        if self.peers is not None:
            raise ConfigError("finetune jobs run on a single-process engine (tensor parallel over its devices)")
        return self.colocation.prepare(FinetuneRunner(job, self.cfg, self.runner.params, self.tokenizer, self.arena))

    def finetune(self, job: FinetuneJob | PreparedJob, *, setup_between_steps: bool = False) -> JobHandle:
        """Registers a LoRA finetune job over this engine's weights and arena (prepared here unless
        `prepare_finetune` did it); returns its handle. The job trains whenever the engine steps without inference
        work, and in the slack of its steps (`handle.wait()` drives it). Its setup (each program's first run, the
        predictor's calibration) runs now, or with `setup_between_steps` one program after each engine step."""
        current = self.colocation.job
        if current is not None and not JobHandle(current, self).done():
            raise HarliError(f"job {current.job.name!r} is still registered; stop it first")
        prepared = job if isinstance(job, PreparedJob) else self.prepare_finetune(job)
        runner = prepared.runner
        self.colocation.register(prepared, setup_between_steps=setup_between_steps)
        log.info("finetune job %r: %d training samples, %s eval samples, %d optimizer steps", runner.job.name,
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

    def add_adapter(self, name: str, adapter: JobHandle | str | Path, base_model: str | None = None) -> str:
        """Makes a LoRA adapter servable as `name` (a request's `adapter`): a job's weights now (a snapshot: the
        job trains on, the served copy stays), or an HF PEFT directory. Adding one never recompiles: it takes a
        resident slot (`AdapterConfig.max_loras`) when a request first uses it. Any thread may call it."""
        served = self.config.adapters
        if not served.max_loras:
            raise ConfigError("this engine serves the base model only: set AdapterConfig.max_loras (e.g. "
                              "EngineConfig(max_loras=4)) to serve adapters")
        self.adapters.check_new(name)
        if isinstance(adapter, JobHandle):
            lora, weights, source = adapter.lora_config, adapter.adapters, None
        else:
            (lora, weights), source = load_peft(adapter, self.cfg), Path(adapter)
        self.adapters.add(ServedAdapter(name, lora, base_model, source), slot_weights(weights, self.runner.lora))
        log.info("serving adapter %r (rank %d on %s)", name, lora.rank, ", ".join(lora.targets))
        return name

    def _read_adapter(self, directory: Path) -> LoRASlots:
        """A served adapter's weights read again from its directory (`AdapterCatalog`)."""
        return slot_weights(load_peft(directory, self.cfg)[1], self.runner.lora)

    def remove_adapter(self, name: str) -> bool:
        """Stops serving adapter `name` (on the engine thread, between steps); False, and nothing changes, while a
        request that names it is queued, waiting or running (try again later)."""
        with self._lock:
            if self.adapters.get(name) is None:
                raise RequestError(f"unknown adapter {name!r}")
            if any(kind == "submit" and state.adapter == name for kind, state in self._messages):
                return False
            if not self.scheduler.drop_adapter(name):
                return False
            self.adapters.remove(name)
        self.runner.forget_adapter(name)
        self._next_plan = None  # it may have been made with the slot just freed
        log.info("no longer serving adapter %r", name)
        return True

    # Requests: any thread ------------------------------------------------------------------------------------

    def submit(self, request: Request | Sequence[int] | str, sampling: SamplingParams | None = None, *,
               prefilled_kv: PrefilledKV | None = None, arrival_time: float | None = None) -> str:
        """Queues a request (from any thread); returns its id. Raises RequestError for an invalid request (and
        queues nothing). It joins the scheduler at the start of the next step."""
        if not isinstance(request, Request):
            request = Request(prompt=request, sampling=sampling or SamplingParams())
        prefilled_kv = prefilled_kv if prefilled_kv is not None else request.prefilled_kv
        if prefilled_kv is not None and self.peers is not None:
            raise RequestError("a multi-process engine does not import prefilled K/V")
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        with self._lock:
            request_id = request.request_id or f"req-{next(self._ids)}"
            if request_id in self._live:
                raise RequestError(f"request id {request_id!r} is already in use")
            if request.adapter is not None and self.adapters.get(request.adapter) is None:
                known = self.adapters.names()
                raise RequestError(f"unknown adapter {request.adapter!r}; this engine serves "
                                   f"{', '.join(map(repr, known)) if known else 'no adapters'}")
            state = self.inputs.process(request, request_id, arrival, prefilled_kv)
            self._live.add(request_id)
            self._messages.append(("submit", state))
        return request_id

    def abort(self, request_id: str) -> None:
        """Stops a request (from any thread); its FinishedEvent (aborted) comes with the next step's events."""
        with self._lock:
            if request_id not in self._live:
                raise RequestError(f"unknown request id {request_id!r} (never submitted, or already finished)")
            self._messages.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    # The engine thread ---------------------------------------------------------------------------------------

    def follow(self) -> None:
        """On a process other than 0 of a multi-process engine: runs every step that process 0 announces, until it
        calls `release_followers`."""
        if self.peers is None or self.peers.leader:
            raise HarliError("follow() runs on the processes other than 0 of a multi-process engine")
        self.runner.follow()

    def release_followers(self) -> None:
        """On process 0 of a multi-process engine: tells the other processes that no more steps come (their
        `follow` returns); nothing on a single process."""
        if self.peers is not None and self.peers.leader:
            self.peers.release()

    def export_kv(self, request_id: str) -> PrefilledKV:
        """The K/V of a running request's prompt and its first token, for a decode engine to import. Call it
        between steps, on the engine thread."""
        if self.peers is not None:
            raise RequestError("a multi-process engine does not export K/V")
        state = self.scheduler.get(request_id)
        if state is None:
            raise RequestError(f"unknown request id {request_id!r}")
        if not state.output_ids or state.num_computed < len(state.prompt_ids):
            raise RequestError(f"request {request_id!r} has not finished its prefill yet")
        pages = self.arena.table.block_table(request_id)[: self.arena.table.pages_for_tokens(len(state.prompt_ids))]
        return PrefilledKV(prompt_ids=state.prompt_ids, first_token=state.output_ids[0],
                           kv=self.runner.read_pages(pages), page_tokens=self.config.cache.page_tokens)

    def _apply_messages(self) -> list[Event]:
        with self._lock:
            messages, self._messages = self._messages, deque()
        now = time.perf_counter()
        events: list[Event] = []
        for kind, payload in messages:
            events += self.scheduler.add(payload, now) if kind == "submit" else self.scheduler.abort(payload)
        if messages:
            self._next_plan = None  # made before these arrived
        return events

    def _done(self, events: list[Event]) -> list[Event]:
        finished = [e.request_id for e in events if isinstance(e, FinishedEvent)]
        if finished:
            with self._lock:
                self._live.difference_update(finished)
        return events

    def step(self) -> list[Event]:
        """One iteration: apply messages; run the scheduled step (or take the one in flight); dispatch the step
        after it before reading its tokens when that step can be made ahead (serving, no training); update the
        requests; then, unless a step is in flight, schedule the next step and the training window before it
        (or, with nothing to serve, train)."""
        events = self._apply_messages() + self.scheduler.expire(time.perf_counter())
        for name, error in self.adapters.take_failures().items():
            events += self.scheduler.reject_adapter(name, error)
        flight = self._in_flight
        if flight is None:
            plan = self._next_plan if self._next_plan is not None else self.scheduler.schedule()
            self._next_plan = None
            self.colocation.reclaimed(plan.reclaimed)
            if not plan.work:
                self.colocation.idle()
                return self._done(events)
            fused = self.colocation.fused_for(plan)
            self.colocation.observe_dispatch(plan, time.perf_counter())
            with jax.profiler.StepTraceAnnotation("inference", step_num=len(self.step_records)):
                flight = self.runner.dispatch(plan, fused=fused)
        self._in_flight = self._dispatch_ahead(flight)
        output = flight.output()
        end = time.perf_counter()
        start, self._last_end = max(flight.dispatched, self._last_end), end  # an ahead step waits for its previous
        fused_ran = self.colocation.fused_finished(flight, end - start) if flight.fused is not None else ""
        events += self.scheduler.update(flight.plan, output.tokens, end, output.logprobs)
        ahead = self._in_flight
        if ahead is not None and not any(self.scheduler.get(s.request_id) is s for s in ahead.plan.states):
            self._in_flight = None  # every sequence of the step ahead just ended: nothing to wait for
        window = {}
        if self._in_flight is None:
            self._next_plan = self.scheduler.schedule()
            self.colocation.reclaimed(self._next_plan.reclaimed)
            if flight.fused is None:  # a fused step is scored as such (fused_finished)
                window = self.colocation.after_step(flight.plan, output.bucket, end - start, self._next_plan)
            else:
                window = self.colocation.after_step(flight.plan, None, end - start, self._next_plan)
        self._record(flight.plan, output, start, end, {**window, "fused": fused_ran})
        return self._done(events)

    def _dispatch_ahead(self, flight: InFlight) -> InFlight | None:
        """Dispatches the step after `flight`, its input tokens taken on the device from `flight`'s output, when
        the scheduler can make it ahead and no training window goes between the two."""
        if not self._async_dispatch or self.colocation.training:
            return None
        ahead = self.scheduler.schedule_ahead(flight.plan)
        if ahead is None or not ahead.work:
            return None
        self.colocation.reclaimed(ahead.reclaimed)
        with jax.profiler.StepTraceAnnotation("inference", step_num=len(self.step_records) + 1):
            return self.runner.dispatch(ahead, flight)

    def _record(self, plan: StepPlan, output, start: float, end: float, window: dict) -> None:
        decode = sum(len(w.tokens) == 1 and w.counter > 0 for w in plan.work)
        contexts = [w.start + len(w.tokens) for w in plan.work]
        usage = self.arena.table.usage()
        bucket = output.bucket
        self.step_records.append(StepRecord(
            index=len(self.step_records), start=start, end=end, decode_seqs=decode,
            prefill_seqs=len(plan.work) - decode, prefill_tokens=plan.num_tokens - decode,
            total_context=sum(contexts), max_context=max(contexts), bucket_seqs=bucket.seqs,
            bucket_tokens=bucket.tokens, bucket_pages=bucket.pages, preempted=len(plan.preempted),
            pack_time=output.pack_time, kv_pages=usage["kv"], lease_pages=usage["lease"], free_pages=usage["free"],
            **window))

    # Front ends ---------------------------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[int] | Sequence[Sequence[int] | str],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | Sequence[str | None] | None = None) -> list[GenerationOutput]:
        """Runs the prompts to completion (with the named adapter, or one per prompt; None: the base model); an
        invalid prompt gets a `rejected` output with the reason. A single string or a single list of token ids
        is one prompt."""
        if isinstance(prompts, str) or (len(prompts) and not isinstance(prompts[0], (str, list, tuple))):
            prompts = [prompts]
        samplings = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(samplings) != len(prompts):
            raise RequestError(f"{len(samplings)} sampling params for {len(prompts)} prompts")
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(adapters) != len(prompts):
            raise RequestError(f"{len(adapters)} adapters for {len(prompts)} prompts")
        ids = [f"generate-{next(self._ids)}" for _ in prompts]
        requests = [Request(p, s or SamplingParams(), request_id=i, adapter=a)
                    for p, s, i, a in zip(prompts, samplings, ids, adapters, strict=True)]
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
            elif self.training:
                self.step()  # idle until the next arrival: train
            else:
                time.sleep(max(0.0, start + upcoming.arrival - time.perf_counter()))

    def _rejected(self, request: Request, arrival: float, error: str) -> GenerationOutput:
        prompt = tuple(request.prompt) if not isinstance(request.prompt, str) else ()
        return GenerationOutput(request_id=request.request_id or f"rejected-{next(self._ids)}", prompt_ids=prompt,
                                token_ids=(), text=None, finish_reason=FinishReason.REJECTED, arrival_time=arrival,
                                first_token_time=None, token_times=(), error=error)
