"""Finetune jobs: what the user registers (FinetuneJob), what they hold (JobHandle), and the job's training state
(FinetuneRunner): data, Optax updates, counters and history, evaluation, checkpoints and resume. Its micro-step
path is the micro-batch executor (runtime/microbatch.py)."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.errors import ConfigError
from harli_jax.logs import StatusLine
from harli_jax.lora import data as data_lib
from harli_jax.lora import trainer
from harli_jax.lora.adapters import LoRAConfig, export_peft, init_lora
from harli_jax.lora.checkpoint import TrainCheckpointer
from harli_jax.model.config import ModelConfig
from harli_jax.model.params import Params
from harli_jax.model.tokenizer import Tokenizer
from harli_jax.options import option
from harli_jax.runtime.arena import Arena
from harli_jax.runtime.colocation import micro_sequence
from harli_jax.runtime.microbatch import MicroBatchExecutor

log = logging.getLogger("harli_jax")


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    """A LoRA finetune: data, adapter, optimizer, micro-batch shape, length, checkpoints and evaluation.

    `dataset` is a JSONL path, a list of records, or None for the embedded default task. The job trains
    `total_steps` optimizer steps, or `epochs` passes over the training split when `total_steps` is None.
    Each optimizer step averages `grad_accum` micro-batches of `micro_batch_rows x seq_len` tokens.
    """

    dataset: str | Path | Sequence[dict] | None = option(
        None, "JSONL of {text} | {prompt, completion} | {messages} records, or a list of them; unset: the embedded "
              "upper-casing task")
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    learning_rate: float = option(3e-3, "peak learning rate (warmup, then cosine decay)")
    warmup_steps: int = option(10, "optimizer steps of linear warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "global gradient-norm clip")
    micro_batch_rows: int = option(8, "rows per micro-batch")
    seq_len: int = option(128, "tokens per row")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    total_steps: int | None = option(200, "optimizer steps; unset: `epochs` passes over the data")
    epochs: int | None = option(None, "passes over the training split when total_steps is unset")
    eval_fraction: float = option(0.05, "share of the dataset held out for evaluation")
    eval_interval: int = option(50, "optimizer steps between evaluations (0: only at the end)")
    checkpoint_dir: str | Path | None = option(None, "Orbax checkpoints; an existing one is resumed")
    checkpoint_interval: int = option(100, "optimizer steps between checkpoints")
    seed: int = option(0, "seed of the data order and the adapter's init")
    strict_data: bool = option(False, "malformed dataset lines are an error instead of being skipped")
    overflow: str = option("truncate", "samples longer than seq_len: truncate or split")
    remat: bool = option(False, "single-program path: recompute each layer in backward instead of storing it")
    max_nonfinite: int = option(3, "consecutive non-finite updates (skipped) before the job pauses")
    history_limit: int = option(100_000, "newest optimizer steps kept in the history and its checkpoints")
    name: str = option("finetune", "the job's name in logs and lease ids")

    def __post_init__(self):
        for field in ("micro_batch_rows", "seq_len", "grad_accum", "checkpoint_interval", "max_nonfinite",
                      "history_limit"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"FinetuneJob.{field} must be a positive integer, got {value!r}")
        if self.total_steps is None and self.epochs is None:
            raise ConfigError("FinetuneJob needs total_steps or epochs")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ConfigError(f"FinetuneJob.total_steps must be positive, got {self.total_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"FinetuneJob.epochs must be positive, got {self.epochs}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"FinetuneJob.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.learning_rate <= 0:
            raise ConfigError(f"FinetuneJob.learning_rate must be > 0, got {self.learning_rate}")
        if self.overflow not in ("truncate", "split"):
            raise ConfigError(f"FinetuneJob.overflow must be 'truncate' or 'split', got {self.overflow!r}")


class JobStatus(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True)
class JobProgress:
    step: int
    total_steps: int | None
    tokens: int  # trained (loss) tokens whose gradient was accumulated
    loss: float | None  # of the last optimizer step
    eval_loss: float | None
    tokens_per_s: float  # trained tokens per second of the job's running time
    status: JobStatus
    reason: str | None  # why it paused
    skipped_updates: int  # non-finite updates skipped
    abandoned_microbatches: int  # whose lease was reclaimed


# The training programs, traced once per shape and static config for every job (the optimizer is static by its
# config, a hashable dataclass, so a second job with the same settings reuses the first one's programs).
_grad_step = jax.jit(trainer.grad_step, static_argnames=("cfg", "remat"), donate_argnames=("state",))
_update = jax.jit(trainer.apply_update, static_argnums=0, donate_argnames=("state",))
_eval_loss = jax.jit(trainer.loss_sum, static_argnames=("cfg", "remat"))
_commit = jax.jit(trainer.commit, donate_argnames=("state", "grads"))


def _to_device(batch: data_lib.MicroBatch) -> trainer.TrainBatch:
    return trainer.TrainBatch(**{k: jnp.asarray(v) for k, v in batch.arrays().items()})


class FinetuneRunner:
    """A job's training state over the engine's weights: data, adapter and optimizer state, counters, history,
    evaluation, checkpoints, and the single-program path; its micro-step path is `micro`."""

    def __init__(self, job: FinetuneJob, cfg: ModelConfig, params: Params, tokenizer: Tokenizer | None,
                 arena: Arena):
        if tokenizer is None:
            raise ConfigError("finetuning needs a tokenizer to encode the dataset; this model has none")
        self.job, self.cfg, self.params = job, cfg, params
        records = data_lib.default_dataset(seed=job.seed) if job.dataset is None else job.dataset
        if isinstance(records, (str, Path)):
            dataset = data_lib.load_jsonl(records, tokenizer, strict=job.strict_data)
        else:
            dataset = data_lib.from_records(records, tokenizer, strict=job.strict_data)
        self.train_set, self.eval_set = data_lib.split(dataset, job.eval_fraction, job.seed) \
            if job.eval_fraction > 0 else (dataset, None)
        self.loader = data_lib.DataLoader(self.train_set, job.micro_batch_rows, job.seq_len, seed=job.seed,
                                          epochs=job.epochs if job.total_steps is None else None,
                                          overflow=job.overflow, vocab_size=cfg.vocab_size)
        total = job.total_steps
        if total is None:
            batches = self._count_batches()
            total = max(1, batches // job.grad_accum)
        self.total_steps = total
        self.optimizer = trainer.OptimizerConfig(learning_rate=job.learning_rate, warmup_steps=job.warmup_steps,
                                                 total_steps=total, weight_decay=job.weight_decay,
                                                 max_grad_norm=job.max_grad_norm)
        self.state = trainer.init_state(init_lora(cfg, job.lora, seed=job.seed), trainer.make_optimizer(self.optimizer))

        self.status, self.reason = JobStatus.RUNNING, None
        self.step = 0
        self.tokens = 0
        self.microbatches_in_step = 0
        self.step_loss_sum, self.step_tokens = 0.0, 0.0
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.history: deque[dict[str, float]] = deque(maxlen=job.history_limit)  # step, loss, tokens, time
        self.skipped_updates = 0
        self.consecutive_nonfinite = 0
        self.abandoned = 0
        self.single_program_time = 0.0
        self.micro = MicroBatchExecutor(self, arena)
        self.checkpointer = TrainCheckpointer(job.checkpoint_dir) if job.checkpoint_dir is not None else None
        if self.checkpointer is not None and self.checkpointer.latest_step() is not None:
            self._restore(self.checkpointer.latest_step())

    def warmup(self, chunks: Sequence[int] = ()) -> None:
        """Compiles the training programs without changing anything: the single-program step, the update and the
        eval loss on copies of the state, and one timing micro-batch per chunk size (dropped at its end), its
        micro-steps cut as the policies cut them (`micro_sequence`), so every micro-step program a policy runs
        is compiled."""
        batch = self.loader.next_batch()
        self.loader.push_back(batch)
        def copy():
            return jax.tree.map(jnp.copy, self.state)

        device_batch = _to_device(batch)
        jax.block_until_ready(_grad_step(self.params, self.cfg, copy(), device_batch, self.job.remat))
        jax.block_until_ready(_update(self.optimizer, copy()))
        jax.block_until_ready(_commit(copy(), jax.tree.map(jnp.zeros_like, self.state.lora), jnp.float32(0)))
        jax.block_until_ready(_eval_loss(self.state.lora, self.params, self.cfg, device_batch))
        for chunk in chunks:
            if self.micro.current is None and self.micro.start(chunk, calibration=True):
                for _, layers in micro_sequence(None, True, self.cfg.num_layers, chunk, chunks):
                    self.micro.run(layers)

    def _count_batches(self) -> int:
        probe = data_lib.DataLoader(self.train_set, self.job.micro_batch_rows, self.job.seq_len, seed=self.job.seed,
                                    epochs=self.job.epochs, overflow=self.job.overflow)
        return sum(1 for _ in probe)

    @property
    def active(self) -> bool:
        return self.status is JobStatus.RUNNING

    @property
    def running_time(self) -> float:
        """Seconds the job has trained, on either path."""
        return self.single_program_time + self.micro.busy_time

    def progress(self) -> JobProgress:
        running = self.running_time
        return JobProgress(step=self.step, total_steps=self.total_steps, tokens=self.tokens, loss=self.last_loss,
                           eval_loss=self.eval_loss, tokens_per_s=self.tokens / running if running else 0.0,
                           status=self.status, reason=self.reason, skipped_updates=self.skipped_updates,
                           abandoned_microbatches=self.abandoned)

    # The single-program path ------------------------------------------------------------------------------

    def next_batch(self) -> data_lib.MicroBatch | None:
        """The next micro-batch of the training data; None (and the job finishes) when it is exhausted."""
        try:
            return self.loader.next_batch()
        except StopIteration:
            self._finish()
            return None

    def train_microbatch(self) -> None:
        """One micro-batch through the single program (forward, loss, backward, accumulate), and the update
        when `grad_accum` micro-batches are in."""
        started = time.perf_counter()
        batch = self.next_batch()
        if batch is None:
            return
        self.state, total, count = _grad_step(self.params, self.cfg, self.state, _to_device(batch), self.job.remat)
        self._accumulated(total, count)
        self.single_program_time += time.perf_counter() - started

    def commit_microbatch(self, grads, loss_sum, count):
        """Adds a micro-batch's gradient from the micro-step path to the step; returns the zeroed gradient buffers
        for the next micro-batch."""
        self.state, spare = _commit(self.state, grads, count)
        self._accumulated(loss_sum, count)
        return spare

    def return_batch(self, batch: data_lib.MicroBatch, abandoned: bool) -> None:
        """Puts a micro-batch that was not trained back at the front of the queue (`abandoned`: its lease was
        taken back or the job stopped, not a timing run)."""
        self.loader.push_back(batch)
        self.abandoned += abandoned

    def _accumulated(self, total, count) -> None:
        self.step_loss_sum += float(total)
        self.step_tokens += float(count)
        self.tokens += int(count)
        self.microbatches_in_step += 1
        if self.microbatches_in_step >= self.job.grad_accum:
            self._apply_update()

    def _apply_update(self) -> None:
        self.state, applied, norm = _update(self.optimizer, self.state)
        loss = self.step_loss_sum / max(self.step_tokens, 1.0)
        self.microbatches_in_step, self.step_loss_sum, self.step_tokens = 0, 0.0, 0.0
        if not bool(applied) or not np.isfinite(loss):
            self.skipped_updates += 1
            self.consecutive_nonfinite += 1
            log.warning("%s: non-finite loss or gradient at step %d; update skipped", self.job.name, self.step)
            if self.consecutive_nonfinite >= self.job.max_nonfinite:
                self.status = JobStatus.PAUSED
                self.reason = f"{self.consecutive_nonfinite} consecutive non-finite updates"
                log.error("%s paused: %s", self.job.name, self.reason)
            return
        self.consecutive_nonfinite = 0
        self.step += 1
        self.last_loss = loss
        self.history.append({"step": self.step, "loss": loss, "tokens": self.tokens, "time": time.time(),
                             "grad_norm": float(norm)})
        if self.job.eval_interval and self.step % self.job.eval_interval == 0:
            self.evaluate()
        if self.checkpointer is not None and self.step % self.job.checkpoint_interval == 0:
            self.save()
        if self.step >= self.total_steps:
            self._finish()

    def _finish(self) -> None:
        if self.status in (JobStatus.FINISHED, JobStatus.STOPPED):
            return
        self.micro.abandon()
        if self.eval_loss is None or not self.history or self.history[-1].get("eval_step") != self.step:
            self.evaluate()
        self.status = JobStatus.FINISHED
        if self.checkpointer is not None:
            self.save()
            self.checkpointer.wait()
        log.info("%s finished: %d steps, %d tokens, loss %s, eval loss %s", self.job.name, self.step, self.tokens,
                 self.last_loss, self.eval_loss)

    def stop(self) -> None:
        """Stops the job for good, with a final checkpoint."""
        if self.status in (JobStatus.FINISHED, JobStatus.STOPPED):
            return
        self.micro.abandon()
        self.status = JobStatus.STOPPED
        if self.checkpointer is not None:
            self.save()
            self.checkpointer.wait()

    def evaluate(self) -> float | None:
        """Mean loss over the eval split (the whole split, in file order)."""
        if self.eval_set is None:
            return None
        loader = data_lib.DataLoader(self.eval_set, self.job.micro_batch_rows, self.job.seq_len, epochs=1,
                                     shuffle=False, overflow=self.job.overflow)
        total = count = 0.0
        for batch in loader:
            t, c = _eval_loss(self.state.lora, self.params, self.cfg, _to_device(batch))
            total, count = total + float(t), count + float(c)
        self.eval_loss = total / max(count, 1.0)
        if self.history:
            self.history[-1].update(eval_loss=self.eval_loss, eval_step=self.step)
        return self.eval_loss

    # Checkpoints and export -------------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "data": self.loader.state(), "history": list(self.history),
                "skipped_updates": self.skipped_updates, "abandoned": self.abandoned, "seed": self.job.seed,
                "lora": dataclasses.asdict(self.job.lora)}

    def save(self) -> None:
        """Checkpoints at a micro-batch boundary (a micro-batch in flight is abandoned first). A step that is
        already saved is not saved again: a resume from it redoes the micro-batches since."""
        self.micro.abandon()
        if self.checkpointer.latest_step() == self.step:
            return
        self.checkpointer.save(self.step, self.state, self._record())

    def _restore(self, step: int) -> None:
        self.state, record = self.checkpointer.restore(step, self.state)
        if record.get("lora") != json.loads(json.dumps(dataclasses.asdict(self.job.lora))):
            raise ConfigError(f"the checkpoint in {self.job.checkpoint_dir} was made with LoRA {record.get('lora')}, "
                              f"not {dataclasses.asdict(self.job.lora)}")
        self.loader.restore(record["data"])
        self.step, self.tokens = record["step"], record["tokens"]
        self.history = deque(record["history"], maxlen=self.job.history_limit)
        self.skipped_updates, self.abandoned = record["skipped_updates"], record["abandoned"]
        self.last_loss = self.history[-1]["loss"] if self.history else None
        log.info("%s: resumed from %s at step %d", self.job.name, self.job.checkpoint_dir, self.step)
        if self.step >= self.total_steps:
            self.status = JobStatus.FINISHED

    def export_peft(self, path: str | Path) -> Path:
        return export_peft(self.state.lora, self.job.lora, self.cfg, path)


class JobHandle:
    """What `Engine.finetune` returns: progress, control, and the trained adapter."""

    progress_interval_s = 10.0  # how often `wait` logs the job's progress

    def __init__(self, runner: FinetuneRunner, engine):
        self._runner, self._engine = runner, engine

    @property
    def name(self) -> str:
        return self._runner.job.name

    def progress(self) -> JobProgress:
        return self._runner.progress()

    @property
    def history(self) -> list[dict[str, float]]:
        return list(self._runner.history)

    @property
    def adapters(self):
        return self._runner.state.lora

    @property
    def lora_config(self) -> LoRAConfig:
        return self._runner.job.lora

    def evaluate(self) -> float | None:
        """The mean loss on the eval split now (None without one)."""
        return self._runner.evaluate()

    def pause(self) -> None:
        if self._runner.status is JobStatus.RUNNING:
            self._runner.micro.abandon()
            self._runner.status, self._runner.reason = JobStatus.PAUSED, "paused by the user"

    def resume(self) -> None:
        if self._runner.status is JobStatus.PAUSED:
            self._runner.status, self._runner.reason = JobStatus.RUNNING, None
            self._runner.consecutive_nonfinite = 0

    def stop(self) -> None:
        self._runner.stop()

    def done(self) -> bool:
        return self._runner.status in (JobStatus.FINISHED, JobStatus.STOPPED)

    def wait(self, max_steps: int | None = None) -> JobProgress:
        """Drives the engine (serving whatever requests arrive) until the job finishes, pauses, or has made
        `max_steps` more optimizer steps; shows its progress (a bar on a terminal, a log line every
        `progress_interval_s` elsewhere)."""
        runner = self._runner
        target = None if max_steps is None else runner.step + max_steps
        status = StatusLine(f"{self.name}: step", min(target or runner.total_steps, runner.total_steps),
                            interval_s=self.progress_interval_s)
        while runner.active and (target is None or runner.step < target):
            self._engine.step()
            status.update(runner.step, self._detail)
        status.update(runner.step, self._detail, force=True)
        status.close()
        return self.progress()

    def _detail(self) -> str:
        p = self.progress()
        return f"loss {'-' if p.loss is None else f'{p.loss:.4f}'}, {p.tokens_per_s:.0f} trained tokens/s"

    def export_peft(self, path: str | Path) -> Path:
        """Writes the adapter in the HF PEFT format (`adapter_model.safetensors`, `adapter_config.json`)."""
        return self._runner.export_peft(path)
