"""The micro-batch executor: runs a finetune job's micro-batches on the micro-step path, one at a time. It leases
the stash pages of a micro-batch from the arena, moves it through its phases (`colocation.advance`) one
micro-step per call, hands its gradient to the job at the end, and abandons it (its samples back to the job,
nothing applied) when the page table takes its lease back for KV.

A micro-batch runs its forward either in chunks of layers ("forward" phase: micro-steps, or windows fused into an
inference step, `lora.fused.forward_window`) or, in token mode, in chunks of positions ("tokens" phase,
`lora.fused.forward_tokens`), alone or fused; its backward runs in slices of layers, alone or fused, either way.
For a fused step, `fused_call` gives the runner the arguments and `fused_done` takes its results."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.lora import data as data_lib
from harli_jax.lora import fused, trainer
from harli_jax.model.sharding import shape_of
from harli_jax.runtime.arena import Arena, Owner
from harli_jax.runtime.colocation import MicroKind, Phase, advance, largest_chunk

if TYPE_CHECKING:
    from harli_jax.runtime.job import FinetuneRunner

# Traced once per chunk size and static config, for every job and engine: a chunk's layer weights are arguments,
# so the chunk's start layer is data.
_forward_chunk = jax.jit(trainer.forward_chunk, static_argnames=("layout",), donate_argnames=("arena",))
_backward_chunk = jax.jit(trainer.backward_chunk, static_argnames=("layout",), donate_argnames=("grads",))
_loss_step = jax.jit(trainer.loss_step, static_argnames=("cfg",))
_forward_tokens = jax.jit(fused.forward_tokens, static_argnames=("layout", "chunk"), donate_argnames=("arena",))
_loss_gradient = jax.jit(fused.read_loss_gradient, static_argnames=("layout", "shape"))


class FusedCall(NamedTuple):
    """The finetune part of a fused step, named by the phase it advances: a token chunk of `size` positions
    (`kind` "tokens"), a forward window of `size` layers ("forward") or a backward slice of `size` layers
    ("backward"); and its program's training arguments in order."""

    kind: str
    size: int
    args: tuple


@dataclasses.dataclass
class MicroBatchRun:
    """A micro-batch on the micro-step path: where it is, what it holds, which pages it leased."""

    batch: data_lib.MicroBatch
    device_batch: trainer.TrainBatch
    lease: Owner
    stash_pages: jax.Array
    phase: Phase  # "forward" or "backward" and the layers left in it (colocation.advance moves it on)
    x: jax.Array | None = None  # hidden state (forward) or its gradient (backward)
    grads: Any = None
    loss_sum: jax.Array | None = None  # a token-chunked forward adds each chunk's loss to these
    count: jax.Array | None = None
    calibration: bool = False  # a timing run: dropped instead of committed at the end


class MicroStepResult(NamedTuple):
    """What a micro-step did (None: its micro-batch was abandoned, nothing ran) and its synchronized seconds."""

    kind: MicroKind | None
    seconds: float


