"""`harli replay`: replay an inference trace against the engine with a finetune job running, under one or several
co-location policies held to one SLO, and write a report (table, JSON, CSVs, plots; optionally profiler sessions).

A replay, in order (`main`):

1. Every option is checked (harli_jax.replay.options), the model and the trace are loaded, and only then is the
   report directory made. Requests are shrunk so prompt + output fits the context less one token (the prefill
   engine's second token in the decode role; the same requests in both roles).
2. On a first engine (`prepare`), with no finetune job: the solo decode step (`measure_solo_step`: the engine's
   wall time between the ends of consecutive decode-only steps, host work included, at the trace's peak batch);
   in the decode role, every request's prompt K/V (`prefill_all`, a separate engine from those that decode);
   the job's standalone throughput (`measure_standalone`). The SLO (`slo_of`) is fixed from these once:
   `--tpot-slo Nx` is N solo steps, `--tbt-slo` (the cap on any single gap) defaults to twice the TPOT SLO. In
   the colocated role, a mixed step (a prefill chunk beside the decoding sequences, `measure_mixed_step`) is
   measured too, and prefill is paced to what the SLO affords (`prefill_interval_for`).
3. Per policy, a fresh engine over the same weights with `tpot_slo_ms` and `tbt_slo_ms` in its EngineConfig, the
   same requests (same seed) and a fresh finetune job (`run_policy`). A policy knob that an operator would set
   offline for the peak (static's layers, cobatch's token budget, as FlexLLM's artifact sweeps it: `KNOBS`) is
   first chosen by `sweep` over a prefix of the trace.

Every engine of a replay has the same program shapes: `--batch-buckets` and `--page-buckets` (the decode batch
sizes and pages per sequence compiled) and, for harli and cobatch, `--fused-tokens` and `--fused-layers` (the
fused step programs, one per decode batch bucket per fused shape, compiled when the finetune job starts); fewer of
them compile faster. `--calibration-runs` times each program that many times for the latency predictor.

Roles (`--role`): `decode` (the default) is the decode instance of a prefill/decode-disaggregated deployment:
each request is submitted at its arrival with the K/V of its prompt and the first token sampled by the prefill
engine, so only decode steps run under the SLO. `colocated` prefills prompts in chunks on the decoding engine,
a chunk every `prefill_interval` steps while others decode (the same for every policy).

The finetune job decays its learning rate over a finite schedule (`finetune_steps`): as many optimizer steps as
the job alone would make over the longest the replay can take within the SLO, so no policy runs out of work
before the trace ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from harli_jax.errors import ConfigError, HarliError
from harli_jax.logs import StatusLine
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.config import ModelConfig
from harli_jax.model.loader import LoadedModel, load_model
from harli_jax.model.paged import ArenaLayout
from harli_jax.replay.options import SloSpec, build_parser, resolve_options
from harli_jax.replay.report import RunResult, explain, format_stages, format_table, plot, summarize, write_csvs
from harli_jax.replay.trace import Trace, load_trace, peak_concurrency
from harli_jax.runtime.colocator import token_options
from harli_jax.runtime.config import CacheConfig, EngineConfig
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.finetune import FinetuneJob, JobHandle
from harli_jax.runtime.processing import RequestError
from harli_jax.runtime.request import (
    FinishedEvent,
    GenerationOutput,
    PrefilledKV,
    Request,
    SamplingParams,
    TokenEvent,
)
from harli_jax.runtime.runner import use_compile_cache

log = logging.getLogger("harli_jax")
SOLO_GAPS = 16  # decode-only step gaps the solo step's median is over
MIXED_CHUNKS = 4  # the most prefill chunks of the mixed step's prompt
STANDALONE_STEPS = 20  # the most optimizer steps the standalone throughput is measured over (after a warm-up step)
STANDALONE_SECONDS = 5.0  # it stops at the first step past this many seconds, from the third on
TARGET_ATTAINMENT = 0.99  # the share of requests within the TPOT SLO a swept knob must keep
PREFILL_MEMORY_SHARE = 0.5  # of the host's available memory, the most the decode role's prompt K/V may take
EVAL_FRACTION = 0.02  # of the finetune job's data, held out and scored before and after (40 of 2,000 samples)


@dataclasses.dataclass(frozen=True)
class SoloStep:
    """The engine's solo decode step: the median wall time between the ends of consecutive decode-only steps of
    `batch` sequences (host work included, no finetune job), over `gaps` gaps, from `context` tokens on; the steps
    ran in the program of `bucket_seqs` sequences of up to `bucket_pages` pages."""

    seconds: float
    batch: int
    gaps: int
    context: int
    bucket_seqs: int
    bucket_pages: int


@dataclasses.dataclass(frozen=True)
class MixedStep:
    """A step that carries a prefill chunk of `chunk` tokens beside `decoding` decoding sequences: the median wall
    time between the end of the step before it and its own end, over `samples` such steps."""

    seconds: float
    decoding: int
    chunk: int
    samples: int


@dataclasses.dataclass(frozen=True)
class Slo:
    """The one SLO every policy of a replay is held to (seconds), and the prefill pacing it affords in the
    colocated role (`prefill_interval`, 1 in the decode role)."""

    tpot_s: float
    tbt_s: float  # the cap on any single gap between two tokens of a request
    ttft_s: float | None
    solo: SoloStep
    mixed: MixedStep | None = None
    prefill_interval: int = 1

    def as_dict(self) -> dict[str, Any]:
        mixed = self.mixed
        return {"tpot_slo_ms": self.tpot_s * 1e3, "tbt_slo_ms": self.tbt_s * 1e3,
                "ttft_slo_ms": None if self.ttft_s is None else self.ttft_s * 1e3,
                "solo_decode_step_ms": self.solo.seconds * 1e3, "solo_batch": self.solo.batch,
                "solo_gaps": self.solo.gaps, "solo_context": self.solo.context,
                "solo_bucket": {"seqs": self.solo.bucket_seqs, "pages": self.solo.bucket_pages},
                "mixed_step_ms": None if mixed is None else mixed.seconds * 1e3,
                "mixed_step": None if mixed is None else dataclasses.asdict(mixed),
                "prefill_interval": self.prefill_interval,
                "definition": "Nx = N x the solo decode step: the median wall time between the ends of consecutive "
                              "decode-only steps at the trace's peak batch and the page bucket of its longest "
                              "request (the shape decode-only runs at the peak), host work included, measured once "
                              "on a first engine without a finetune job before any policy runs"}


@dataclasses.dataclass(frozen=True)
class Standalone:
    """The finetune job alone on the device (the engine serving nothing)."""

    tokens_per_s: float  # trained tokens per second
    steps_per_s: float  # optimizer steps per second


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every policy run of a replay shares: the weights, the trace and its requests (in the decode role each
    carries its prompt's K/V, `Request.prefilled_kv`), those K/V by request id (empty in the colocated role), the
    measured solo step and the standalone throughput."""

    model: LoadedModel
    trace: Trace
    requests: list[Request]
    prefilled: dict[str, PrefilledKV]
    options: dict[str, Any]
    solo: SoloStep
    standalone: Standalone
    prefill_s: float  # wall seconds of the prefill pass (0 in the colocated role)
    mixed: MixedStep | None  # measured in the colocated role
    base_eval: tuple[float, float] | None  # the job's held-out set on the base model: (eval loss, exact match)


