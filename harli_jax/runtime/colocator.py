"""Co-location as one collaborator of the engine: it owns the policy, the latency predictor and the finetune
job's training windows.

After each inference step, the engine has already scheduled the next one; the co-locator plans the training
micro-steps to run before it (the policy's budget uses that exact next shape), runs them and scores the window.
With nothing to serve it trains through the single program. A reclaimed lease abandons its micro-batch at
once. It also runs the predictor's calibration sweep, cached by what the timings depend on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import jax

from harli_jax.model.config import ModelConfig
from harli_jax.runtime.arena import Arena, Owner
from harli_jax.runtime.colocation import WindowContext, make_policy, micro_sequence
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.job import FinetuneRunner
from harli_jax.runtime.metrics import IdleTraining
from harli_jax.runtime.predictor import LatencyPredictor
from harli_jax.runtime.runner import Bucket, ModelRunner
from harli_jax.runtime.scheduler import Scheduler, StepPlan

log = logging.getLogger("harli_jax")


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


class CoLocator:
    def __init__(self, cfg: ModelConfig, config: EngineConfig, scheduler: Scheduler, arena: Arena,
                 runner: ModelRunner):
        self.cfg, self.config = cfg, config
        self.scheduler, self.page_table, self.runner = scheduler, arena.table, runner
        self.chunks = chunk_options(cfg, config)
        c = config.colocation
        self.predictor = LatencyPredictor(config.predictor.quantile)
        self.policy = make_policy(c.policy, lambda kind: self.predictor.micro(kind).bound, self.chunks,
                                  temporal_k=c.temporal_k, temporal_chunk=c.temporal_chunk,
                                  static_layers=c.static_layers, bank_cap=c.bank_cap)
        self.job: FinetuneRunner | None = None
        self.idle_training = IdleTraining()
        self._steps_since_train = 0

    @property
    def training(self) -> bool:
        return self.job is not None and self.job.active

    def register(self, job: FinetuneRunner) -> None:
        """Takes the job: compiles its programs (every micro-step size unless the policy never trains while
        serving) and, under an SLO, calibrates the predictor."""
        self.job = job
        job.warmup(self.chunks if self.config.colocation.policy != "decode-only" else ())
        if self.config.colocation.tpot_slo_ms:
            self.calibrate()

    def reclaimed(self, owners: list[Owner]) -> None:
        """The page table took these leases back for KV: the micro-batch that used one is abandoned now."""
        if self.job is not None:
            self.job.micro.reclaimed(owners)

    # Training -----------------------------------------------------------------------------------------------

    def idle(self) -> None:
        """No request to serve: refit the predictor if it has news, then finish a micro-batch in flight or train
        one micro-batch at full speed in the single program."""
        if self.predictor.unfitted >= 64:
            self.predictor.fit()
        if not self.training:
            return
        job = self.job
        started, tokens = time.perf_counter(), job.tokens
        with jax.profiler.TraceAnnotation("train_alone"):
            if job.micro.current is not None:
                job.micro.run_to_end(self.chunks)
            else:
                job.train_microbatch()
        idle = self.idle_training
        idle.calls, idle.seconds = idle.calls + 1, idle.seconds + time.perf_counter() - started
        idle.tokens += job.tokens - tokens

    def after_step(self, plan: StepPlan, bucket: Bucket, seconds: float, next_plan: StepPlan) -> dict:
        """Scores the step, then runs the training window the policy puts before `next_plan`; returns the
        window's fields of the step record."""
        key, context = (bucket.seqs, bucket.tokens, bucket.pages), plan.context
        self.predictor.observe_step(key, context, seconds)
        if not self.training:
            return {}
        window = self._window(next_plan)
        micro = window.pop("micro", ())
        if micro:
            self.predictor.observe_window(key, context, micro, seconds + window["train_time"])
        return window

    def _next_step_bound(self, next_plan: StepPlan) -> float:
        if not next_plan.work:
            return 0.0
        bucket = self.runner.bucket_of(next_plan)
        return self.predictor.step((bucket.seqs, bucket.tokens, bucket.pages), next_plan.context).bound

    def _kv_reserve(self) -> int:
        """Pages the running and waiting requests may still need: the trainer leases only above it."""
        need = 0
        for state in [*self.scheduler.running, *self.scheduler.waiting]:
            total = len(state.prompt_ids) + state.sampling.max_tokens
            need += self.page_table.pages_for_tokens(total) - len(self.page_table.block_table(state.request_id))
        return need

    def _window(self, next_plan: StepPlan) -> dict:
        job, config = self.job, self.config.colocation
        decided = time.perf_counter()
        slo = (config.tpot_slo_ms or 0.0) / 1e3
        if not slo and config.policy == "harli":
            return {}  # no SLO to protect: nothing is banked while requests run
        reserve = self._kv_reserve()
        micro = job.micro
        can_start = self.page_table.num_free + micro.held_pages - micro.stash_pages_needed >= reserve
        deadlines = [s.token_times[0] + len(s.output_ids) * slo for s in self.scheduler.running
                     if s.output_ids and s.num_pending <= 1]
        ctx = WindowContext(now=decided, slo=slo, margin=slo * config.slo_margin,
                            next_step_bound=self._next_step_bound(next_plan) if slo else 0.0, deadlines=deadlines,
                            num_layers=self.cfg.num_layers, pending=micro.status(), can_start=can_start,
                            inference_steps=self._steps_since_train)
        with jax.profiler.TraceAnnotation("schedule"):
            plan = self.policy.plan(ctx)
        decision_time = time.perf_counter() - decided
        ran, timed, train_time = [], [], 0.0
        for _, layers in plan.steps:
            if micro.current is None and not micro.start(layers, watermark=reserve):
                break
            with jax.profiler.TraceAnnotation(f"train_micro_step layers={layers}"):
                done = micro.run(layers)
            if done.kind is None:
                break
            ran.append(f"{done.kind}:{layers}")
            timed.append((done.kind, layers))
            train_time += done.seconds
            self.predictor.observe_micro((done.kind, layers), done.seconds)
            if not job.active:
                break
        self._steps_since_train = 0 if ran else self._steps_since_train + 1
        return {"train": tuple(ran), "train_time": train_time, "budget": plan.budget, "predicted": plan.predicted,
                "decision_time": decision_time, "micro": timed}

    # Calibration --------------------------------------------------------------------------------------------

    def calibrate(self) -> LatencyPredictor:
        """The predictor's calibration sweep: every inference program, and with a job every micro-step kind,
        timed `calibration_runs` times. Cached on disk by what the timings depend on."""
        cache = self._calibration_file()
        loaded = LatencyPredictor.load(cache)
        if loaded is not None:
            log.info("predictor calibration loaded from %s", cache)
            self.predictor = loaded
            return loaded
        started = time.perf_counter()
        runs = self.config.predictor.calibration_runs
        with self._scratch_page() as page:
            for bucket in self.runner.buckets:
                for i in range(runs + 1):
                    context, seconds = self.runner.time_synthetic(bucket, seed=i, scratch_page=page)
                    if i:  # the first run of each program only warms it
                        self.predictor.observe_step((bucket.seqs, bucket.tokens, bucket.pages), context, seconds)
        job = self.job
        if job is not None and job.micro.current is None:
            for chunk in self.chunks:
                for i in range(runs + 1):
                    if not job.micro.start(chunk, calibration=True):
                        break
                    for _, layers in micro_sequence(None, True, self.cfg.num_layers, chunk, self.chunks):
                        done = job.micro.run(layers)
                        if i:  # the first micro-batch compiles the programs
                            self.predictor.observe_micro((done.kind, layers), done.seconds)
        self.predictor.fit()
        log.info("predictor calibrated in %.1fs", time.perf_counter() - started)
        if job is not None:
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

    def _calibration_file(self) -> Path:
        """The cache file: keyed by the model, the step programs' shapes, the arena's page size, the device,
        the JAX version, the micro-step shapes and the sweep's own settings (not by policy or SLO)."""
        job, config = self.job, self.config
        key = json.dumps({"model": dataclasses.asdict(self.cfg), "buckets": [dataclasses.astuple(b) for b in
                                                                              self.runner.buckets],
                          "page_tokens": config.cache.page_tokens, "attention": config.runner.attention_impl,
                          "device": jax.devices()[0].device_kind, "jax": jax.__version__,
                          "runs": config.predictor.calibration_runs, "quantile": config.predictor.quantile,
                          "chunks": self.chunks,
                          "job": None if job is None else [job.job.micro_batch_rows, job.job.seq_len,
                                                           dataclasses.asdict(job.job.lora)]},
                         sort_keys=True, default=str)
        root = Path(config.predictor.calibration_dir or Path.home() / ".cache" / "harli_jax")
        return root / f"predictor-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
