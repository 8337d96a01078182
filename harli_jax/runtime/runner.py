"""The model runner (mechanism): owns the weights and the step programs, compiled over the shape buckets at
warm-up; packs a step's sequences into padded device arrays and runs the matching program over the arena."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from harli_jax.logs import StatusLine
from harli_jax.lora.adapters import empty_slots, slot_weights, write_slot
from harli_jax.lora.fused import forward_tokens, forward_window
from harli_jax.lora.trainer import backward_chunk
from harli_jax.model.config import ModelConfig
from harli_jax.model.paged import TokenBatch, paged_step, read_pages, write_pages
from harli_jax.model.params import LoRASlots, Params
from harli_jax.model.sampling import Logprobs, SamplingRows
from harli_jax.model.sharding import mesh_of, place, shard_slots, whole
from harli_jax.runtime.adapters import AdapterCatalog
from harli_jax.runtime.arena import Arena
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.distributed import Peers
from harli_jax.runtime.microbatch import FusedCall
from harli_jax.runtime.scheduler import SeqWork, StepPlan

log = logging.getLogger("harli_jax")


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """The static shape of a step program: sequences, tokens and pages per sequence. A decode bucket has one
    token per sequence; a mixed one room for a prefill chunk besides."""

    seqs: int
    tokens: int
    pages: int

    @property
    def decode_only(self) -> bool:
        return self.tokens == self.seqs


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What a step gave: the next token of every planned sequence (meaningful where its prompt is done), the
    program shape it ran in, and the host seconds spent packing its inputs."""

    tokens: np.ndarray
    bucket: Bucket
    pack_time: float
    logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (token, top, top ids) by planned sequence


@dataclasses.dataclass(frozen=True)
class InFlight:
    """A dispatched step: its plan, and its next tokens on the device (`[max_batch]`, by batch row) until read."""

    plan: StepPlan
    bucket: Bucket
    rows: np.ndarray  # the batch row of each planned sequence
    next_tokens: jax.Array
    pack_time: float
    dispatched: float  # perf_counter time of the dispatch
    fused: FusedCall | None = None  # the finetune work fused into the step
    fused_out: tuple | None = None  # its results on the device
    logprobs: Logprobs | None = None  # of its next tokens, by batch row (with `RunnerConfig.max_logprobs`)

    def output(self) -> StepOutput:
        """Waits for the step and reads its tokens (and their logprobs) back."""
        logprobs = None
        if self.logprobs is not None:
            logprobs = tuple(np.asarray(a)[self.rows] for a in (self.logprobs.token, self.logprobs.top,
                                                                 self.logprobs.top_ids))
        return StepOutput(np.asarray(self.next_tokens)[self.rows], self.bucket, self.pack_time, logprobs)


