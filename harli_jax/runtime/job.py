"""The trainer job (FinetuneRunner): a finetune job's training state over the engine's weights, its data, Optax
updates, counters and bounded history, evaluation, checkpoints and resume, and the single-program path. Its
micro-step path is the micro-batch executor (runtime/microbatch.py)."""

from __future__ import annotations

import dataclasses
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

from harli_jax.errors import CheckpointError, ConfigError
from harli_jax.lora import data as data_lib
from harli_jax.lora import extraction, trainer
from harli_jax.lora.adapters import export_peft, init_lora
from harli_jax.lora.checkpoint import TrainCheckpointer
from harli_jax.model.config import ModelConfig
from harli_jax.model.params import Params
from harli_jax.model.sharding import mesh_of, on_mesh, shard_adapters
from harli_jax.model.tokenizer import Tokenizer
from harli_jax.runtime.arena import Arena
from harli_jax.runtime.finetune import FinetuneJob, JobProgress, JobStatus
from harli_jax.runtime.microbatch import MicroBatchExecutor

log = logging.getLogger("harli_jax")


# The training programs, traced once per shape and static config for every job (the optimizer is static by its
# config, a hashable dataclass, so a second job with the same settings reuses the first one's programs).
_grad_step = jax.jit(trainer.grad_step, static_argnames=("cfg", "remat"), donate_argnames=("state",))
_update = jax.jit(trainer.apply_update, static_argnums=0, donate_argnames=("state",))
_eval = jax.jit(trainer.eval_sums, static_argnames=("cfg",))
_commit = jax.jit(trainer.commit, donate_argnames=("state", "grads"))


def default_records(tokenizer: Tokenizer, seed: int) -> list[dict]:
    """The job's data when it names none: for a model with a chat template, the JSON extraction task
    (`lora.extraction`), which an instruct model fails and a LoRA adapter learns; else the upper-casing task."""
    if tokenizer.chat_template is not None:
        return extraction.extraction_dataset(seed=seed)
    return data_lib.default_dataset(seed=seed)


