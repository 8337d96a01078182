"""The micro-batch executor: runs a finetune job's micro-batches on the micro-step path, one at a time. It leases
the stash pages of a micro-batch from the arena, moves it through its phases (`colocation.advance`) one
micro-step per call, hands its gradient to the job at the end, and abandons it (its samples back to the job,
nothing applied) when the page table takes its lease back for KV."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from harli_jax.lora import data as data_lib
from harli_jax.lora import trainer
from harli_jax.runtime.arena import Arena, Owner
from harli_jax.runtime.colocation import MicroKind, Phase, advance, largest_chunk

if TYPE_CHECKING:
    from harli_jax.runtime.job import FinetuneRunner

# Traced once per chunk size and static config, for every job and engine: a chunk's layer weights are arguments,
# so the chunk's start layer is data.
_forward_chunk = jax.jit(trainer.forward_chunk, static_argnames=("layout",), donate_argnames=("arena",))
_backward_chunk = jax.jit(trainer.backward_chunk, static_argnames=("layout",), donate_argnames=("grads",))
_loss_step = jax.jit(trainer.loss_step, static_argnames=("cfg",))


@dataclasses.dataclass
class MicroBatchRun:
    """A micro-batch on the micro-step path: where it is, what it holds, which pages it leased."""

    batch: data_lib.MicroBatch
    device_batch: trainer.TrainBatch
    lease: Owner
    stash_pages: jax.Array
    layers_per_chunk: int
    phase: Phase  # "forward" or "backward" and the layers left in it (colocation.advance moves it on)
    x: jax.Array | None = None  # hidden state (forward) or its gradient (backward)
    grads: Any = None
    loss_sum: jax.Array | None = None
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
        self.current: MicroBatchRun | None = None
        self.busy_time = 0.0  # seconds of the job's micro-steps (calibration runs excluded)
        self._spare_grads = None  # the zeroed gradient buffers the last commit handed back
        self._leases = 0

    @property
    def stash_pages_needed(self) -> int:
        return self.arena.layout.stash_pages(self.job.job.micro_batch_rows * self.job.job.seq_len)

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

    def start(self, layers_per_chunk: int = 1, watermark: int = 0, calibration: bool = False) -> bool:
        """Leases stash pages and starts the job's next micro-batch; False if no lease was granted or the job has
        no data left. A `calibration` micro-batch runs for timing only: at its end it is dropped like an
        abandoned one without counting as abandoned."""
        if self.current is not None:
            raise RuntimeError("a micro-batch is already in flight")
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
        run = MicroBatchRun(batch=batch, device_batch=device_batch, lease=lease,
                            stash_pages=jnp.asarray(pages, jnp.int32), layers_per_chunk=layers_per_chunk,
                            phase=("forward", self.job.cfg.num_layers), calibration=calibration)
        run.x = trainer.embed_step(self.job.params, device_batch)
        self.current = run
        return True

    def run(self, layers: int | None = None) -> MicroStepResult:
        """Runs the next micro-step of the micro-batch in flight over `layers` layers (default: its chunk size, at
        most what its phase has left); abandons the micro-batch instead if its lease was taken back."""
        run = self.current
        if run is None:
            raise RuntimeError("no micro-batch in flight")
        if self._lease_lost(run):
            self.abandon()
            return MicroStepResult(None, 0.0)
        started = time.perf_counter()
        job, layout = self.job, self.arena.layout
        (phase, left), num_layers = run.phase, job.cfg.num_layers
        n = min(layers or run.layers_per_chunk, left)
        kind, run.phase = advance(run.phase, n, num_layers)
        lora = job.state.lora
        if phase == "forward":
            start = num_layers - left
            run.x = self.arena.update(lambda buffer: _forward_chunk(
                job.params.layers[start: start + n], layout, lora, buffer, run.x, run.device_batch,
                run.stash_pages, jnp.int32(start)))
            if kind is MicroKind.FORWARD_LOSS:
                run.loss_sum, run.count, run.x = _loss_step(job.params, job.cfg, run.x, run.device_batch)
                spare, self._spare_grads = self._spare_grads, None
                run.grads = spare if spare is not None else jax.tree.map(jnp.zeros_like, lora)
        else:
            run.x, run.grads = _backward_chunk(job.params.layers[left - n: left], layout, lora, self.arena.buffer,
                                               run.x, run.grads, run.device_batch, run.stash_pages, jnp.int32(left))
            if kind is MicroKind.BACKWARD_COMMIT:
                self._finish(run)
        jax.block_until_ready((run.x, job.state.accum))
        seconds = time.perf_counter() - started
        if not run.calibration:
            self.busy_time += seconds
        return MicroStepResult(kind, seconds)

    def run_to_end(self, chunks: Sequence[int]) -> None:
        """Runs the micro-batch in flight to its end, each micro-step the largest of `chunks` that fits; drops it
        if its lease is taken back on the way."""
        while (pending := self.status()) is not None:
            self.run(largest_chunk(chunks, pending[1]))
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
