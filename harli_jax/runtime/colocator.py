"""Co-location as one collaborator of the engine: it owns the policy, the latency predictor and the finetune
job's training windows.

After each inference step, the engine has already scheduled the next one; the co-locator plans the training
micro-steps to run before it and the work fused into it (the policy's budget uses that exact next shape), runs
the micro-steps, hands the fused work to the engine for that step (`fused_for`), and scores both. With nothing
to serve it trains through the single program. A reclaimed lease abandons its micro-batch at once. It also
runs the predictor's calibration sweep, cached by what the timings depend on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import jax

from harli_jax.errors import ConfigError
from harli_jax.model.config import ModelConfig
from harli_jax.runtime.arena import Arena, Owner
from harli_jax.runtime.colocation import Sizes, WindowContext, advance, largest_chunk, make_policy
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.job import FinetuneRunner
from harli_jax.runtime.metrics import IdleTraining
from harli_jax.runtime.microbatch import FusedCall
from harli_jax.runtime.predictor import LatencyPredictor
from harli_jax.runtime.runner import Bucket, InFlight, ModelRunner
from harli_jax.runtime.scheduler import Scheduler, StepPlan
from harli_jax.runtime.state import RequestState

log = logging.getLogger("harli_jax")
CALIBRATION_SWEEP = 3  # what `calibrate` times, in the cache key: steps, micro-steps (each run timed), fused steps
_SETUP_DONE = object()  # what `next` gives once a job's setup has run its last program


@dataclasses.dataclass(frozen=True)
class PreparedJob:
    """A finetune job with its programs compiled for an engine (`CoLocator.prepare`): registering it compiles
    nothing."""

    runner: FinetuneRunner
    sizes: Sizes
    fuses: bool  # its work may ride in inference steps
    fused_programs: dict  # (bucket, kind, size): the compiled step program with that work fused in


def chunk_options(cfg: ModelConfig, config: EngineConfig) -> tuple[int, ...]:
    """Layers per micro-step, each compiled at warm-up: powers of two, all layers, and the chunk of the `static`
    or `temporal-K` policy. A micro-step over fewer layers than a chunk takes the largest that fits."""
    layers = cfg.num_layers
    sizes = {1 << i for i in range(layers.bit_length()) if 1 << i <= layers} | {layers}
    c = config.colocation
    own = {"static": c.static_layers, "temporal-K": c.temporal_chunk}.get(c.policy)
    if own is not None and 0 < own <= layers:
        sizes.add(own)
    return tuple(sorted(sizes))


def token_options(seq_len: int, given: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(positions per token chunk, those that ride in an inference step) for a job of `seq_len` positions: the
    halvings of `seq_len` down to an eighth, so any chunks cover the rows exactly, and the fused sizes `given`
    (unset: the smallest halving, one fused program per decode bucket; `bench/fused.py` measured the eighth and
    the quarter of small.yaml's 64 positions to cost alike per token-layer), each such a halving."""
    halvings = tuple(sorted({seq_len >> i for i in range(4) if seq_len % (1 << i) == 0}))
    fused = tuple(sorted(set(given))) or halvings[:1]
    bad = [n for n in fused if n not in halvings]
    if bad:
        raise ConfigError(f"CoLocationConfig.fused_tokens {bad} must each be seq_len ({seq_len}) halved 0 to 3 "
                          f"times: {halvings}")
    return halvings, fused