class MicroBatchExecutor:
    """Runs one micro-batch at a time of `job` over the arena's stash pages."""

    def __init__(self, job: FinetuneRunner, arena: Arena):
        self.job, self.arena = job, arena
        # Set by the co-locator: whether a micro-batch may run its forward in token chunks (its stash then also
        # holds K/V and the loss gradient, so every lease is that size), and whether one does unless told.
        self.token_chunks = False
        self.token_mode = False
        self.current: MicroBatchRun | None = None
        self.busy_time = 0.0  # seconds of the job's micro-steps (calibration runs excluded)
        self._spare_grads = None  # the zeroed gradient buffers the last commit handed back
        self._leases = 0

    @property
    def tokens(self) -> int:
        """Tokens of a micro-batch (rows x positions)."""
        return self.job.job.micro_batch_rows * self.job.job.seq_len

    @property
    def stash_pages_needed(self) -> int:
        """Pages a new micro-batch leases (more where token chunks may run: their K/V and loss gradient too; one
        size for both kinds of forward, so every program sees one shape)."""
        layout = self.arena.layout
        return fused.token_stash_pages(layout, self.tokens) if self.token_chunks else layout.stash_pages(self.tokens)

    @property
    def held_pages(self) -> int:
        """Stash pages the micro-batch in flight holds."""
        return len(self.arena.table.pages(self.current.lease)) if self.current is not None else 0

    def status(self) -> Phase | None:
        """Where the micro-batch in flight is: its phase ("forward" or "backward") and the layers left in it, the
        most the next micro-step may cover; None when no micro-batch is in flight or its lease was taken back."""
        run = self.current
        if run is None or self._lease_lost(run):
            return None
        return run.phase

    def start(self, watermark: int = 0, calibration: bool = False, token_mode: bool | None = None) -> bool:
        """Leases stash pages and starts the job's next micro-batch, its forward in token chunks if `token_mode`
        (None: `self.token_mode`); False if no lease was granted or the job has no data left. A `calibration`
        micro-batch runs for timing only: at its end it is dropped like an abandoned one without counting as
        abandoned."""
        if self.current is not None:
            raise RuntimeError("a micro-batch is already in flight")
        token_mode = self.token_mode if token_mode is None else token_mode
        if token_mode and not self.token_chunks:
            raise RuntimeError("this job's micro-batches run their forwards in layer chunks only")
        lease = Owner("lease", f"{self.job.job.name}-{self._leases}")
        pages = self.arena.table.lease(lease.key, self.stash_pages_needed, watermark)
        if pages is None:
            return False
        self._leases += 1
        batch = self.job.next_batch()
        if batch is None:
            self.arena.table.release(lease.key)
            return False
        device_batch = trainer.TrainBatch.from_host(batch.arrays())
        phase = ("tokens", self.job.job.seq_len) if token_mode else ("forward", self.job.cfg.num_layers)
        run = MicroBatchRun(batch=batch, device_batch=device_batch, lease=lease,
                            stash_pages=jnp.asarray(np.asarray(pages, np.int32)), phase=phase, calibration=calibration)
        if token_mode:
            run.loss_sum, run.count = jnp.float32(0), jnp.float32(0)
        else:
            run.x = trainer.embed_step(self.job.params, device_batch)
        self.current = run
        return True

    def compile_programs(self, layer_sizes: Sequence[int], token_sizes: Sequence[int], forward: bool,
                         threads: int) -> None:
        """Compiles the micro-step programs in `threads` parallel threads (XLA compiles without the GIL): the backward
        slices of `layer_sizes`, with `forward` their forward chunks and the loss step, and the token chunks of
        `token_sizes` with the loss gradient's read. Any thread may call it before the job is registered: it leases
        nothing (the arena is only read for its shape) and runs the small eager operations of a micro-batch's start
        and end here, so that a micro-step of these sizes then compiles nothing."""
        job, layout = self.job, self.arena.layout
        batch = job.loader.next_batch()
        job.loader.push_back(batch)
        device_batch = trainer.TrainBatch.from_host(batch.arrays())
        buffer, pages = self.arena.buffer, jnp.asarray(np.zeros(self.stash_pages_needed, np.int32))
        lora, grads = job.state.lora, jax.tree.map(jnp.zeros_like, job.state.lora)
        x = trainer.embed_step(job.params, device_batch)
        lowerings = [functools.partial(_backward_chunk.lower, job.params.layers[:n], layout, lora, buffer, x, grads,
                                       device_batch, pages, jnp.int32(n)) for n in layer_sizes]
        if forward:
            lowerings.append(functools.partial(_loss_step.lower, job.params, job.cfg, x, device_batch))
            lowerings += [functools.partial(_forward_chunk.lower, job.params.layers[:n], layout, lora, buffer, x,
                                            device_batch, pages, jnp.int32(0)) for n in layer_sizes]
        if token_sizes:
            sums = (jnp.float32(0), jnp.float32(0))
            shape = (*device_batch.tokens.shape, job.cfg.hidden_size)
            lowerings.append(functools.partial(_loss_gradient.lower, layout, buffer, pages, shape))
            lowerings += [functools.partial(_forward_tokens.lower, job.params, layout, lora, buffer, device_batch,
                                            pages, jnp.int32(0), sums, chunk=n) for n in token_sizes]
        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            for _ in pool.map(lambda lower: lower().compile(), lowerings):
                pass

    def run(self, size: int) -> MicroStepResult:
        """Runs the next micro-step of the micro-batch in flight over `size` layers (positions, in a token-chunked
        forward), at most what its phase has left; abandons the micro-batch instead if its lease was taken
        back."""
        run = self.current
        if run is None:
            raise RuntimeError("no micro-batch in flight")
        if self._lease_lost(run):
            self.abandon()
            return MicroStepResult(None, 0.0)
        started = time.perf_counter()
        job, layout = self.job, self.arena.layout
        (phase, left), num_layers = run.phase, job.cfg.num_layers
        n = min(size, left)
        kind, run.phase = advance(run.phase, n, num_layers)
        lora = job.state.lora
        if phase == "tokens":
            start = job.job.seq_len - left
            run.loss_sum, run.count = self.arena.update(lambda buffer: _forward_tokens(
                job.params, layout, lora, buffer, run.device_batch, run.stash_pages, jnp.int32(start),
                (run.loss_sum, run.count), chunk=n)[:2])
            if kind is MicroKind.TOKENS_LAST:
                self._begin_backward(run)
        elif phase == "forward":
            start = num_layers - left
            run.x = self.arena.update(lambda buffer: _forward_chunk(
                job.params.layers[start: start + n], layout, lora, buffer, run.x, run.device_batch,
                run.stash_pages, jnp.int32(start)))
            if kind is MicroKind.FORWARD_LOSS:
                run.loss_sum, run.count, run.x = _loss_step(job.params, job.cfg, run.x, run.device_batch)
                run.grads = self._zero_grads()
        else:
            run.x, run.grads = _backward_chunk(job.params.layers[left - n: left], layout, lora, self.arena.buffer,
                                               run.x, run.grads, run.device_batch, run.stash_pages, jnp.int32(left))
            if kind is MicroKind.BACKWARD_COMMIT:
                self._finish(run)
        jax.block_until_ready((run.x, run.count, job.state.accum))
        seconds = time.perf_counter() - started
        if not run.calibration:
            self.busy_time += seconds
        return MicroStepResult(kind, seconds)

    def _zero_grads(self):
        spare, self._spare_grads = self._spare_grads, None
        return spare if spare is not None else jax.tree.map(jnp.zeros_like, self.job.state.lora)

    def _begin_backward(self, run: MicroBatchRun) -> None:
        """After a token-chunked forward: the backward starts from the stashed loss gradient."""
        shape = (*run.device_batch.tokens.shape, self.job.cfg.hidden_size)
        run.x = _loss_gradient(self.arena.layout, self.arena.buffer, run.stash_pages, shape)
        run.grads = self._zero_grads()

    # Fused steps ------------------------------------------------------------------------------------------------

    def fused_call(self, size: int) -> FusedCall | None:
        """The finetune part for the next inference step: the next token chunk of `size` positions, forward window
        or backward slice of `size` layers of the micro-batch in flight, as its phase says; None when there is
        none (a window never reaches the last layer: the loss runs as a micro-step) or its lease was taken
        back."""
        phase = self.status()
        if phase is None or size > phase[1] or (phase[0] == "forward" and size == phase[1]):
            return None
        run, job = self.current, self.job
        name, left = phase
        if name == "tokens":
            start = job.job.seq_len - left
            args = (job.state.lora, run.device_batch, run.stash_pages, jnp.int32(start), (run.loss_sum, run.count))
        elif name == "forward":
            start = job.cfg.num_layers - left
            args = (job.state.lora, run.x, run.device_batch, run.stash_pages, jnp.int32(start))
        else:
            args = (job.state.lora, job.params.layers[left - size: left], run.x, run.grads, run.device_batch,
                    run.stash_pages, jnp.int32(left))
        return FusedCall(name, size, args)

    def fused_examples(self, kind: str, size: int) -> tuple:
        """The training arguments of a fused call of this shape, as shapes (for compiling its programs)."""
        job, cfg = self.job, self.job.cfg
        rows, seq_len = job.job.micro_batch_rows, job.job.seq_len

        def like(tree):  # on the mesh the arrays lie on, if any
            return jax.tree.map(shape_of, tree)

        i32, f32 = jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32)
        batch = trainer.TrainBatch(*(jax.ShapeDtypeStruct((rows, seq_len), dtype) for dtype in (
            jnp.int32, jnp.int32, jnp.float32, jnp.int32, jnp.int32)))
        pages = jax.ShapeDtypeStruct((self.stash_pages_needed,), jnp.int32)
        lora = like(job.state.lora)
        if kind == "tokens":
            return lora, batch, pages, i32, (f32, f32)
        hidden = jax.ShapeDtypeStruct((rows, seq_len, cfg.hidden_size), jnp.dtype(cfg.dtype))
        if kind == "forward":
            return lora, hidden, batch, pages, i32
        return lora, like(job.params.layers[:size]), hidden, lora, batch, pages, i32

    def fused_trial(self, call: FusedCall, out) -> None:
        """Takes a timing run's results without moving the micro-batch on: only what its program consumed (the
        donated gradient buffers) is replaced."""
        if call.kind == "backward":
            self.current.grads = out[1]

    def fused_done(self, call: FusedCall, out) -> MicroKind:
        """Takes the results of a fused step's finetune part (`call`'s) and moves the micro-batch on."""
        run, num_layers = self.current, self.job.cfg.num_layers
        kind, run.phase = advance(run.phase, call.size, num_layers)
        if call.kind == "tokens":
            run.loss_sum, run.count = out
            if kind is MicroKind.TOKENS_LAST:
                self._begin_backward(run)
        elif call.kind == "forward":
            run.x = out
        else:
            run.x, run.grads = out
            if kind is MicroKind.BACKWARD_COMMIT:
                self._finish(run)
        return kind

    def run_to_end(self, layer_chunks: Sequence[int], token_chunks: Sequence[int] = ()) -> None:
        """Runs the micro-batch in flight to its end, each micro-step the largest of `layer_chunks` (of
        `token_chunks` in a token-chunked forward) that fits; drops it if its lease is taken back on the way."""
        while (pending := self.status()) is not None:
            self.run(largest_chunk(token_chunks if pending[0] == "tokens" else layer_chunks, pending[1]))
        self.abandon()

    def _finish(self, run: MicroBatchRun) -> None:
        self.current = None
        self.arena.table.release(run.lease.key)
        if run.calibration:
            self.job.return_batch(run.batch, abandoned=False)
        else:
            self._spare_grads = self.job.commit_microbatch(run.grads, run.loss_sum, run.count)

    def _lease_lost(self, run: MicroBatchRun) -> bool:
        return not self.arena.table.pages(run.lease)

    def abandon(self) -> None:
        """Drops the micro-batch in flight, if any: its samples go back to the front of the job's queue, no
        gradient is applied."""
        run, self.current = self.current, None
        if run is None:
            return
        self.arena.table.release(run.lease.key)
        self.job.return_batch(run.batch, abandoned=not run.calibration)

    def reclaimed(self, owners: Sequence[Owner]) -> None:
        """The page table took these leases back for KV: the micro-batch that used one is abandoned now."""
        if self.current is not None and self.current.lease in owners:
            self.abandon()