@dataclasses.dataclass(frozen=True)
class Knob:
    """A policy's setting that an operator fixes offline for the peak: a CoLocationConfig field, the values to
    try (ascending: more training, more interference) and the value to use when none keeps the SLO."""

    field: str
    candidates: tuple[int, ...]
    fallback: int


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The outcome of `sweep`: the attainment of each candidate tried, in order, and the value chosen."""

    policy: str
    field: str
    attainment: dict[int, float | None]
    chosen: int
    requests: int

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "field": self.field, "requests": self.requests, "chosen": self.chosen,
                "attainment": {str(k): v for k, v in self.attainment.items()}, "target": TARGET_ATTAINMENT}


def _static_knob(cfg: ModelConfig, options: dict[str, Any]) -> Knob:
    """static: layers of micro-steps after every inference step, powers of two up to the model's layers."""
    layers = sorted({1 << i for i in range(cfg.num_layers.bit_length()) if 1 << i <= cfg.num_layers}
                    | {cfg.num_layers})
    return Knob("static_layers", tuple(layers), 0)


def _cobatch_knob(cfg: ModelConfig, options: dict[str, Any]) -> Knob:
    """cobatch: its token budget per step (`cobatch_tokens`: a decode step's inference tokens first, then the
    finetune tokens of a token chunk, `micro_batch_rows` rows x a fused chunk size, fill the rest).

    Candidates, ascending: twice the least fused work (rows x the smallest fused chunk: a budget of just that
    leaves no room beside a decoded token), doubling while below the most a step can use (`max_batch` inference
    tokens + rows x the largest fused chunk: a larger budget fuses the largest chunk into every step, as that
    one does), then that most. A budget fuses a chunk into a step only when the step's inference tokens leave
    that chunk's rows room, so the small ones train at low load only. With the defaults of small.yaml's
    benchmark (16 sequences, 1 row of 64 positions, the default chunk of 8) they are 16 and 24. The fallback, when
    none keeps the SLO: 1 token, which fuses no chunk beside a decoded token."""
    seq_len, rows = options["seq_len"], options["micro_batch_rows"]
    fused = token_options(seq_len, tuple(options.get("fused_tokens") or ()))[1]
    unit, most = rows * min(fused), options["max_batch"] + rows * max(fused)
    budgets = [unit << i for i in range(1, most.bit_length()) if unit << i < most]
    return Knob("cobatch_tokens", (*budgets, most), 1)


