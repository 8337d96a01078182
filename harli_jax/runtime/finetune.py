"""Finetune jobs as the user sees them: what they register (FinetuneJob), what they hold (JobHandle) and what it
reports (JobProgress). The job's training state is runtime/job.py; its micro-step path runtime/microbatch.py."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from harli_jax.errors import ConfigError
from harli_jax.logs import StatusLine
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.options import option

if TYPE_CHECKING:
    from harli_jax.runtime.job import FinetuneRunner

log = logging.getLogger("harli_jax")


@dataclasses.dataclass(frozen=True)
class FinetuneJob:
    """A LoRA finetune: data, adapter, optimizer, micro-batch shape, length, checkpoints and evaluation.

    `dataset` is a JSONL path, a list of records, or None for the embedded default task. The job trains
    `total_steps` optimizer steps, or `epochs` passes over the training split when `total_steps` is None.
    Each optimizer step averages `grad_accum` micro-batches of `micro_batch_rows x seq_len` tokens.
    """

    dataset: str | Path | Sequence[dict] | None = option(
        None, "JSONL of {text} | {prompt, completion} | {messages} records, or a list of them; unset: a generated "
              "task (a model with a chat template: extracting fields from a sentence as JSON; else upper-casing)")
    eval_dataset: str | Path | Sequence[dict] | None = option(
        None, "evaluation records (JSONL path or list) instead of an eval_fraction split of the dataset")
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
    eval_exact_match: float | None  # share of eval samples greedy decoding answers exactly (last evaluation)
    tokens_per_s: float  # trained tokens per second of the job's running time
    status: JobStatus
    reason: str | None  # why it paused
    skipped_updates: int  # non-finite updates skipped
    abandoned_microbatches: int  # whose lease was reclaimed


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

    def recent_history(self, n: int) -> list[dict[str, float]]:
        """The newest `n` entries of the history, oldest first (without copying the rest)."""
        return list(itertools.islice(reversed(self._runner.history), n))[::-1]

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

    def stop(self, wait: bool = True) -> None:
        """Stops the job for good with a final checkpoint; `wait`: until it is on disk (else `wait_saved`)."""
        self._runner.stop()
        if wait:
            self._runner.wait_saved()

    def wait_saved(self) -> None:
        """Blocks until the job's last checkpoint is on disk (any thread): a job that finishes or stops writes
        its final one in the background."""
        self._runner.wait_saved()

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
        if self.done():
            runner.wait_saved()
        return self.progress()

    def _detail(self) -> str:
        p = self.progress()
        return f"loss {'-' if p.loss is None else f'{p.loss:.4f}'}, {p.tokens_per_s:.0f} trained tokens/s"

    def export_peft(self, path: str | Path, base_model: str | None = None) -> Path:
        """Writes the adapter in the HF PEFT format (`adapter_model.safetensors`, `adapter_config.json` naming
        `base_model`, by default the model's name, as its `base_model_name_or_path`)."""
        return self._runner.export_peft(path, base_model)

    def checkpoint(self) -> None:
        """Saves the job's state now (with a `checkpoint_dir`), so that a new job with that directory resumes
        from here; nothing without one. A CheckpointError naming the directory when it cannot be written."""
        if self._runner.checkpointer is not None and self._runner.status is not JobStatus.FINISHED:
            self._runner.save(durable=True, strict=True)