def default_schedule(tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The FinetuneJob fields that the default task of a model with this tokenizer (`default_records`) trains
    well with, where they differ from FinetuneJob's own defaults (which suit the upper-casing task)."""
    return dict(extraction.SCHEDULE) if tokenizer is not None and tokenizer.chat_template is not None else {}


class FinetuneRunner:
    """A job's training state over the engine's weights: data, adapter and optimizer state, counters, history,
    evaluation, checkpoints, and the single-program path; its micro-step path is `micro`."""

    def __init__(self, job: FinetuneJob, cfg: ModelConfig, params: Params, tokenizer: Tokenizer | None,
                 arena: Arena):
        if tokenizer is None:
            raise ConfigError("finetuning needs a tokenizer to encode the dataset; this model has none")
        self.job, self.cfg, self.params = job, cfg, params
        records = default_records(tokenizer, job.seed) if job.dataset is None else job.dataset
        dataset = self._load(records, tokenizer)
        if job.eval_dataset is not None:
            self.train_set, self.eval_set = dataset, self._load(job.eval_dataset, tokenizer)
        else:
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
        mesh = mesh_of(params)
        lora = shard_adapters(init_lora(cfg, job.lora, seed=job.seed), mesh)  # split as its base projections
        self.state = on_mesh(trainer.init_state(lora, trainer.make_optimizer(self.optimizer)), mesh)

        self.status, self.reason = JobStatus.RUNNING, None
        self.step = 0
        self.tokens = 0
        self.microbatches_in_step = 0
        self.step_loss_sum, self.step_tokens = 0.0, 0.0
        self.last_loss: float | None = None
        self.eval_loss: float | None = None
        self.eval_exact_match: float | None = None  # of the last evaluation
        self.history: deque[dict[str, float]] = deque(maxlen=job.history_limit)  # step, loss, tokens, time
        self.skipped_updates = 0
        self.consecutive_nonfinite = 0
        self.abandoned = 0
        self.single_program_time = 0.0
        self.micro = MicroBatchExecutor(self, arena)
        self.checkpointer = TrainCheckpointer(job.checkpoint_dir) if job.checkpoint_dir is not None else None
        if self.checkpointer is not None:
            self._resume()

    def _load(self, records, tokenizer: Tokenizer) -> data_lib.Dataset:
        if isinstance(records, (str, Path)):
            return data_lib.load_jsonl(records, tokenizer, strict=self.job.strict_data)
        return data_lib.from_records(records, tokenizer, strict=self.job.strict_data)

    def compile(self, layer_sizes: Sequence[int] = (), token_sizes: Sequence[int] = (), forward: bool = True,
                compile_threads: int = 1) -> None:
        """Compiles the training programs without changing anything, on any thread before the job is registered:
        the single-program step, the update, the commit and the eval loss (run on copies of the state), and the
        micro-step programs of these sizes (`MicroBatchExecutor.compile_programs`)."""
        batch = self.loader.next_batch()
        self.loader.push_back(batch)
        def copy():
            return jax.tree.map(jnp.copy, self.state)

        device_batch = trainer.TrainBatch.from_host(batch.arrays())
        jax.block_until_ready(_grad_step(self.params, self.cfg, copy(), device_batch, self.job.remat))
        jax.block_until_ready(_update(self.optimizer, copy()))
        jax.block_until_ready(_commit(copy(), jax.tree.map(jnp.zeros_like, self.state.lora), jnp.float32(0)))
        jax.block_until_ready(_eval(self.state.lora, self.params, self.cfg, device_batch))
        if layer_sizes or token_sizes:
            self.micro.compile_programs(layer_sizes, token_sizes, forward, compile_threads)

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
                           eval_loss=self.eval_loss, eval_exact_match=self.eval_exact_match,
                           tokens_per_s=self.tokens / running if running else 0.0,
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
        device_batch = trainer.TrainBatch.from_host(batch.arrays())
        self.state, total, count = _grad_step(self.params, self.cfg, self.state, device_batch, self.job.remat)
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
            log.warning("%s: non-finite loss or gradient at step %d; update skipped", self.job.name, self.step + 1)
            if self.consecutive_nonfinite >= self.job.max_nonfinite:
                self.status = JobStatus.PAUSED
                self.reason = (f"{self.consecutive_nonfinite} consecutive non-finite updates at step {self.step + 1} "
                               f"(skipped: the weights are those of step {self.step})")
                log.error("%s paused: %s", self.job.name, self.reason)
                if self.checkpointer is not None:
                    self.save(durable=True)
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
            self.save()  # on disk in the background: `wait_saved`
        log.info("%s finished: %d steps, %d tokens, loss %s, eval loss %s", self.job.name, self.step, self.tokens,
                 self.last_loss, self.eval_loss)

    def stop(self) -> None:
        """Stops the job for good, with a final checkpoint written in the background (`wait_saved`)."""
        if self.status in (JobStatus.FINISHED, JobStatus.STOPPED):
            return
        self.micro.abandon()
        self.status = JobStatus.STOPPED
        if self.checkpointer is not None:
            self.save()

    def evaluate(self) -> float | None:
        """Mean loss over the eval split (the whole split, in file order), and its exact match
        (`trainer.exact_matches`: the share of its samples that greedy decoding answers exactly)."""
        if self.eval_set is None:
            return None
        loader = data_lib.DataLoader(self.eval_set, self.job.micro_batch_rows, self.job.seq_len, epochs=1,
                                     shuffle=False, overflow=self.job.overflow)
        total = count = 0.0
        matched = scored = 0
        for batch in loader:
            arrays = batch.arrays()
            t, c, greedy = _eval(self.state.lora, self.params, self.cfg, trainer.TrainBatch.from_host(arrays))
            total, count = total + float(t), count + float(c)
            hits, samples = trainer.exact_matches(np.asarray(greedy), arrays)
            matched, scored = matched + hits, scored + samples
        self.eval_loss = total / max(count, 1.0)
        self.eval_exact_match = matched / max(scored, 1)
        if self.history:
            self.history[-1].update(eval_loss=self.eval_loss, eval_exact_match=self.eval_exact_match,
                                    eval_step=self.step)
        return self.eval_loss

    # Checkpoints and export -------------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "data": self.loader.state(), "history": list(self.history),
                "skipped_updates": self.skipped_updates, "abandoned": self.abandoned, "seed": self.job.seed,
                **self._identity()}

    def save(self, durable: bool = False, *, strict: bool = False) -> None:
        """Checkpoints at a micro-batch boundary (a micro-batch in flight is abandoned first), waiting until it is
        on disk when `durable`. A step that is already saved is not saved again: a resume from it redoes the
        micro-batches since. A checkpoint that cannot be written pauses a running job (its state stays in
        memory) with the error as its reason; `strict` raises the CheckpointError instead."""
        self.micro.abandon()
        try:
            if self.checkpointer.latest_step() != self.step:
                self.checkpointer.save(self.step, self.state, self._record())
            if durable:
                self.checkpointer.wait()
        except CheckpointError as e:
            if strict:
                raise
            self._save_failed(e)

    def wait_saved(self) -> None:
        """Blocks until the last checkpoint is on disk (any thread: the one a job writes when it finishes or stops
        is written in the background); one that failed goes into the job's reason, as in `save`."""
        if self.checkpointer is None:
            return
        try:
            self.checkpointer.wait()
        except CheckpointError as e:
            self._save_failed(e)

    def _save_failed(self, e: CheckpointError) -> None:
        if self.status is JobStatus.RUNNING:
            self.status = JobStatus.PAUSED
            self.reason = f"{e} (paused with its state in memory: make the directory writable and resume)"
        else:  # what stopped it first (a non-finite loss, a pause) stays in the reason
            self.reason = "; ".join(filter(None, (self.reason, f"{e} (its state since is in memory only)")))
        log.error("%s: %s", self.job.name, self.reason)

    def _identity(self) -> dict[str, dict[str, Any]]:
        """What a checkpoint must have been made with to resume this job: the adapter's and the model's shape."""
        cfg = self.cfg
        model = {"name": cfg.name, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                 "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}
        return json.loads(json.dumps({"lora": dataclasses.asdict(self.job.lora), "model": model}))

    def _check_checkpoint(self, record: dict[str, Any]) -> None:
        """A ConfigError naming every difference between the job that wrote `record` and this one."""
        differences = [f"{section} {key}: {have.get(key)!r} in the checkpoint, {value!r} in this job"
                       for section, wanted in self._identity().items() if (have := record.get(section)) is not None
                       for key, value in wanted.items() if have.get(key) != value]
        if differences:
            raise ConfigError(f"the checkpoints in {self.job.checkpoint_dir} are of another job ("
                              + "; ".join(differences) + "): resume with the same settings, or give another "
                              "checkpoint directory")

    def _resume(self) -> None:
        """Restores the newest complete checkpoint of this job, if any (see `TrainCheckpointer.restore_latest`)."""
        restored = self.checkpointer.restore_latest(self.state, self._check_checkpoint)
        if restored is None:
            return
        self.state, record = restored
        self.loader.restore(record["data"])
        self.step, self.tokens = record["step"], record["tokens"]
        self.history = deque(record["history"], maxlen=self.job.history_limit)
        self.skipped_updates, self.abandoned = record["skipped_updates"], record["abandoned"]
        self.last_loss = self.history[-1]["loss"] if self.history else None
        log.info("%s: resumed from %s at step %d", self.job.name, self.job.checkpoint_dir, self.step)
        if self.step >= self.total_steps:
            self.status = JobStatus.FINISHED

    def export_peft(self, path: str | Path, base_model: str | None = None) -> Path:
        return export_peft(self.state.lora, self.job.lora, self.cfg, path, base_model or self.cfg.name)