# The policies whose knob `sweep` chooses before the comparison (a policy added to POLICIES with a knob adds
# its entry here): the model and the replay's options give the candidates.
KNOBS: dict[str, Callable[[ModelConfig, dict[str, Any]], Knob]] = {"static": _static_knob,
                                                                   "cobatch": _cobatch_knob}


# Configs -------------------------------------------------------------------------------------------------------


def engine_config(options: dict[str, Any], policy: str, out: Path, slo: Slo | None = None,
                  **colocation: Any) -> EngineConfig:
    """The engine of one run: the replay's sizes and program shapes (batch buckets, fused shapes: the same for
    every engine of the replay, the first one included), the policy (with `colocation` overrides) and, with
    `slo`, its TPOT SLO and TBT cap; the predictor's calibration is cached in `calibration_dir`."""
    limits = {} if slo is None else {"tpot_slo_ms": slo.tpot_s * 1e3, "tbt_slo_ms": slo.tbt_s * 1e3,
                                     "prefill_interval": slo.prefill_interval}
    shapes = {name: options[name] for name in ("fused_tokens", "fused_layers", "batch_buckets", "page_buckets")
              if options.get(name)}
    return EngineConfig(**{"max_batch": options["max_batch"], "max_seq_len": options["max_seq_len"],
                           "prefill_chunk": options["prefill_chunk"], "slo_margin": options["slo_margin"],
                           "calibration_runs": options["calibration_runs"],
                           "policy": policy, "tensor_parallel": options["tp"],
                           "calibration_dir": str(calibration_dir(out)),
                           "compile_cache_dir": options.get("compilation_cache"), **shapes, **limits,
                           **colocation})


def calibration_dir(out: Path) -> Path:
    """Where the predictor's calibrations are cached (keyed by what they depend on): beside JAX's persistent
    compilation cache, so that a second replay on this machine neither compiles nor calibrates again; in the report
    directory when that cache is off (`prepare` sets it up from the options)."""
    cache = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    return out / "calibration" if cache is None else Path(cache) / "harli-calibration"