class CoLocator:
    def __init__(self, cfg: ModelConfig, config: EngineConfig, scheduler: Scheduler, arena: Arena,
                 runner: ModelRunner):
        self.cfg, self.config = cfg, config
        self.scheduler, self.page_table, self.runner = scheduler, arena.table, runner
        self.chunks = chunk_options(cfg, config)
        self.sizes = Sizes(self.chunks)
        self.predictor = LatencyPredictor(config.predictor.quantile)
        self.policy = self._make_policy()
        self.job: FinetuneRunner | None = None
        self.idle_training = IdleTraining()
        self._steps_since_train = 0
        self._fused: tuple[StepPlan, FusedCall] | None = None  # the work planned into the next step
        self._window_end = 0.0  # when the last window ended: the next dispatch's host work starts there
        self._window_plan: StepPlan | None = None  # the plan that window ran before
        self.fuses = False  # the job's work may ride in inference steps (set by `register`)
        self._setup = None  # the registered job's setup, while it has programs left to run (`_setup_runs`)

    def _make_policy(self):
        c = self.config.colocation
        return make_policy(c.policy, lambda kind: self.predictor.micro(kind).bound, self.sizes,
                           temporal_k=c.temporal_k, temporal_chunk=c.temporal_chunk, static_layers=c.static_layers,
                           bank_cap=c.bank_cap, cobatch_tokens=c.cobatch_tokens, cobatch_layers=c.cobatch_layers)


    @property
    def training(self) -> bool:
        return self.job is not None and self.job.active

    @property
    def trains_while_serving(self) -> bool:
        """The policy runs micro-steps or fused work between and in inference steps (decode-only trains only
        with nothing to serve, in the single program: it needs no micro-step program nor its timings)."""
        return self.config.colocation.policy != "decode-only"

    def prepare(self, job: FinetuneRunner) -> PreparedJob:
        """Compiles `job`'s programs for this engine's policy (every micro-step size and, for a policy that fuses,
        the fused step programs; only the training programs for one that never trains while serving). Any thread
        may call it while the engine serves: it reads the engine's state and changes none of it."""
        c = self.config.colocation
        # The policies that fuse (harli only when it has an SLO to train under): cobatch runs every micro-batch's
        # forward in token chunks (FlexLLM's co-serving), fused or alone; harli fuses forward windows of layers
        # (a micro-batch's forward in layer chunks either way). Both fuse backward slices.
        fuses = c.policy == "cobatch" or (c.policy == "harli" and bool(c.tpot_slo_ms))
        sizes = Sizes(self.chunks)
        layers = tuple(n for n in c.fused_layers if n <= self.cfg.num_layers)
        if c.policy == "cobatch":
            tokens, fused = token_options(job.job.seq_len, c.fused_tokens)
            sizes = Sizes(self.chunks, tokens, fused, layers)
        elif fuses:
            windows = tuple(n for n in layers if n < self.cfg.num_layers)  # the last layer runs with the loss
            sizes = Sizes(self.chunks, fused_layers=layers, fused_windows=windows)
        job.micro.token_chunks = job.micro.token_mode = c.policy == "cobatch"
        threads = self.config.runner.compile_threads or os.cpu_count() or 1
        if self.trains_while_serving:
            token_mode = job.micro.token_mode
            job.compile(sizes.layers, sizes.tokens if token_mode else (), forward=not token_mode,
                        compile_threads=threads)
        else:
            job.compile()
        programs = {}
        if fuses:
            shapes = [(phase, n) for phase in ("tokens", "forward", "backward") for n in sizes.fused_of(phase)]
            programs = self.runner.compile_fused_programs({shape: job.micro.fused_examples(*shape)
                                                           for shape in shapes})
        return PreparedJob(job, sizes, fuses, programs)

    def register(self, prepared: PreparedJob, setup_between_steps: bool = False) -> None:
        """Takes the prepared job. Its setup (each of its programs run once, a first run being slow, and under an
        SLO the predictor's calibration sweep) runs now, or with `setup_between_steps` one program at a time after
        each of the engine's steps; it trains once its setup is done."""
        if self._setup is not None:
            self._setup.close()
        self.job, self.sizes, self.fuses = prepared.runner, prepared.sizes, prepared.fuses
        self.policy = self._make_policy()
        self.runner.add_fused(prepared.fused_programs)
        self._setup = self._setup_runs()
        if not setup_between_steps:
            while self._setup_step():
                pass

    @property
    def setting_up(self) -> bool:
        """The registered job's setup has programs left to run (it trains after them)."""
        return self._setup is not None

    def _setup_step(self) -> bool:
        """Runs the next program of the job's setup; False when none is left (the setup is over)."""
        if self._setup is None:
            return False
        if next(self._setup, _SETUP_DONE) is _SETUP_DONE:
            self._setup = None
            return False
        return True

    def _setup_runs(self):
        """The job's setup, yielding after each program it runs: the timing micro-batches that run every micro-step
        program once, each fused program once, then the calibration."""
        if self.trains_while_serving:
            micro = self.job.micro
            for token_mode, sequence in self._warmup_sequences():
                if micro.current is None and micro.start(calibration=True, token_mode=token_mode):
                    for size in sequence:
                        if micro.current is None or micro.run(size).kind is None:
                            break
                        yield
                micro.abandon()
        if self.fuses:
            with self._scratch_page() as page:  # a program's first run is slow: not under the SLO
                yield from self._calibrate_fused(page, runs=0)
        if self.config.colocation.tpot_slo_ms:
            yield from self._calibration_runs()
        log.info("finetune job %r: set up", self.job.job.name)

    def _warmup_sequences(self) -> list[tuple[bool, list[int]]]:
        """(token mode, micro-step sizes) of a few timing micro-batches that together run every micro-step program
        the policy may once (a program is a phase's chunk size: its start is data), each step the largest size not
        yet run that fits, else the largest that fits: for 30 layers, 3 micro-batches of 1 to 5 steps a phase."""
        sizes, token_mode, layers = self.sizes, self.job.micro.token_mode, self.cfg.num_layers
        first = ("tokens", self.job.job.seq_len) if token_mode else ("forward", layers)
        missing = {(first[0], n) for n in sizes.of(first[0])} | {("backward", n) for n in sizes.layers}
        out = []
        while missing:
            phase, sequence = first, []
            while phase is not None:
                fits = [n for n in sizes.of(phase[0]) if n <= phase[1]]
                n = max([n for n in fits if (phase[0], n) in missing] or fits)
                missing.discard((phase[0], n))
                sequence.append(n)
                phase = advance(phase, n, layers)[1]
            out.append((token_mode, sequence))
        return out

    def _calibration_sequences(self) -> list[tuple[bool, list[int]]]:
        """(token mode, micro-step sizes) of timing micro-batches that together run every micro-step program the
        policy may, in the kind of forward its micro-batches run (layer chunks, or token chunks): the i-th cuts
        its phases into the i-th size of each (layer or token) option list, the rest in the largest that fits."""
        sizes, token_mode = self.sizes, self.job.micro.token_mode
        out = []
        for i in range(max(len(sizes.layers), len(sizes.tokens) if token_mode else 0)):
            phase = ("tokens", self.job.job.seq_len) if token_mode else ("forward", self.cfg.num_layers)
            seq = []
            while phase is not None:
                options = sizes.of(phase[0])
                n = largest_chunk(options, min(options[min(i, len(options) - 1)], phase[1]))
                seq.append(n)
                phase = advance(phase, n, self.cfg.num_layers)[1]
            out.append((token_mode, seq))
        return out

    def reclaimed(self, owners: list[Owner]) -> None:
        """The page table took these leases back for KV: the micro-batch that used one is abandoned now."""
        if self.job is not None:
            self.job.micro.reclaimed(owners)

    # Training -----------------------------------------------------------------------------------------------

    def idle(self) -> None:
        """No request to serve: refit the predictor (in the background) if it has news, then finish a micro-batch
        in flight or train one micro-batch at full speed in the single program."""
        self.predictor.refresh()
        if self.predictor.unfitted >= 64:
            self.predictor.fit_async()
        if not self.training or self._setup_step():
            return
        job = self.job
        started, tokens = time.perf_counter(), job.tokens
        with jax.profiler.TraceAnnotation("train_alone"):
            if job.micro.current is not None:
                job.micro.run_to_end(self.sizes.layers, self.sizes.tokens)
            else:
                job.train_microbatch()
        idle = self.idle_training
        idle.calls, idle.seconds = idle.calls + 1, idle.seconds + time.perf_counter() - started
        idle.tokens += job.tokens - tokens

    def after_step(self, plan: StepPlan, bucket: Bucket | None, seconds: float, next_plan: StepPlan) -> dict:
        """Scores the step (unless `bucket` is None: a fused step, scored by `fused_finished`), then runs the
        training window the policy puts before `next_plan` and plans the work fused into it; returns the
        window's fields of the step record."""
        self.predictor.refresh()
        if bucket is not None:
            self.predictor.observe_step((bucket.seqs, bucket.tokens, bucket.pages), plan.context, seconds)
        window = self._window(next_plan) if self.training and not self._setup_step() else {}
        micro = window.pop("micro", ())
        if micro and bucket is not None:
            key = (bucket.seqs, bucket.tokens, bucket.pages)
            self.predictor.observe_window(key, plan.context, micro, seconds + window["train_time"])
        if self.predictor.unfitted >= 256:  # under sustained load: refit off the serving loop
            self.predictor.fit_async()
        self._window_plan, self._window_end = next_plan, time.perf_counter()
        return window

    def observe_dispatch(self, plan: StepPlan, dispatched: float) -> None:
        """The host's work between the last window and the dispatch of `plan`, the step it ran before (scheduling,
        packing's start). A plan made after anything else (training while idle, a wait for requests, new
        messages) ends no such gap: that time is not the host's work between two steps, and counted as such it
        would inflate every bound the SLO is held with (admission would hold requests for seconds)."""
        if plan is self._window_plan:
            self.predictor.observe_host(dispatched - self._window_end)
        self._window_plan = None

    def fused_for(self, plan: StepPlan) -> FusedCall | None:
        """The finetune work planned into `plan`, if that plan is the one it was planned for and its micro-batch
        still holds its lease."""
        planned, self._fused = self._fused, None
        if planned is None or planned[0] is not plan or self.job is None or self.job.micro.status() is None:
            return None
        return planned[1]

    def fused_finished(self, flight: InFlight, seconds: float) -> str:
        """Takes a fused step's finetune results; returns what ran ("tokens:8" = a token chunk of 8 positions,
        "forward:1" a forward window of one layer)."""
        call, bucket = flight.fused, flight.bucket
        kind = self.job.micro.fused_done(call, flight.fused_out)
        self.predictor.observe_step((bucket.seqs, bucket.tokens, bucket.pages, call.kind, call.size),
                                    flight.plan.context, seconds)
        return f"{kind}:{call.size}"

    def _next_step_bound(self, next_plan: StepPlan) -> float:
        if not next_plan.work:
            return 0.0
        bucket = self.runner.bucket_of(next_plan)
        return self.predictor.step((bucket.seqs, bucket.tokens, bucket.pages), next_plan.context).bound + \
            self.predictor.host_bound()

    def _prefill_reserve(self, next_plan: StepPlan) -> float:
        """While requests decode and a prompt chunk is pending but not in `next_plan` (prefill is paced): how much
        longer that chunk's step is predicted to take than `next_plan`'s decode step."""
        scheduler = self.scheduler
        pending = any(s.num_pending > 1 for s in scheduler.running) or any(
            s.prefilled is None for s in scheduler.waiting)
        if next_plan.chunks or not next_plan.work or not pending:
            return 0.0
        decode = self.runner.bucket_of(next_plan)
        seqs = min(len(next_plan.work) + 1, self.config.scheduler.max_batch)
        mixed = self.runner.bucket_for(seqs, seqs + 1, decode.pages)
        chunk = self.config.scheduler.prefill_chunk
        extra = self.predictor.step((mixed.seqs, mixed.tokens, mixed.pages), next_plan.context + chunk).bound - \
            self.predictor.step((decode.seqs, decode.tokens, decode.pages), next_plan.context).bound
        return max(0.0, extra)

    def _fused_bound(self, next_plan: StepPlan):
        """The next step's bound with (kind, size) fused in: its own measurements, or before there are any the
        step's bound plus the same work as a micro-step (fusing never costs more than running both)."""
        if not self.fuses or not next_plan.work:
            return None
        bucket = self.runner.fused_bucket(next_plan)
        if not bucket.decode_only:
            return None
        key, context, host = (bucket.seqs, bucket.tokens, bucket.pages), next_plan.context, self.predictor.host_bound()

        def bound(kind: str, size: int) -> float:
            if not self.runner.can_fuse(bucket, kind, size):
                return math.inf
            fused = self.predictor.fused(key + (kind, size), context)
            if fused is not None:  # never below the step alone
                return max(fused.bound, self.predictor.step(key, context).bound) + host
            return self.predictor.step(key, context).bound + self.predictor.micro((kind, size)).bound + host

        return bound

    def _kv_need(self, state: RequestState) -> int:
        """Pages a request may still take: to its prompt plus max_tokens, less what it holds."""
        total = len(state.prompt_ids) + state.sampling.max_tokens
        return self.page_table.pages_for_tokens(total) - len(self.page_table.block_table(state.request_id))

    def _kv_reserve(self) -> int:
        """Pages the running and waiting requests may still need: the trainer leases only above it."""
        return sum(self._kv_need(state) for state in [*self.scheduler.running, *self.scheduler.waiting])

    def admits(self, plan: StepPlan, seq: RequestState, n: int) -> bool:
        """Admission control (the scheduler's `admission`): whether `plan` may take `n` more tokens of `seq` under
        the TPOT SLO. Only when the step with them is predicted (its bound, plus the host's work) to end before
        every decoding request's next-token deadline, and the KV that every running request and `seq` may still
        need fits in the free pages and the trainer's leases (the trainer yields first: its windows only get the
        slack left after the step, and its leases are taken back for KV). With no SLO or `admission` off: yes."""
        slo = (self.config.colocation.tpot_slo_ms or 0.0) / 1e3
        if not slo or not self.config.scheduler.admission:
            return True
        table = self.page_table
        usage = table.usage()
        others = [s for s in self.scheduler.running if s is not seq]
        if sum(map(self._kv_need, [*others, seq])) > usage["free"] + usage["lease"]:
            return False
        deadlines = self._deadlines(slo)
        if not deadlines:
            return True
        pages = max([len(w.block_table) for w in plan.work] + [table.pages_for_tokens(seq.num_computed + n)])
        bucket = self.runner.bucket_for(len(plan.work) + 1, plan.num_tokens + n, pages)
        step = self.predictor.step((bucket.seqs, bucket.tokens, bucket.pages), plan.context + seq.num_computed + n)
        return time.perf_counter() + step.bound + self.predictor.host_bound() <= min(deadlines)

    def _deadlines(self, slo: float, waiting: bool = False) -> list[float]:
        """Each decoding request's next-token deadline: its TPOT target (slack banked by tokens ahead of it), and
        never later than its last token plus the TBT cap. With `waiting` (a training window's budget), also each
        waiting request that already has tokens (one that arrived with its prompt's K/V and first token, or was
        preempted): its clock runs while it waits for a place in the batch, so training must not lengthen the
        wait (admission leaves them out: a deadline already missed in the queue would refuse every request)."""
        cap = (self.config.colocation.tbt_cap_ms or math.inf) / 1e3
        running = [s for s in self.scheduler.running if s.output_ids and s.num_pending <= 1]
        waiting = [s for s in self.scheduler.waiting if s.output_ids] if waiting else []
        return [min(s.token_times[0] + len(s.output_ids) * slo, s.token_times[-1] + cap)
                for s in [*running, *waiting]]

    def _window(self, next_plan: StepPlan) -> dict:
        job, config = self.job, self.config.colocation
        decided = time.perf_counter()
        slo = (config.tpot_slo_ms or 0.0) / 1e3
        if not slo and config.policy in ("harli", "harli-temporal"):
            return {}  # no SLO to protect: nothing is banked while requests run
        reserve = self._kv_reserve()
        micro = job.micro
        can_start = self.page_table.num_free + micro.held_pages - micro.stash_pages_needed >= reserve
        ctx = WindowContext(now=decided, slo=slo, margin=slo * config.slo_margin,
                            next_step_bound=self._next_step_bound(next_plan) if slo else 0.0,
                            deadlines=self._deadlines(slo, waiting=True) if slo else [], num_layers=self.cfg.num_layers,
                            pending=micro.status(), can_start=can_start, inference_steps=self._steps_since_train,
                            fresh=("tokens", job.job.seq_len) if micro.token_mode else None,
                            next_tokens=next_plan.num_tokens, rows=job.job.micro_batch_rows,
                            fused_bound=self._fused_bound(next_plan),
                            reserve=self._prefill_reserve(next_plan) if slo else 0.0)
        with jax.profiler.TraceAnnotation("schedule"):
            plan = self.policy.plan(ctx)
        decision_time = time.perf_counter() - decided
        ran, timed, train_time = [], [], 0.0
        for _, size in plan.steps:
            if micro.current is None and not micro.start(watermark=reserve):
                break
            with jax.profiler.TraceAnnotation(f"train_micro_step size={size}"):
                done = micro.run(size)
            if done.kind is None:
                break
            ran.append(f"{done.kind}:{size}")
            timed.append((done.kind, size))
            train_time += done.seconds
            self.predictor.observe_micro((done.kind, size), done.seconds)
            if not job.active:
                break
        if plan.fused is not None and job.active and len(ran) == len(plan.steps) and next_plan.work:
            if micro.current is not None or micro.start(watermark=reserve):
                call = micro.fused_call(plan.fused[1])
                if call is not None and self.runner.can_fuse(self.runner.fused_bucket(next_plan), call.kind, call.size):
                    self._fused = (next_plan, call)
        self._steps_since_train = 0 if ran or self._fused else self._steps_since_train + 1
        return {"train": tuple(ran), "train_time": train_time, "budget": plan.budget, "predicted": plan.predicted,
                "decision_time": decision_time, "micro": timed}

    # Calibration --------------------------------------------------------------------------------------------

    def calibrate(self) -> LatencyPredictor:
        """The predictor's calibration sweep: every inference program, and with a job every micro-step kind,
        timed `calibration_runs` times. Cached on disk by what the timings depend on."""
        for _ in self._calibration_runs():
            pass
        return self.predictor

    def _calibration_runs(self):
        """The calibration sweep (`calibrate`), yielding after each program it runs."""
        cache = self._calibration_file()
        loaded = LatencyPredictor.load(cache)
        if loaded is not None:
            log.info("predictor calibration loaded from %s", cache)
            self.predictor = loaded
            return
        started = time.perf_counter()
        runs = self.config.predictor.calibration_runs
        if not self.predictor.step_coef:  # a fitted predictor has timed every step program of this engine
            with self._scratch_page() as page:
                for bucket in self.runner.buckets:
                    for i in range(runs + 1):
                        context, seconds = self.runner.time_synthetic(bucket, seed=i, scratch_page=page)
                        if i:  # the first run of each program only warms it
                            self.predictor.observe_step((bucket.seqs, bucket.tokens, bucket.pages), context,
                                                        seconds)
                        yield
        job = self.job
        if job is not None and job.micro.current is None and self.trains_while_serving:
            for token_mode, sequence in self._calibration_sequences():  # `prepare` compiled each size
                for _ in range(runs):
                    if not job.micro.start(calibration=True, token_mode=token_mode):
                        break
                    for size in sequence:
                        if job.micro.current is None:  # its lease was taken back (or the job paused)
                            break
                        done = job.micro.run(size)
                        if done.kind is None:
                            break
                        self.predictor.observe_micro((done.kind, size), done.seconds)
                        yield
                    job.micro.abandon()
            with self._scratch_page() as page:
                yield from self._calibrate_fused(page, runs)
        self.predictor.fit()
        log.info("predictor calibrated in %.1fs", time.perf_counter() - started)
        self.predictor.save(cache)

    def _calibrate_fused(self, page: int, runs: int):
        """Times every fused program `runs` times on synthetic inference batches with a timing micro-batch (yielding
        after each run): its token chunks or forward windows at its start, its backward slices once its forward is
        done (dropped at the end, nothing applied). `runs` 0: each runs once, untimed (in the job's setup: a
        program's first run is slow)."""
        micro, sizes = self.job.micro, self.sizes
        phases = [p for p in ("tokens", "forward", "backward") if sizes.fused_of(p)]
        if not phases or micro.current is not None or not micro.start(calibration=True):
            return
        try:
            for phase in phases:
                while (status := micro.status()) is not None and status[0] != phase:
                    micro.run(largest_chunk(sizes.of(status[0]), status[1]))
                    yield
                for size in sizes.fused_of(phase):
                    for bucket in (b for b in self.runner.buckets if self.runner.can_fuse(b, phase, size)):
                        for i in range(max(runs, 1)):
                            call = micro.fused_call(size)
                            if call is None:
                                break
                            context, seconds, out = self.runner.time_fused(bucket, call, seed=i, scratch_page=page)
                            micro.fused_trial(call, out)
                            if runs:
                                key = (bucket.seqs, bucket.tokens, bucket.pages, phase, size)
                                self.predictor.observe_step(key, context, seconds)
                            yield
        finally:
            micro.abandon()

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

    def _calibration_file(self) -> Path:
        """The cache file: keyed by the model, the step programs' shapes, the arena's page size, the device,
        the JAX version, the micro-step shapes, whether they are timed at all (`trains_while_serving`) and the
        sweep's own settings (not by policy or SLO)."""
        job, config = self.job, self.config
        key = json.dumps({"sweep": CALIBRATION_SWEEP, "model": dataclasses.asdict(self.cfg),
                          "buckets": [dataclasses.astuple(b) for b in self.runner.buckets],
                          "page_tokens": config.cache.page_tokens, "attention": config.runner.attention_impl,
                          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                          "tensor_parallel": config.parallel.tensor_parallel, "processes": jax.process_count(),
                          "runs": config.predictor.calibration_runs, "quantile": config.predictor.quantile,
                          "sizes": dataclasses.astuple(self.sizes),
                          "job": None if job is None else [job.job.micro_batch_rows, job.job.seq_len,
                                                           dataclasses.asdict(job.job.lora),
                                                           self.trains_while_serving]},
                         sort_keys=True, default=str)
        root = Path(config.predictor.calibration_dir or Path.home() / ".cache" / "harli_jax")
        return root / f"predictor-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