@dataclasses.dataclass(frozen=True)
class InputLayout:
    """Where each input of a bucket's step lies in the one int32 buffer they travel in (one host-to-device
    transfer per step); float32 and uint32 inputs travel as their bits. `max_query` and `long_rows` are the
    batch's static attention shape."""

    seqs: int
    tokens: int
    pages: int
    max_query: int
    long_rows: int
    logprobs: int | None = None  # the step's program also gives its tokens' Logprobs with this many top tokens

    @functools.cached_property
    def fields(self) -> tuple[tuple[str, tuple[int, ...], np.dtype, int], ...]:
        """(name, shape, dtype, offset) of every input, in buffer order."""
        b, t = self.seqs, self.tokens
        i32, f32, u32 = np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.uint32)
        specs = (("tokens", (t,), i32), ("positions", (t,), i32), ("page_ids", (t,), i32), ("offsets", (t,), i32),
                 ("token_source", (t,), i32), ("block_tables", (b, self.pages), i32), ("query_start", (b + 1,), i32),
                 ("context_lens", (b,), i32), ("sample_index", (b,), i32), ("temperature", (b,), f32),
                 ("top_k", (b,), i32), ("top_p", (b,), f32), ("seed", (b,), u32), ("counter", (b,), i32),
                 ("adapter_slots", (t,), i32))
        out, offset = [], 0
        for name, shape, dtype in specs:
            out.append((name, shape, dtype, offset))
            offset += math.prod(shape)
        return tuple(out)

    @property
    def size(self) -> int:
        _, shape, _, offset = self.fields[-1]
        return offset + math.prod(shape)

    def host(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A new buffer holding an empty step (no tokens; token sources and adapter slots -1, top_p 1) and a view
        of each input."""
        flat = np.zeros(self.size, np.int32)
        views = {name: flat[offset: offset + math.prod(shape)].view(dtype).reshape(shape)
                 for name, shape, dtype, offset in self.fields}
        views["token_source"][:] = -1
        views["adapter_slots"][:] = -1
        views["top_p"][:] = 1.0
        return flat, views

    def unpack(self, flat: jax.Array) -> tuple[TokenBatch, jax.Array]:
        """The batch and the token sources out of the buffer, inside the step program."""
        v = {}
        for name, shape, dtype, offset in self.fields:
            part = jax.lax.slice(flat, (offset,), (offset + math.prod(shape),)).reshape(shape)
            v[name] = part if dtype == np.int32 else jax.lax.bitcast_convert_type(part, dtype)
        sampling = SamplingRows(temperature=v["temperature"], top_k=v["top_k"], top_p=v["top_p"], seed=v["seed"],
                                counter=v["counter"])
        batch = TokenBatch(tokens=v["tokens"], positions=v["positions"], page_ids=v["page_ids"],
                           offsets=v["offsets"], block_tables=v["block_tables"], query_start=v["query_start"],
                           context_lens=v["context_lens"], sample_index=v["sample_index"], sampling=sampling,
                           adapter_slots=v["adapter_slots"], max_query=self.max_query, long_rows=self.long_rows)
        return batch, v["token_source"]


def _inference_batch(inputs, previous, layout) -> TokenBatch:
    """The batch packed in `inputs` (`layout`), its tokens at `token_source >= 0` those rows of the previous
    step's output `previous` (still on the device: the previous step need not have been read back)."""
    with jax.named_scope("inputs"):
        batch, token_source = layout.unpack(inputs)
        tokens = jnp.where(token_source >= 0, previous[jnp.maximum(token_source, 0)], batch.tokens)
    return dataclasses.replace(batch, tokens=tokens)


def _padded(next_tokens, previous):
    return jnp.zeros_like(previous).at[: next_tokens.shape[0]].set(next_tokens)


def _step(params, cfg, arena, inputs, previous, layout, attention_impl, mesh, lora):
    """The step over the batch packed in `inputs`; returns (arena, next tokens padded to `previous`'s size, their
    Logprobs or None)."""
    arena, next_tokens, *logprobs = paged_step(params, cfg, arena, _inference_batch(inputs, previous, layout),
                                               attention_impl=attention_impl, lora=lora, logprobs=layout.logprobs,
                                               mesh=mesh)
    return arena, *whole((_padded(next_tokens, previous), (logprobs or [None])[0]), mesh)


def _fused_tokens_step(params, cfg, arena, inputs, previous, layout, attention_impl, mesh, lora, stash, train_lora,
                       batch, stash_pages, start, totals, chunk):
    """The step with a micro-batch's token chunk of `chunk` positions in its program (`lora.fused`); returns
    (arena, next tokens, their Logprobs or None, the micro-batch's loss totals)."""
    arena, totals, next_tokens, *logprobs = forward_tokens(
        params, stash, train_lora, arena, batch, stash_pages, start, totals, chunk=chunk,
        inference=_inference_batch(inputs, previous, layout), serving_lora=lora, attention_impl=attention_impl,
        logprobs=layout.logprobs)
    return arena, *whole((_padded(next_tokens, previous), (logprobs or [None])[0]), mesh), totals


def _fused_forward_step(params, cfg, arena, inputs, previous, layout, attention_impl, mesh, lora, stash, train_lora,
                        x, batch, stash_pages, start, layers):
    """The step with a layer window of `layers` layers of a micro-batch in its program (`lora.fused`); returns
    (arena, next tokens, their Logprobs or None, the window's output)."""
    arena, out, next_tokens, *logprobs = forward_window(
        params, stash, train_lora, arena, x, batch, stash_pages, start, layers=layers,
        inference=_inference_batch(inputs, previous, layout), serving_lora=lora, attention_impl=attention_impl,
        logprobs=layout.logprobs)
    return arena, *whole((_padded(next_tokens, previous), (logprobs or [None])[0]), mesh), out


def _fused_backward_step(params, cfg, arena, inputs, previous, layout, attention_impl, mesh, lora, stash,
                         train_lora, layers, g, grads, batch, stash_pages, end):
    """The step, then a backward slice over `layers` (ending at layer `end`) of a micro-batch in the same
    program; returns (arena, next tokens, their Logprobs or None, (gradient w.r.t. the slice's input, LoRA
    gradients))."""
    arena, next_tokens, logprobs = _step(params, cfg, arena, inputs, previous, layout, attention_impl, mesh, lora)
    return arena, next_tokens, logprobs, backward_chunk(layers, stash, train_lora, arena, g, grads, batch,
                                                        stash_pages, end)


_STATIC = ("cfg", "layout", "attention_impl", "mesh")
_STEP_ARGS = 5  # a fused program's arguments before the training ones: params, arena, inputs, previous, lora
_step_jit = jax.jit(_step, static_argnames=_STATIC, donate_argnames=("arena",))
_fused_jit = {"tokens": jax.jit(_fused_tokens_step, static_argnames=(*_STATIC, "stash", "chunk"),
                                donate_argnames=("arena",)),
              "forward": jax.jit(_fused_forward_step, static_argnames=(*_STATIC, "stash", "layers"),
                                 donate_argnames=("arena",)),
              "backward": jax.jit(_fused_backward_step, static_argnames=(*_STATIC, "stash"),
                                  donate_argnames=("arena", "grads"))}
_read_pages_jit = jax.jit(read_pages)
_write_pages_jit = jax.jit(write_pages, donate_argnames=("arena",))


def page_copy_buckets(max_pages: int) -> tuple[int, ...]:
    """The page counts whole-page copies pad to: x4 steps down from `max_pages` (a copy moves what it needs)."""
    buckets = [max_pages]
    while buckets[-1] // 4 >= 4:
        buckets.append(buckets[-1] // 4)
    return tuple(sorted(buckets))


def _split_arena(results: tuple) -> tuple:
    arena, *out = results
    return arena, tuple(out)


def use_compile_cache(directory: str | None) -> None:
    """Points JAX's persistent compilation cache at `directory` (default ~/.cache/harli_jax/xla), keeping every
    program however quick its compile (a 30-layer model's micro-steps compile in under JAX's 1 s default each, and
    a run makes a dozen), unless JAX already has a cache, or has it disabled (`jax_enable_compilation_cache`);
    "off" disables it."""
    if directory == "off":
        jax.config.update("jax_enable_compilation_cache", False)
    elif jax.config.jax_compilation_cache_dir is None and jax.config.jax_enable_compilation_cache:
        path = Path(directory).expanduser() if directory else Path.home() / ".cache" / "harli_jax" / "xla"
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class ModelRunner:
    """Runs plans: one compiled program per bucket over the engine's weights and arena."""

    def __init__(self, cfg: ModelConfig, params: Params, engine_cfg: EngineConfig, arena: Arena,
                 adapters: AdapterCatalog | None = None, peers: Peers | None = None):
        use_compile_cache(engine_cfg.runner.compile_cache_dir)
        self.cfg = cfg
        self.params = params
        self.settings, self.prefill_chunk = engine_cfg.runner, engine_cfg.scheduler.prefill_chunk
        self.max_prefill_seqs = engine_cfg.scheduler.max_prefill_seqs
        self.page_tokens = arena.layout.page_tokens
        self.arena = arena
        self.batch_buckets = engine_cfg.scheduler.resolved_batch_buckets()
        self.page_buckets = engine_cfg.resolved_page_buckets(cfg)
        self.buckets = sorted(
            Bucket(b, b + extra, p)
            for b in self.batch_buckets for extra in (0, self.prefill_chunk) for p in self.page_buckets)
        self._programs: dict[Bucket, jax.stages.Compiled] = {}
        # Fused step programs by (bucket, "tokens", "forward" or "backward", size), compiled for a job
        # (`prepare_fused`).
        self._fused: dict[tuple[Bucket, str, int], jax.stages.Compiled] = {}
        # Whole-page copies (prefilled-KV import and export), one program each per page count of `copy_buckets`:
        # the page ids are padded with the null page, which `write_pages` never writes.
        self.copy_buckets = page_copy_buckets(self.page_buckets[-1])
        self._page_copies: dict[int, tuple[jax.stages.Compiled, jax.stages.Compiled]] = {}
        served = engine_cfg.adapters
        # The resident adapter slots every step program takes (None: the base model only), and the adapter each
        # slot holds now: a slot is written before the first step whose tokens use it with another adapter.
        self.mesh = mesh_of(params)  # the tensor-parallel mesh the weights lie on (None: one device)
        self.lora: LoRASlots | None = shard_slots(
            empty_slots(cfg, served.max_loras, served.max_lora_rank, served.lora_targets)
            if served.max_loras else None, self.mesh)
        self.adapters = adapters
        self.logprobs = engine_cfg.runner.max_logprobs  # top logprobs every step program gives (None: none)
        self._slot_holds: dict[int, str] = {}
        self.peers = peers  # the other processes of a multi-process engine, told of every step program run
        self._last_tokens: jax.Array | None = None  # the next tokens of the last step run
        # Host inputs are whole on every device (under jax.distributed every process passes the same ones).
        self._host_inputs = None if self.mesh is None else NamedSharding(self.mesh, P())
        no_previous = np.zeros(self.batch_buckets[-1], np.int32)  # for a step whose tokens are all known
        self._no_previous = jnp.asarray(no_previous) if self.mesh is None else place(no_previous, self._host_inputs)

    def _write_slots(self, work: Sequence[SeqWork]) -> None:
        """Writes the resident slots the step's sequences use whose weights are another adapter's."""
        for w in work:
            if w.adapter is not None and self._slot_holds.get(w.adapter_slot) != w.adapter:
                weights = self.adapters.weights(w.adapter)
                self.lora = write_slot(self.lora, np.int32(w.adapter_slot), weights)
                self._slot_holds[w.adapter_slot] = w.adapter

    def forget_adapter(self, name: str) -> None:
        """No slot holds `name` any more (it is no longer served: a later adapter of that name is written anew)."""
        self._slot_holds = {slot: held for slot, held in self._slot_holds.items() if held != name}

    def bucket_for(self, seqs: int, tokens: int, pages: int) -> Bucket:
        """The smallest bucket of `seqs` sequences with `tokens` tokens in all (each has at least one)."""
        b = self.batch_buckets[bisect.bisect_left(self.batch_buckets, seqs)]
        p = self.page_buckets[bisect.bisect_left(self.page_buckets, pages)]
        return Bucket(b, b if tokens == seqs else b + self.prefill_chunk, p)

    def layout(self, bucket: Bucket) -> InputLayout:
        """The bucket's input layout: a decode bucket's one query per sequence, or a mixed bucket's chunks of at
        most `prefill_chunk` tokens in its first `max_prefill_seqs` rows (where `_pack` puts them)."""
        if bucket.decode_only:
            return InputLayout(bucket.seqs, bucket.tokens, bucket.pages, max_query=1, long_rows=0,
                               logprobs=self.logprobs)
        return InputLayout(bucket.seqs, bucket.tokens, bucket.pages, max_query=self.prefill_chunk,
                           long_rows=min(self.max_prefill_seqs, bucket.seqs), logprobs=self.logprobs)

    def compile(self, bucket: Bucket) -> jax.stages.Compiled:
        layout = self.layout(bucket)
        inputs = jax.ShapeDtypeStruct((layout.size,), jnp.int32, sharding=self._host_inputs)
        return _step_jit.lower(self.params, self.cfg, self.arena.buffer, inputs, self._no_previous, layout,
                               self.settings.attention_impl, self.mesh, self.lora).compile()

    def compile_fused(self, bucket: Bucket, kind: str, size: int, args: tuple) -> jax.stages.Compiled:
        """The program of `bucket` with a finetune token chunk (`kind` "tokens", `size` positions), forward window
        ("forward", `size` layers) or backward slice ("backward", `size` layers) fused in, for training arguments
        shaped like `args`."""
        layout = self.layout(bucket)
        inputs = jax.ShapeDtypeStruct((layout.size,), jnp.int32, sharding=self._host_inputs)
        sizes = {"tokens": {"chunk": size}, "forward": {"layers": size}}.get(kind, {})
        return _fused_jit[kind].lower(self.params, self.cfg, self.arena.buffer, inputs, self._no_previous, layout,
                                      self.settings.attention_impl, self.mesh, self.lora, self.arena.layout, *args,
                                      **sizes).compile()

    def compile_fused_programs(self, shapes: dict[tuple[str, int], tuple]) -> dict:
        """The fused programs for these (kind, size) shapes and their training arguments, compiled in parallel
        threads (any thread may call it: nothing of the runner changes): one per decode batch bucket, at the
        largest page bucket, which every decode step of that batch fits (`fused_bucket`); a step of another shape
        never fuses. `add_fused` takes them."""
        todo = [(b, kind, size) for b in self.buckets if b.decode_only and b.pages == self.page_buckets[-1]
                for kind, size in shapes if (b, kind, size) not in self._fused]
        if not todo:
            return {}
        started = time.perf_counter()
        status = StatusLine("compiling fused step programs", len(todo))
        workers = self.settings.compile_threads or os.cpu_count() or 1
        programs = {}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            compiled = pool.map(lambda key: self.compile_fused(*key, shapes[key[1:]]), todo)
            for done, (key, program) in enumerate(zip(todo, compiled, strict=True), 1):
                programs[key] = program
                status.update(done)
        status.close()
        log.info("compiled %d fused step programs in %.1fs", len(todo), time.perf_counter() - started)
        return programs

    def add_fused(self, programs: dict) -> None:
        """Takes fused programs (`compile_fused_programs`): a step of their shape may fuse from now on."""
        self._fused.update(programs)

    def prepare_fused(self, shapes: dict[tuple[str, int], tuple]) -> None:
        """Compiles and takes the fused programs of these shapes (`compile_fused_programs`)."""
        self.add_fused(self.compile_fused_programs(shapes))

    def can_fuse(self, bucket: Bucket, kind: str, size: int) -> bool:
        return (bucket, kind, size) in self._fused

    def fused_bucket(self, plan: StepPlan) -> Bucket:
        """The program shape a (non-empty) plan runs in when work is fused into it: its own bucket at the largest
        page bucket (fused programs are compiled there only: a few programs for every decode step)."""
        return dataclasses.replace(self.bucket_of(plan), pages=self.page_buckets[-1])

    def fused_program(self, bucket: Bucket, kind: str, size: int) -> jax.stages.Compiled:
        """The compiled program of `bucket` with (kind, size) fused in (`prepare_fused` compiled it)."""
        return self._fused[(bucket, kind, size)]

    def _compile_page_copies(self, pages: int) -> tuple[jax.stages.Compiled, jax.stages.Compiled]:
        ids = jax.ShapeDtypeStruct((pages,), jnp.int32)
        buffer = self.arena.buffer
        block = jax.ShapeDtypeStruct(self.arena.layout.shape(pages), buffer.dtype)
        return (_read_pages_jit.lower(buffer, ids).compile(), _write_pages_jit.lower(buffer, ids, block).compile())

    def page_copy(self, num_pages: int) -> tuple[int, jax.stages.Compiled, jax.stages.Compiled]:
        """(the page count `num_pages` pads to, its page-read program, its in-place page-write program)."""
        padded = self.copy_buckets[bisect.bisect_left(self.copy_buckets, num_pages)]
        if padded not in self._page_copies:
            self._page_copies[padded] = self._compile_page_copies(padded)
        return padded, *self._page_copies[padded]

    def warmup(self) -> None:
        """Compiles every bucket's program (in parallel threads: XLA compiles without the GIL) and runs it once,
        and compiles the page copies of every copy bucket and the slot-writing program (so that an adapter's first
        request compiles nothing)."""
        for pages in self.copy_buckets:
            self.page_copy(pages)
        if self.lora is not None:  # zeros into slot 0, which holds no adapter yet
            self.lora = write_slot(self.lora, np.int32(0), slot_weights({}, self.lora))
        todo = [b for b in self.buckets if b not in self._programs]
        if not todo:
            return
        started = time.perf_counter()
        log.info("compiling %d step programs (%d batch x %d page buckets, decode and prefill)...",
                 len(todo), len(self.batch_buckets), len(self.page_buckets))
        workers = self.settings.compile_threads or os.cpu_count() or 1
        status = StatusLine("compiling step programs", len(todo))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for done, (bucket, program) in enumerate(zip(todo, pool.map(self.compile, todo), strict=True), 1):
                self._programs[bucket] = program
                status.update(done)
        status.close()
        for bucket in todo:  # a program's first run is slow (the runtime's own setup): not in a served step
            self.time_synthetic(bucket)
        log.info("compiled %d step programs in %.1fs", len(todo), time.perf_counter() - started)

    def program(self, bucket: Bucket) -> jax.stages.Compiled:
        """The compiled step program of `bucket` (compiled now if warm-up did not)."""
        program = self._programs.get(bucket)
        if program is None:
            program = self._programs[bucket] = self.compile(bucket)
        return program

    def bucket_of(self, plan: StepPlan) -> Bucket:
        """The program shape a (non-empty) plan runs in."""
        return self.bucket_for(len(plan.work), plan.num_tokens, max(len(w.block_table) for w in plan.work))

    def execute(self, plan: StepPlan) -> StepOutput:
        """Runs the plan's sequences as one step and reads its tokens back."""
        return self.dispatch(plan).output()

    def dispatch(self, plan: StepPlan, previous: InFlight | None = None, fused: FusedCall | None = None) -> InFlight:
        """Imports the plan's prefilled K/V pages, then starts its step without waiting for it. The input token
        of a sequence that `plan.previous` maps to a sequence of `previous` is that one's output, taken on the
        device. With `fused`, that finetune work runs in the step's program (`prepare_fused` compiled it)."""
        dispatched = time.perf_counter()
        for page_ids, pages in plan.imports:
            self.write_pages(page_ids, pages)
        work = plan.work
        self._write_slots(work)
        packing = time.perf_counter()
        bucket = self.bucket_of(plan) if fused is None else self.fused_bucket(plan)
        rows = self._rows(work)
        inputs, views = self._pack(work, rows, bucket)
        if plan.previous:
            if previous is None:
                raise ValueError("the plan takes tokens from a previous step, and none was given")
            sources = np.asarray(plan.previous)
            mapped = sources >= 0
            views["token_source"][views["query_start"][rows[mapped]]] = previous.rows[sources[mapped]]
        pack_time = time.perf_counter() - packing
        if fused is None:
            next_tokens, logprobs = self._run_step(bucket, inputs, previous.next_tokens if previous else None)
            return InFlight(plan, bucket, rows, next_tokens, pack_time, dispatched, logprobs=logprobs)
        last = previous.next_tokens if previous is not None else self._no_previous
        program = self.fused_program(bucket, fused.kind, fused.size)
        args = self._fused_args(program, fused.args)
        next_tokens, logprobs, out = self.arena.update(lambda buffer: _split_arena(
            program(self.params, buffer, inputs, last, self.lora, *args)))
        return InFlight(plan, bucket, rows, next_tokens, pack_time, dispatched, fused, out, logprobs)

    @staticmethod
    def _rows(work: Sequence[SeqWork]) -> np.ndarray:
        """The batch row of each planned sequence: prefill chunks first (the ragged attention's long rows), then
        the rest in plan order."""
        order = sorted(range(len(work)), key=lambda i: len(work[i].tokens) == 1)
        rows = np.empty(len(work), np.int64)
        rows[order] = np.arange(len(work))
        return rows

    def _pack(self, work: Sequence[SeqWork], rows: np.ndarray, bucket: Bucket) -> tuple[np.ndarray, dict]:
        """The step's inputs in a new buffer (see `InputLayout`), and the views that wrote it."""
        inputs, v = self.layout(bucket).host()
        tokens, positions, page_ids, offsets, tables = (v[k] for k in (
            "tokens", "positions", "page_ids", "offsets", "block_tables"))
        query_start, context_lens, sample_index = v["query_start"], v["context_lens"], v["sample_index"]
        adapter_slots = v["adapter_slots"]
        temperature, top_k, top_p, seed, counter = (v[k] for k in ("temperature", "top_k", "top_p", "seed", "counter"))
        cursor, page_tokens = 0, self.page_tokens
        for i in np.argsort(rows):
            w, row = work[i], rows[i]
            n = len(w.tokens)
            tables[row, : len(w.block_table)] = w.block_table
            if n == 1:  # a decode token: scalars, not array operations
                p = w.start
                tokens[cursor], positions[cursor], adapter_slots[cursor] = w.tokens[0], p, w.adapter_slot
                page_ids[cursor], offsets[cursor] = w.block_table[p // page_tokens], p % page_tokens
            else:
                pos = np.arange(w.start, w.start + n, dtype=np.int32)
                span = slice(cursor, cursor + n)
                tokens[span], positions[span], adapter_slots[span] = w.tokens, pos, w.adapter_slot
                page_ids[span], offsets[span] = tables[row, pos // page_tokens], pos % page_tokens
            sample_index[row], context_lens[row] = cursor + n - 1, w.start + n
            s = w.sampling
            temperature[row], top_k[row], top_p[row], seed[row], counter[row] = (
                s.temperature, s.top_k, s.top_p, s.seed, w.counter)
            cursor += n
            query_start[row + 1] = cursor
        query_start[len(work) + 1:] = cursor
        return inputs, v

    def time_synthetic(self, bucket: Bucket, seed: int = 0, scratch_page: int = 0) -> tuple[int, float]:
        """Runs `bucket`'s program on a synthetic batch that fills its shape: random contexts over random pages
        (a mixed bucket's prefill chunks in its long rows), every K/V write into `scratch_page` (a page nobody
        owns), so no cache is changed. With scratch page 0 nothing is written and the attention sees empty
        sequences. Returns (attended context, seconds)."""
        inputs, context = self._synthetic_inputs(bucket, seed, scratch_page)
        self.program(bucket)  # compiled before the clock starts
        started = time.perf_counter()
        np.asarray(self._run_step(bucket, inputs, None)[0])
        return context, time.perf_counter() - started

    def _fused_args(self, program: jax.stages.Compiled, args: tuple) -> tuple:
        """A fused call's training arguments laid out over the mesh as its compiled program takes them (moved only
        where an array lies otherwise, e.g. a micro-step's output that XLA split another way)."""
        if self.mesh is None:
            return args
        return jax.device_put(args, program.input_shardings[0][_STEP_ARGS:])

    def _run_step(self, bucket: Bucket, inputs: np.ndarray, previous: jax.Array | None) -> tuple:
        """Runs `bucket`'s program on the packed `inputs` (its input tokens at `token_source` from `previous`, the
        last step's next tokens) over the arena, announced first to the other processes if this is process 0 of
        several; returns (next tokens, their Logprobs or None)."""
        if self.peers is not None and self.peers.leader:
            if previous is not None and previous is not self._last_tokens:
                raise RuntimeError("a multi-process step can take tokens from the last step only")
            self.peers.announce((bucket.seqs, bucket.tokens, bucket.pages), previous is not None, inputs)
        program = self.program(bucket)
        last = self._no_previous if previous is None else previous
        out = self.arena.update(lambda buffer: _split_arena(program(self.params, buffer, inputs, last, self.lora)))
        self._last_tokens = out[0]
        return out

    def follow(self) -> None:
        """Runs the step programs that process 0 announces, in its order, until it releases the others (on a
        process other than 0)."""
        while (call := self.peers.receive()) is not None:
            self._run_step(Bucket(*call.shape), call.inputs, self._last_tokens if call.takes_previous else None)

    def time_fused(self, bucket: Bucket, fused: FusedCall, seed: int = 0,
                   scratch_page: int = 0) -> tuple[int, float, tuple]:
        """`time_synthetic` of `bucket`'s program with `fused` in it; also returns the finetune part's results."""
        inputs, context = self._synthetic_inputs(bucket, seed, scratch_page)
        program = self.fused_program(bucket, fused.kind, fused.size)
        args = self._fused_args(program, fused.args)
        started = time.perf_counter()
        next_tokens, _, out = self.arena.update(lambda buffer: _split_arena(
            program(self.params, buffer, inputs, self._no_previous, self.lora, *args)))
        jax.block_until_ready((next_tokens, out))
        return context, time.perf_counter() - started, out

    def _synthetic_inputs(self, bucket: Bucket, seed: int, scratch_page: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng(seed)
        num_pages = self.arena.table.num_pages
        b, p, t = bucket.seqs, bucket.pages, bucket.tokens
        layout = self.layout(bucket)
        query_lens = np.ones(b, np.int64)
        if layout.long_rows:
            query_lens[:layout.long_rows] = np.diff(
                np.linspace(0, self.prefill_chunk + layout.long_rows, layout.long_rows + 1).astype(int))
        query_lens = np.minimum(query_lens, min(layout.max_query, p * self.page_tokens))
        contexts = np.maximum(rng.integers(1, p * self.page_tokens + 1, b), query_lens)
        inputs, v = layout.host()
        v["query_start"][1:] = np.cumsum(query_lens)
        used = int(v["query_start"][-1])
        seq_of = np.repeat(np.arange(b), query_lens)
        v["positions"][:used] = contexts[seq_of] - query_lens[seq_of] + np.arange(used) - v["query_start"][seq_of]
        v["tokens"][:] = rng.integers(0, self.cfg.vocab_size, t)
        v["page_ids"][:used] = scratch_page
        v["offsets"][:] = np.arange(t) % self.page_tokens
        v["block_tables"][:] = rng.integers(1, max(num_pages, 2), (b, p))
        v["context_lens"][:] = contexts if scratch_page else 0
        v["sample_index"][:] = v["query_start"][1:] - 1
        return inputs, int(contexts.sum())

    def read_pages(self, page_ids: Sequence[int]) -> np.ndarray:
        """The K/V of whole pages, `[len(page_ids), layers, 2, kv_heads, page_tokens, head_dim]`."""
        n = len(page_ids)
        padded, read, _ = self.page_copy(n)
        ids = np.zeros(padded, np.int32)
        ids[:n] = page_ids
        return np.asarray(read(self.arena.buffer, ids))[:n].copy()  # not a view that keeps the padding alive

    def write_pages(self, page_ids: Sequence[int], pages: np.ndarray) -> None:
        """Writes whole pages (the inverse of `read_pages`) in place."""
        n = len(page_ids)
        padded, _, write = self.page_copy(n)
        ids = np.zeros(padded, np.int32)
        ids[:n] = page_ids
        block = np.zeros(self.arena.layout.shape(padded), self.arena.buffer.dtype)
        block[:n] = pages
        self.arena.update(lambda buffer: (write(buffer, ids, block), None))