def finetune_job(options: dict[str, Any], name: str, total_steps: int, checkpoint_dir: Path | None) -> FinetuneJob:
    """The replay's finetune job: `total_steps` optimizer steps, a tenth of them (at most 10) of warmup, then
    cosine decay; `EVAL_FRACTION` of its data held out, evaluated only when asked (`evaluate`); a checkpoint only
    at the end (when `checkpoint_dir`)."""
    rank = options["lora_rank"]
    return FinetuneJob(dataset=options["dataset"], lora=LoRAConfig(rank=rank, alpha=2.0 * rank),
                       micro_batch_rows=options["micro_batch_rows"], seq_len=options["seq_len"],
                       total_steps=total_steps, warmup_steps=max(1, min(10, total_steps // 10)), eval_interval=0,
                       eval_fraction=EVAL_FRACTION, seed=options["seed"],
                       checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                       checkpoint_interval=total_steps, name=name)


def replay_trace(options: dict[str, Any], cfg: ModelConfig) -> Trace:
    """The trace of the options, rescaled and cut, each request shrunk so prompt + output fits the engine's
    context less one token (room for the prefill engine's second token in the decode role)."""
    context = CacheConfig(max_seq_len=options["max_seq_len"]).seq_len(cfg)
    return load_trace(options["trace"]).rescale(
        rate_scale=options["rate_scale"], time_scale=options["time_scale"], max_context=context - 1,
        duration=options["duration"], max_requests=options["max_requests"])


def slo_of(specs: dict[str, SloSpec | None], solo: SoloStep, mixed: MixedStep | None = None,
           prefill_interval: int | None = None) -> Slo:
    """The SLO from the options' specs (`check_options`'s `slo`) and the measured solo step; the TBT cap defaults
    to twice the TPOT SLO. With a measured `mixed` step (the colocated role), prefill is paced at
    `prefill_interval` steps, or where unset at the fewest the TPOT SLO affords (`prefill_interval_for`)."""
    tpot = specs["tpot_slo"].seconds(solo.seconds)
    tbt = specs["tbt_slo"].seconds(solo.seconds) if specs.get("tbt_slo") else 2 * tpot
    ttft = specs["ttft_slo"].seconds(solo.seconds) if specs.get("ttft_slo") else None
    if mixed is None:
        return Slo(tpot, tbt, ttft, solo)
    interval = prefill_interval or prefill_interval_for(tpot, solo.seconds, mixed.seconds)
    return Slo(tpot, tbt, ttft, solo, mixed, interval)


def prefill_interval_for(tpot_s: float, decode_s: float, mixed_s: float) -> int:
    """The fewest steps N from one prefill chunk to the next that keep a decoding request's mean gap within the
    TPOT SLO, one mixed step in every N: (mixed + (N - 1) decode) / N <= TPOT. 1 when mixed steps fit the SLO
    by themselves, or when decode alone does not (no pacing can help)."""
    if mixed_s <= tpot_s or decode_s >= tpot_s:
        return 1
    return math.ceil((mixed_s - decode_s) / (tpot_s - decode_s))


# The prefill pass ------------------------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of host memory available now (MemAvailable of /proc/meminfo); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_prefill_memory(trace: Trace, cfg: ModelConfig, page_tokens: int) -> int:
    """The host bytes the decode role's prompt K/V will take (whole pages in the arena's layout); a ConfigError
    when that is more than `PREFILL_MEMORY_SHARE` of the available memory."""
    layout = ArenaLayout(cfg, page_tokens)
    need = sum(-(-r.prompt_tokens // page_tokens) for r in trace.requests) * layout.page_bytes
    free = available_memory()
    if free is not None and need > PREFILL_MEMORY_SHARE * free:
        raise ConfigError(f"the decode role holds every prompt's K/V in host memory: {len(trace)} requests need "
                          f"{need / 2**20:,.2f} MiB, more than {PREFILL_MEMORY_SHARE:.0%} of the "
                          f"{free / 2**20:,.2f} MiB available; replay fewer (--max-requests, --duration) or use "
                          f"--role colocated")
    return need


def prefill_all(engine: Engine, requests: Sequence[Request], *, show: bool = True) -> dict[str, PrefilledKV]:
    """Every request's prompt K/V and first token, computed on `engine` (the prefill instance), by request id.

    Up to the engine's batch of prompts prefill at once, each submitted to generate two tokens: when its first
    token appears (its prefill is done, it is still running) its K/V is exported and the request aborted, freeing
    its pages. The K/V are host arrays of whole pages, each holding only its own request's pages. A request the
    engine refuses gets none (the decoding engine, configured alike, refuses it in turn).
    With `show`, a status line shows the progress (else only the package's log at INFO)."""
    pending = deque(requests)
    running: dict[str, str] = {}  # the prefill engine's request id -> the replay's
    out: dict[str, PrefilledKV] = {}
    limit = engine.config.scheduler.max_batch
    status = StatusLine("[setup] prefill: prompts", len(requests), interval_s=5.0, always=show)
    refused = 0
    while pending or running:
        while pending and len(running) < limit:
            r = pending.popleft()
            try:
                rid = engine.submit(Request(r.prompt, SamplingParams(max_tokens=2, ignore_eos=True)))
            except RequestError:
                refused += 1
                continue
            running[rid] = r.request_id
        for event in engine.step():
            if isinstance(event, TokenEvent) and event.index == 0 and event.request_id in running:
                out[running.pop(event.request_id)] = engine.export_kv(event.request_id)  # its own host array
                engine.abort(event.request_id)
            elif isinstance(event, FinishedEvent) and event.request_id in running:
                raise HarliError(f"prefill: request {running[event.request_id]} ended before its first token "
                                 f"({event.output.finish_reason.value}: {event.output.error})")
        status.update(len(out) + refused)
    while engine.has_unfinished():  # the last aborts
        engine.step()
    status.update(len(out) + refused, force=True)
    status.close()
    return out


# Measurements on the first engine ----------------------------------------------------------------------------------


def measure_solo_step(engine: Engine, batch: int, kv: PrefilledKV, gaps: int = SOLO_GAPS) -> SoloStep:
    """The engine's solo decode step at `batch`: `batch` requests that all arrive at once with the prompt K/V
    `kv` (so no step prefills), each decoding `gaps` + 1 tokens; the median time between the ends of consecutive
    steps that decoded all of them (`engine.step_records`: wall time, host work included)."""
    first = len(engine.step_records)
    sampling = SamplingParams(max_tokens=gaps + 2, ignore_eos=True)
    for _ in range(batch):
        engine.submit(Request(list(kv.prompt_ids), sampling), prefilled_kv=kv)
    while engine.has_unfinished():
        engine.step()
    records = engine.step_records[first:]

    def full(r) -> bool:
        return r.prefill_seqs == 0 and r.decode_seqs == batch

    pairs = [(a, b) for a, b in zip(records, records[1:], strict=False) if full(a) and full(b)]
    if len(pairs) < 3:
        raise HarliError(f"the solo decode step at batch {batch}: only {len(pairs)} decode-only gaps were measured")
    shape = max((b.bucket_seqs, b.bucket_pages) for _, b in pairs)
    return SoloStep(statistics.median(b.end - a.end for a, b in pairs), batch, len(pairs), len(kv.prompt_ids), *shape)


def measure_mixed_step(engine: Engine, batch: int, kv: PrefilledKV, seed: int) -> MixedStep | None:
    """A mixed step at `batch`: `batch` - 1 requests decode (from the prompt K/V `kv`) while one more prefills a
    prompt of several chunks (`engine` paces nothing: a chunk every step); the median of the gaps that end in a
    step with the chunk and every decoder. None where the engine cannot hold a decoder beside the prefill."""
    settings, seq_len = engine.config.scheduler, engine.seq_len
    decoding = min(max(1, batch - 1), settings.max_batch - 1)
    chunks = min(MIXED_CHUNKS, (seq_len - 2) // settings.prefill_chunk)
    if decoding < 1 or chunks < 1:
        return None
    first = len(engine.step_records)
    sampling = SamplingParams(max_tokens=chunks + SOLO_GAPS, ignore_eos=True)
    for _ in range(decoding):
        engine.submit(Request(list(kv.prompt_ids), sampling), prefilled_kv=kv)
    while engine.has_unfinished() and (len(engine.step_records) == first
                                       or engine.step_records[-1].decode_seqs < decoding):
        engine.step()  # every decoder running before the prompt arrives
    prompt = np.random.default_rng(seed + 1).integers(3, engine.cfg.vocab_size, chunks * settings.prefill_chunk)
    engine.submit(Request(prompt.tolist(), SamplingParams(max_tokens=1)))
    while engine.has_unfinished():
        engine.step()
    records = engine.step_records[first:]
    times = [b.end - a.end for a, b in zip(records, records[1:], strict=False)
             if b.prefill_seqs == 1 and b.decode_seqs == decoding]
    if not times:
        raise HarliError(f"the mixed step at batch {batch}: no step prefilled beside {decoding} decoding requests")
    return MixedStep(statistics.median(times), decoding, settings.prefill_chunk, len(times))


def measure_slo_base(engine: Engine, trace: Trace, seed: int, role: str) -> tuple[SoloStep, MixedStep | None]:
    """The solo decode step of the shape decode-only runs at the trace's peak: measured at the engine's largest
    batch, which gives the time per token the peak concurrency is estimated with (`peak_concurrency`), then at that
    peak, every sequence at the trace's longest context (prompt + output), so the step runs in the page bucket the
    peak's longest request needs (a shorter context could land in a smaller bucket, and an SLO below what
    decode-only itself runs at); in the colocated role, the mixed step at that peak too. The prompt is prefilled
    once on `engine`."""
    seq_len, max_batch = engine.seq_len, engine.config.scheduler.max_batch
    context = max(r.prompt_tokens + r.output_tokens for r in trace.requests)
    # Room for the tokens each measurement's requests decode past the prompt (the mixed step's are the most).
    context = max(1, min(context, seq_len - SOLO_GAPS - MIXED_CHUNKS))
    prompt = np.random.default_rng(seed).integers(3, engine.cfg.vocab_size, context).tolist()
    kv = prefill_all(engine, [Request(prompt, request_id="solo")], show=False)["solo"]
    at_max = measure_solo_step(engine, max_batch, kv)
    peak = max(1, min(max_batch, peak_concurrency(trace, at_max.seconds)))
    solo = at_max if peak == max_batch else measure_solo_step(engine, peak, kv)
    return solo, measure_mixed_step(engine, peak, kv, seed) if role == "colocated" else None


def measure_standalone(handle: JobHandle, steps: int = STANDALONE_STEPS,
                       seconds: float = STANDALONE_SECONDS) -> Standalone:
    """The job of `handle` alone on its engine (nothing served: each micro-batch runs as one program): trained
    tokens and optimizer steps per second after a warm-up step, over at least 3 steps and `seconds`, at most
    `steps`; the job is stopped at the end."""
    handle.wait(max_steps=1)
    started, tokens, step = time.perf_counter(), handle.progress().tokens, handle.progress().step
    for measured in range(1, steps + 1):
        handle.wait(max_steps=1)
        if measured >= 3 and time.perf_counter() - started >= seconds:
            break
    seconds = time.perf_counter() - started
    done = handle.progress()
    handle.stop()
    return Standalone((done.tokens - tokens) / seconds, (done.step - step) / seconds)


def finetune_steps(setup: Setup, slo: Slo) -> int:
    """The replay job's length (`--finetune-steps` when set): the optimizer steps the job alone would make over
    the longest the replay takes within the SLO (the trace's span, then its longest request with every gap at the
    TBT cap). No policy can finish it before the trace ends, so none sits idle; a policy that harvests a share h
    of the device ends near h of the schedule, its learning rate not yet fully decayed."""
    if setup.options["finetune_steps"]:
        return setup.options["finetune_steps"]
    trace = setup.trace
    span = trace.duration + slo.tbt_s * max((r.output_tokens for r in trace.requests), default=0)
    return max(2, math.ceil(setup.standalone.steps_per_s * span))


def prepare(model: LoadedModel, trace: Trace, options: dict[str, Any], out: Path) -> Setup:
    """The first engine's work, before any policy runs: the solo step, the decode role's prefill pass and the
    standalone finetune throughput; the engine is then released. JAX's compilation cache is set up here, once for
    the replay (`calibration_dir` follows it)."""
    use_compile_cache(options["compilation_cache"])
    requests = trace.to_requests(model.cfg.vocab_size, seed=options["seed"])
    print("[setup] compiling the step programs...", file=sys.stderr)
    engine = Engine(model, engine_config(options, "decode-only", out))
    solo, mixed = measure_slo_base(engine, trace, options["seed"], options["role"])
    print(f"[setup] solo decode step at the peak batch {solo.batch}: {solo.seconds * 1e3:.2f} ms (median of "
          f"{solo.gaps} decode-only steps, wall time)", file=sys.stderr)
    if mixed is not None:
        print(f"[setup] mixed step ({mixed.decoding} decoding + a prefill chunk of {mixed.chunk} tokens): "
              f"{mixed.seconds * 1e3:.2f} ms (median of {mixed.samples})", file=sys.stderr)
    prefilled, prefill_s = {}, 0.0
    if options["role"] == "decode":
        started = time.perf_counter()
        prefilled = prefill_all(engine, requests)
        prefill_s = time.perf_counter() - started
        size = sum(kv.kv.nbytes for kv in prefilled.values())
        print(f"[setup] prefilled {len(prefilled)} prompts in {prefill_s:.1f}s ({size / 2**20:.1f} MiB of K/V)",
              file=sys.stderr)
        requests = [dataclasses.replace(r, prefilled_kv=prefilled.get(r.request_id)) for r in requests]
    print("[setup] measuring the standalone finetune throughput...", file=sys.stderr)
    handle = engine.finetune(finetune_job(options, "standalone", STANDALONE_STEPS + 2, None))
    base_eval = held_out_score(handle)
    if base_eval is not None:
        print(f"[setup] the finetune job's held-out samples on the base model: eval loss {base_eval[0]:.3f}, "
              f"{base_eval[1]:.0%} answered exactly", file=sys.stderr)
    standalone = measure_standalone(handle)
    print(f"[setup] standalone finetune: {standalone.tokens_per_s:,.0f} trained tokens/s", file=sys.stderr)
    del engine, handle
    gc.collect()  # the first engine's arena, before the next engine takes the device's memory
    return Setup(model, trace, requests, prefilled, options, solo, standalone, prefill_s, mixed, base_eval)


def held_out_score(handle: JobHandle) -> tuple[float, float] | None:
    """The job's held-out set now: (eval loss, the share of its samples greedy decoding answers exactly); None
    without one."""
    loss = handle.evaluate()
    return None if loss is None else (loss, handle.progress().eval_exact_match)


# Serving -------------------------------------------------------------------------------------------------------


def _detail(decode_tokens: list[int], handle) -> str:
    p = handle.progress()
    loss = "-" if p.loss is None else f"{p.loss:.3f}"
    return f"decode tokens {decode_tokens[0]}  finetune step {p.step}/{p.total_steps}  loss {loss}  trained " \
           f"{p.tokens} tokens"


def run_policy(setup: Setup, policy: str, slo: Slo, out: Path, *, settings: dict[str, Any] | None = None,
               requests: Sequence[Request] | None = None, name: str | None = None, checkpoint: bool = True,
               profile: Path | None = None, export_adapter: Path | None = None, score: bool = True) -> RunResult:
    """One policy's replay on a fresh engine held to `slo`, with a fresh finetune job of `finetune_steps` steps:
    `requests` (all of the setup's by default) served in real time by `Engine.serve` (each submitted at its
    arrival, with its prompt's K/V in the decode role; one the engine refuses comes back as a rejected output;
    between arrivals with nothing to serve the engine trains); `settings` are CoLocationConfig overrides;
    `name` (default the policy) names the job and its checkpoint directory in `out`; `export_adapter`, where its
    trained adapter goes; with `score`, the job's held-out set is scored at the end (`held_out_score`). Ctrl-C
    ends the serve: the result is marked interrupted."""
    name = name or policy
    settings = dict(settings or {})
    requests = setup.requests if requests is None else requests
    print(f"[{name}] compiling the step programs...", file=sys.stderr)
    engine = Engine(setup.model, engine_config(setup.options, policy, out, slo, **settings))
    print(f"[{name}] calibrating the latency predictor...", file=sys.stderr)
    checkpoint_dir = out / f"checkpoint-{name}" if checkpoint else None
    total_steps = finetune_steps(setup, slo)
    handle = engine.finetune(finetune_job(setup.options, name, total_steps, checkpoint_dir))
    progress = StatusLine(f"[{name}] requests", len(requests), interval_s=5.0, always=True)
    outputs: list[GenerationOutput] = []
    decode_tokens, interrupted = [0], False
    detail = functools.partial(_detail, decode_tokens, handle)
    tokens_before, wall_start = handle.progress().tokens, time.time()
    start = time.perf_counter()
    try:
        with engine.profile(profile) if profile is not None else contextlib.nullcontext():
            start = time.perf_counter()  # once the profiler runs; Engine.serve's clock starts microseconds later
            for event in engine.serve(requests):
                if isinstance(event, TokenEvent):
                    decode_tokens[0] += 1
                elif isinstance(event, FinishedEvent):
                    outputs.append(event.output)
                progress.update(len(outputs), detail)
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - start
    progress.update(len(outputs), detail, force=True)
    progress.close()
    handle.stop()  # a final checkpoint
    after = held_out_score(handle) if score else None
    if after is not None:
        print(f"[{name}] held-out samples: eval loss {after[0]:.3f}, {after[1]:.0%} answered exactly",
              file=sys.stderr)
    if export_adapter is not None:
        handle.export_peft(export_adapter)
        print(f"[{name}] adapter written to {export_adapter}", file=sys.stderr)
    if interrupted and checkpoint_dir is not None:
        print(f"\n[{name}] interrupted: the finetune checkpoint is in {checkpoint_dir}", file=sys.stderr)
    history = [{**h, "time_s": h["time"] - wall_start} for h in handle.history if h["time"] >= wall_start]
    done = handle.progress()
    result = RunResult(policy=policy, role=setup.options["role"], tpot_slo=slo.tpot_s, tbt_slo=slo.tbt_s,
                       ttft_slo=slo.ttft_s, outputs=outputs, steps=list(engine.step_records), wall_s=wall,
                       start=start, finetune_tokens=done.tokens - tokens_before, loss_history=history,
                       standalone_tokens_per_s=setup.standalone.tokens_per_s,
                       predictor=engine.predictor.error_report(), reclaims=engine.arena.table.reclaims,
                       abandoned=done.abandoned_microbatches, interrupted=interrupted, settings=settings,
                       finetune_total_steps=total_steps, eval_before=setup.base_eval, eval_after=after)
    del engine, handle
    gc.collect()  # this engine's arena, before the next engine takes the device's memory
    return result


# Choosing a policy's knob offline --------------------------------------------------------------------------------


def sweep(setup: Setup, policy: str, knob: Knob, slo: Slo, out: Path, requests: int,
          target: float = TARGET_ATTAINMENT) -> Sweep:
    """Chooses a policy's knob the way an operator sets it offline for the peak: the first `requests` requests of
    the trace are replayed with the policy at each of `knob.candidates` in turn (ascending), each on a fresh
    engine at `slo`, without checkpoints or report files; the largest value whose request-level TPOT attainment
    is at least `target` is chosen, `knob.fallback` when none is. The sweep stops at the first candidate that
    misses (attainment is taken to fall as the knob grows). Works for any CoLocationConfig field of any policy.

    The candidates differ in that field only, so their engines compile the same programs (the fused step
    programs of cobatch included): every engine after the first loads them from JAX's persistent compilation
    cache, and the predictor's calibration (keyed by the shapes, not the policy) from `calibration_dir`.
    Ctrl-C stops it (KeyboardInterrupt)."""
    prefix = setup.requests[:requests]
    attainment: dict[int, float | None] = {}
    chosen = knob.fallback
    for value in knob.candidates:
        label = f"{policy}[{knob.field}={value}]"
        result = run_policy(setup, policy, slo, out, settings={knob.field: value}, requests=prefix, name=label,
                            checkpoint=False, score=False)
        if result.interrupted:
            raise KeyboardInterrupt
        share = attainment[value] = summarize(result)["slo_attainment"]
        print(f"[{label}] sweep: {'-' if share is None else f'{share:.1%}'} of {len(prefix)} requests within the "
              f"TPOT SLO", file=sys.stderr)
        if share is None or share < target:
            break
        chosen = value
    return Sweep(policy, knob.field, attainment, chosen, len(prefix))


def tuned_settings(setup: Setup, policy: str, slo: Slo, out: Path) -> tuple[dict[str, Any], Sweep | None]:
    """The CoLocationConfig overrides a policy runs with: its knob (`KNOBS`) chosen by `sweep` over the first
    `sweep_requests` requests, unless that option is 0 or the policy has none."""
    n = setup.options["sweep_requests"]
    if policy not in KNOBS or not n:
        return {}, None
    knob = KNOBS[policy](setup.model.cfg, setup.options)
    result = sweep(setup, policy, knob, slo, out, n)
    print(f"[{policy}] {knob.field} = {result.chosen} (swept {dict(result.attainment)})", file=sys.stderr)
    return {knob.field: result.chosen}, result


# The report ------------------------------------------------------------------------------------------------------


def write_report(results: list[RunResult], setup: Setup, slo: Slo, sweeps: list[Sweep], out: Path) -> dict:
    """summary.json (per policy, the SLO once, the trace, the sweeps, the environment), the CSVs and the plots."""
    summaries = [summarize(r) for r in results]
    for r in results:
        write_csvs(r, out)
    plots = plot(results, out)
    options, trace = setup.options, setup.trace
    report = {
        "summary": summaries,
        "slo": slo.as_dict(),
        "options": {k: v for k, v in options.items() if k not in ("policies", "slo")},
        "trace": {"source": trace.source, "requests": len(trace), "duration_s": trace.duration,
                  "shrunk_to_fit": trace.shrunk, "problems": list(trace.problems)},
        "setup": {"role": options["role"], "prefill_s": setup.prefill_s, "prefilled": len(setup.prefilled),
                  "standalone_tokens_per_s": setup.standalone.tokens_per_s,
                  "standalone_steps_per_s": setup.standalone.steps_per_s,
                  "finetune_total_steps": finetune_steps(setup, slo)},
        "sweeps": [s.as_dict() for s in sweeps],
        "environment": {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                        "tpot_slo_ms": slo.tpot_s * 1e3, "cpu_count": os.cpu_count(),
                        "loadavg": [round(x, 2) for x in os.getloadavg()],
                        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
        "plots": [p.name for p in plots],
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _discard(out: Path | None, created: bool) -> None:
    """Removes the report directory of a run that produced nothing, when this run made it."""
    if out is not None and created and out.exists():
        shutil.rmtree(out, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("harli_jax").setLevel(logging.WARNING)  # the replay prints its own progress
    out, created, results, sweeps, setup, slo = None, False, [], [], None, None
    try:
        options = resolve_options(args)
        model = load_model(options["model"], seed=options["seed"], tensor_parallel=options["tp"])
        trace = replay_trace(options, model.cfg)
        for problem in trace.problems[:5]:
            print(f"skipped {problem}", file=sys.stderr)
        if trace.shrunk:
            print(f"{trace.shrunk} of {len(trace)} requests shrunk to fit the context", file=sys.stderr)
        if options["role"] == "decode":
            check_prefill_memory(trace, model.cfg, CacheConfig().page_tokens)
        out = Path(options["out"] or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        print(f"replaying {len(trace)} requests over {trace.duration:.1f}s from {trace.source} on {model.cfg.name} "
              f"in the {options['role']} role with {', '.join(options['policies'])}; report in {out}",
              file=sys.stderr)
        setup = prepare(model, trace, options, out)
        slo = slo_of(options["slo"], setup.solo, setup.mixed, options["prefill_interval"])
        print(f"[setup] TPOT SLO {slo.tpot_s * 1e3:.2f} ms, TBT cap {slo.tbt_s * 1e3:.2f} ms, for every policy; "
              f"the finetune job: {finetune_steps(setup, slo)} optimizer steps", file=sys.stderr)
        if slo.mixed is not None:
            print(f"[setup] prefill paced to a chunk every {slo.prefill_interval} steps while others decode",
                  file=sys.stderr)
            if slo.mixed.seconds > slo.tbt_s:
                print(f"[setup] warning: a mixed step ({slo.mixed.seconds * 1e3:.2f} ms) is longer than the TBT "
                      f"cap: every prefill chunk breaks it; a smaller --prefill-chunk shortens it", file=sys.stderr)
        for policy in options["policies"]:
            settings, swept = tuned_settings(setup, policy, slo, out)
            sweeps += [swept] if swept else []
            profile = Path(options["profile"]) / policy if options["profile"] else None
            adapter = Path(options["export_adapter"]) / policy if options["export_adapter"] else None
            results.append(run_policy(setup, policy, slo, out, settings=settings, profile=profile,
                                      export_adapter=adapter))
            if results[-1].interrupted:
                break
    except (HarliError, KeyboardInterrupt) as e:
        if isinstance(e, HarliError):
            print(f"harli replay: error: {e}", file=sys.stderr)
        if not results:
            _discard(out, created)
            return 2 if isinstance(e, HarliError) else 130
        write_report(results, setup, slo, sweeps, out)
        return 2 if isinstance(e, HarliError) else 130
    report = write_report(results, setup, slo, sweeps, out)
    print(format_table(report["summary"]))
    stages = format_stages(report["summary"])
    print(explain(options["policies"], options["role"]) + (f"\n{stages}" if stages else ""))
    print(f"\nreport: {out / 'summary.json'}, plots: {', '.join(report['plots'])}, CSVs per policy in {out}",
          file=sys.stderr)
    if options["profile"]:
        print(f"profiler sessions: {options['profile']}/<policy> (open the perfetto_trace.json.gz at "
              "ui.perfetto.dev, or the directory with TensorBoard's profile plugin)", file=sys.stderr)
    return 130 if any(r.interrupted for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
