"""Fine-tuning through the OpenAI API, on the serving engine: uploaded files, jobs, their events and checkpoints,
all kept in the state directory so that a restarted server lists them and serves their adapters again.

Layout of `--state-dir`: `files/<file id>.jsonl` and `.json` (the upload and its file object);
`jobs/<job id>/job.json` (the job and its servable checkpoints: small, rewritten atomically as it changes),
`jobs/<job id>/events.jsonl` (its events, one JSON line each, appended), `jobs/<job id>/state/` (the trainer's Orbax
checkpoints, which a restarted job resumes from), `jobs/<job id>/checkpoints/step-<N>/` and
`jobs/<job id>/adapter/` (HF PEFT adapters: each checkpoint's, and the final one).

A job goes `validating_files -> queued -> running -> succeeded | failed | cancelled` (and `paused` while paused).
One job trains at a time, in the decode slack under the engine's SLO (its co-location policy). Every change of a
running job happens on the engine thread, and nothing slow does: `tick` (called between steps) has a queued job
prepared on a thread of its own (its data loaded, its programs compiled) and registers it once it is ready (its
setup then runs one program between two steps), records the progress, has each checkpoint's adapter written and
loaded on a writer thread and serves it under its `fine_tuned_model_checkpoint` name (the newest
`keep_checkpoints` of a job: an older one is no longer served and its export is deleted once no request uses it, so
that a long job holds bounded memory and disk), and serves the final adapter as `fine_tuned_model`,
`ft:<base>:<suffix>:<job id>`; cancel, pause and resume reach it through `EngineLoop.call`. The HTTP side reads
the records under a lock.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import jax

from harli_jax.errors import HarliError
from harli_jax.lora.adapters import LoRAConfig, export_peft
from harli_jax.lora.data import load_jsonl
from harli_jax.model.tokenizer import Tokenizer
from harli_jax.runtime.colocator import PreparedJob
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.finetune import FinetuneJob, JobHandle, JobStatus
from harli_jax.server.protocol import ApiError

log = logging.getLogger("harli_jax")

BASE_LEARNING_RATE = 3e-3  # learning_rate_multiplier 1 (FinetuneJob's default)
AUTO_EPOCHS, AUTO_BATCH_SIZE = 3, 4  # what "auto" (or nothing) means
FINAL = ("succeeded", "failed", "cancelled")
BACKGROUND_NICE = 10  # the niceness of the threads that prepare jobs and export adapters
MAX_PROBLEMS = 5  # line problems named in an upload's error


def _write_json(path: Path, value: Any) -> None:
    """Writes `value` as JSON atomically and durably: a crash leaves the old file or the new one, never half of
    one, and the new one is on disk when this returns."""
    _write_bytes(path, json.dumps(value, indent=1).encode())


def _write_bytes(path: Path, content: bytes) -> None:
    """Writes a file atomically and durably (through a temporary file `.<name>.*` beside it, which a crash may
    leave behind: `_remove_temporary` deletes those)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _remove_temporary(directory: Path) -> None:
    """Deletes the temporary files that writes interrupted by a crash left in `directory`."""
    for path in directory.glob(".*.*"):
        if path.is_file():
            log.warning("removing %s, left by an interrupted write", path)
            path.unlink()


def _append_line(path: Path, value: Any) -> None:
    """Appends `value` to a JSON-lines file durably; a crash mid-write leaves at most a torn last line, which
    `_read_lines` skips and the next append starts after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        torn = f.seek(0, os.SEEK_END) > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
        f.write((b"\n" if torn else b"") + json.dumps(value).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _write_lines(path: Path, values: list[Any]) -> None:
    """Writes a JSON-lines file atomically and durably (as `_write_json`)."""
    _write_bytes(path, "".join(json.dumps(v) + "\n" for v in values).encode())


def _read_lines(path: Path) -> list[Any]:
    """The values of a JSON-lines file, oldest first (none if it does not exist; a torn last line skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipped a torn line", path)  # a crash mid-append
    return out


def _sync_dir(directory: Path) -> None:
    """Makes a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lower_priority() -> None:
    """Lowers the calling thread's CPU priority (Linux: nice 10, per thread; elsewhere nothing)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def _not_found(kind: str, ident: str, param: str) -> ApiError:
    return ApiError(404, f"no {kind} with id {ident!r}", type="not_found_error", param=param, code="not_found")


class FileStore:
    """Uploaded `purpose=fine-tune` JSONL files, each validated as fine-tuning data when it is uploaded."""

    def __init__(self, directory: Path, tokenizer: Tokenizer | None):
        self.directory, self.tokenizer = directory, tokenizer
        directory.mkdir(parents=True, exist_ok=True)
        _remove_temporary(directory)
        self._files = {f["id"]: f for f in (json.loads(p.read_text()) for p in sorted(directory.glob("*.json")))}
        for path in directory.glob("*.jsonl"):
            if path.stem not in self._files:  # stored, then a crash before its record: the upload never answered
                log.warning("removing %s, an upload a crash interrupted", path)
                path.unlink()
        self._lock = threading.Lock()

    def upload(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        """Stores and returns the file object; an ApiError (400) naming the first problems, by line, for data
        that cannot be trained on."""
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose {purpose!r} is not supported: this server takes 'fine-tune' files",
                           param="purpose")
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: it cannot be fine-tuned on text", param="file")
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        path = self.directory / f"{file_id}.jsonl"
        _write_bytes(path, content)
        try:
            problems, samples = self._validate(path, filename)
        except HarliError as e:
            problems, samples = [str(e)], 0
        if problems or not samples:
            path.unlink()
            more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
            detail = "; ".join(problems[:MAX_PROBLEMS]) + more if problems else "it holds no records"
            raise ApiError(400, f"{filename} is not valid fine-tuning data: {detail}", param="file",
                           code="invalid_file")
        record = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        _write_json(self.directory / f"{file_id}.json", record)
        with self._lock:
            self._files[file_id] = record
        return record

    def _validate(self, path: Path, filename: str) -> tuple[list[str], int]:
        dataset = load_jsonl(path, self.tokenizer)
        return [f"line {p.line}: {p.message}" for p in dataset.problems], len(dataset)

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return sorted(self._files.values(), key=lambda f: f["created_at"], reverse=True)

    def get(self, file_id: str, param: str = "file_id") -> dict[str, Any]:
        with self._lock:
            record = self._files.get(file_id)
        if record is None:
            raise _not_found("file", file_id, param)
        return record

    def path(self, file_id: str) -> Path:
        return self.directory / f"{file_id}.jsonl"


@dataclasses.dataclass
class JobRecord:
    """A fine-tuning job as the API shows it, with its servable checkpoints (its events are in its events file)."""

    id: str
    model: str
    training_file: str
    validation_file: str | None
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    suffix: str | None
    seed: int
    created_at: int
    status: str = "validating_files"
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    checkpoints: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def model_name(self) -> str:
        """`ft:<base>:<suffix>:<job id>`, its `fine_tuned_model` once it succeeds."""
        return f"ft:{self.model}:{self.suffix or ''}:{self.id}"

    def api(self) -> dict[str, Any]:
        hyperparameters = {"n_epochs": self.n_epochs, "batch_size": self.batch_size,
                           "learning_rate_multiplier": self.learning_rate_multiplier}
        return {"id": self.id, "object": "fine_tuning.job", "created_at": self.created_at,
                "finished_at": self.finished_at, "model": self.model, "fine_tuned_model": self.fine_tuned_model,
                "organization_id": "harli_jax", "result_files": [], "status": self.status,
                "training_file": self.training_file, "validation_file": self.validation_file,
                "hyperparameters": hyperparameters, "trained_tokens": self.trained_tokens, "error": self.error,
                "seed": self.seed, "estimated_finish": None, "integrations": [], "user_provided_suffix": self.suffix,
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}


class Export(NamedTuple):
    """An adapter export the writer thread runs: a checkpoint of `step` (None: the job's final adapter), served as
    `name`; `value` is the checkpoint's training loss, or the final adapter's trained tokens."""

    job: JobRecord
    handle: JobHandle
    step: int | None
    name: str
    value: float | int | None
    future: concurrent.futures.Future


def _hyperparameter(body: dict[str, Any], name: str, auto, kind: type, low: float) -> Any:
    """A hyperparameter of the request (top-level `hyperparameters` or `method.supervised.hyperparameters`);
    "auto" or absent: `auto`."""
    method = ((body.get("method") or {}).get("supervised") or {}).get("hyperparameters") or {}
    value = {**method, **(body.get("hyperparameters") or {})}.get(name, "auto")
    if value == "auto" or value is None:
        return auto
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"hyperparameters.{name} must be {'an integer' if kind is int else 'a number'} or "
                            f"'auto', got {value!r}", param=f"hyperparameters.{name}")
    if not value >= low or not math.isfinite(value):
        raise ApiError(400, f"hyperparameters.{name} must be >= {low}, got {value!r}",
                       param=f"hyperparameters.{name}")
    return kind(value)


class FineTuning:
    """The fine-tuning jobs of one server over `engine` (served as `base_model`)."""

    def __init__(self, state_dir: str | Path, engine: Engine, base_model: str, *, seq_len: int = 128,
                 rank: int = 8, checkpoint_steps: int = 25, keep_checkpoints: int = 3):
        self.root = Path(state_dir)
        self.engine, self.base_model = engine, base_model
        self.seq_len, self.checkpoint_steps, self.keep_checkpoints = seq_len, checkpoint_steps, keep_checkpoints
        self.lora = LoRAConfig(rank=rank, alpha=2.0 * rank)
        self.files = FileStore(self.root / "files", engine.tokenizer)
        self._jobs: dict[str, JobRecord] = {}
        self._lock = threading.Lock()  # guards the records
        self._append_lock = threading.Lock()  # keeps the reads of events files from the writes
        self._active: tuple[JobRecord, JobHandle] | None = None  # the registered job (engine thread only)
        self._seen_steps = 0
        # Off the engine thread: a job's preparation (data, state, compiles) on one worker; on another, in the order
        # asked, every write of the state directory (records, events, the exports of adapters and their loading to
        # serve). The engine thread takes their results.
        # Both run at a lower CPU priority than serving (the threads they start inherit it: the compiles).
        self._preparer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="harli-job-prepare",
                                                               initializer=_lower_priority)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="harli-job-writer",
                                                             initializer=_lower_priority)
        self._preparing: tuple[JobRecord, concurrent.futures.Future] | None = None
        self._exports: list[Export] = []  # submitted to the writer, in order, not yet taken
        for path in sorted((self.root / "jobs").glob("*/job.json")):
            record = json.loads(path.read_text())
            events = record.pop("events", None)  # a job.json of an earlier version held its events
            job = JobRecord(**record)
            self._remove_interrupted(job)
            if events is not None:
                if not self._events_file(job).exists():
                    _write_lines(self._events_file(job), events)
                self._save(job)
            self._restore(job)

    def _remove_interrupted(self, job: JobRecord) -> None:
        """Deletes what a crash interrupted in the job's directory (before anything is written there): temporary
        files, and exports (a checkpoint's not recorded, the final adapter of a job that had not succeeded; the
        job makes them again)."""
        _remove_temporary(self._dir(job))
        recorded = {f"step-{c['step_number']}" for c in job.checkpoints}
        unfinished = [d for d in (self._dir(job) / "checkpoints").glob("step-*") if d.name not in recorded]
        if job.status != "succeeded":
            unfinished.append(self._dir(job) / "adapter")
        for directory in unfinished:
            if directory.exists():
                log.warning("removing %s, an export a crash interrupted", directory)
                shutil.rmtree(directory)

    def _restore(self, job: JobRecord) -> None:
        """A job of an earlier run: its adapters served again; one that was training resumes (queued)."""
        self._jobs[job.id] = job
        for checkpoint in job.checkpoints:
            self._serve_again(job, checkpoint["fine_tuned_model_checkpoint"], self._dir(job) / "checkpoints" /
                              f"step-{checkpoint['step_number']}")
        if job.status == "succeeded":
            self._serve_again(job, job.fine_tuned_model, self._dir(job) / "adapter")
        elif job.status in ("running", "validating_files"):
            job.status = "queued"
            self._event(job, "Queued again after a server restart")
            self._save(job)

    def _serve(self, name: str, directory: Path) -> None:
        self.engine.add_adapter(name, directory, base_model=self.base_model)

    def _serve_again(self, job: JobRecord, name: str, directory: Path) -> None:
        """Serves an adapter of an earlier run; one that cannot be read (an error event of its job) is not served
        and the server starts without it."""
        try:
            self._serve(name, directory)
        except HarliError as e:
            log.error("%s is not served: %s", name, e)
            self._event(job, f"{name} is not served after the restart: {e}", level="error")

    def _dir(self, job: JobRecord) -> Path:
        return self.root / "jobs" / job.id

    def _events_file(self, job: JobRecord) -> Path:
        return self._dir(job) / "events.jsonl"

    def _save(self, job: JobRecord) -> None:
        """Has the job's record as it is now written (by the writer thread)."""
        self._write(_write_json, self._dir(job) / "job.json", dataclasses.asdict(job))

    def _write(self, write, *args) -> None:
        """Has the writer thread make a write, after every write asked for before it (one that fails is logged)."""
        def logged():
            try:
                with self._append_lock:
                    write(*args)
            except OSError as e:
                log.error("fine-tuning: cannot write %s: %s", args[0], e)

        self._writer.submit(logged)

    def flush(self) -> None:
        """Waits until every write asked for so far is made."""
        self._writer.submit(lambda: None).result()

    def _event(self, job: JobRecord, message: str, kind: str = "message", data: dict[str, Any] | None = None,
               level: str = "info") -> None:
        """Has an event appended to the job's events file (by the writer thread)."""
        self._write(_append_line, self._events_file(job), {
            "id": f"ftevent-{uuid.uuid4().hex[:24]}", "object": "fine_tuning.job.event",
            "created_at": int(time.time()), "level": level, "message": message, "data": data or {}, "type": kind})

    # The HTTP side ------------------------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """A new job from a `POST /v1/fine_tuning/jobs` body (validated here: files, model, hyperparameters)."""
        model = body.get("model")
        if model != self.base_model:
            raise ApiError(404 if isinstance(model, str) else 400,
                           f"model {model!r} cannot be fine-tuned here; this server fine-tunes {self.base_model!r}",
                           param="model", code="model_not_found")
        training = body.get("training_file")
        if not isinstance(training, str):
            raise ApiError(400, "training_file is required: the id of an uploaded fine-tune file",
                           param="training_file")
        self.files.get(training, "training_file")
        validation = body.get("validation_file")
        if validation is not None:
            self.files.get(validation, "validation_file")
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or ":" in suffix or len(suffix) > 64):
            raise ApiError(400, "suffix must be a string of at most 64 characters without ':'", param="suffix")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ApiError(400, f"seed must be a non-negative integer, got {seed!r}", param="seed")
        job = JobRecord(id=f"ftjob-{uuid.uuid4().hex[:24]}", model=model, training_file=training,
                        validation_file=validation, suffix=suffix, seed=seed, created_at=int(time.time()),
                        n_epochs=_hyperparameter(body, "n_epochs", AUTO_EPOCHS, int, 1),
                        batch_size=_hyperparameter(body, "batch_size", AUTO_BATCH_SIZE, int, 1),
                        learning_rate_multiplier=_hyperparameter(body, "learning_rate_multiplier", 1.0, float,
                                                                 1e-6))
        job.status = "queued"
        with self._lock:
            self._save(job)
            self._event(job, f"Created fine-tuning job: {job.id}")
            self._event(job, "Validated the training file" + (" and the validation file" if validation else ""))
            self._jobs[job.id] = job
            return job.api()

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._find(job_id)

    def _find(self, job_id: str) -> JobRecord:
        """The job (the caller holds the lock); a 404 for an unknown id."""
        job = self._jobs.get(job_id)
        if job is None:
            raise _not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return job

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.api() for j in sorted(self._jobs.values(), key=lambda j: j.created_at, reverse=True)]

    def retrieve(self, job_id: str) -> dict[str, Any]:
        with self._lock:
            return self._find(job_id).api()

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's events, newest first, as the API lists them (read from its events file)."""
        job = self.get(job_id)
        self.flush()
        with self._append_lock:
            return list(reversed(_read_lines(self._events_file(job))))

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(reversed(self._find(job_id).checkpoints))

    # The engine thread ---------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job.status in FINAL:
            raise ApiError(400, f"job {job_id} is already {job.status}", param="fine_tuning_job_id")
        if self._active is not None and self._active[0] is job:
            handle = self._active[1]
            handle.stop(wait=False)
            self._writer.submit(handle.wait_saved)  # its final checkpoint, on disk off this thread
            self._active = None
        return self._update(job, "cancelled", "Fine-tuning job cancelled", finished=True)

    def pause(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job.status not in ("queued", "running"):
            raise ApiError(400, f"job {job_id} is {job.status}: only a queued or running job can be paused",
                           param="fine_tuning_job_id")
        if self._active is not None and self._active[0] is job:
            self._active[1].pause()
        return self._update(job, "paused", "Fine-tuning job paused")

    def resume(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job.status != "paused":
            raise ApiError(400, f"job {job_id} is {job.status}: only a paused job can be resumed",
                           param="fine_tuning_job_id")
        if self._active is not None and self._active[0] is job:
            self._active[1].resume()
            return self._update(job, "running", "Fine-tuning job resumed")
        return self._update(job, "queued", "Fine-tuning job resumed: queued")

    def _update(self, job: JobRecord, status: str, message: str, *, finished: bool = False,
                level: str = "info") -> dict[str, Any]:
        with self._lock:
            job.status = status
            self._event(job, message, level=level)
            if finished:
                job.finished_at = int(time.time())
            self._save(job)
            return job.api()

    def tick(self, engine: Engine) -> None:
        """Between two engine steps: takes the finished exports, follows the registered job, or registers the one
        prepared (off this thread), or starts preparing the oldest queued one."""
        self._take_exports()
        if self._active is not None:
            self._follow(*self._active)
            return
        if self._preparing is not None:
            if self._preparing[1].done():
                job, future = self._preparing
                self._preparing = None
                self._register(engine, job, future)
            return
        with self._lock:
            queued = sorted((j for j in self._jobs.values() if j.status == "queued"), key=lambda j: j.created_at)
        if queued:
            self._prepare(engine, queued[0])

    def _prepare(self, engine: Engine, job: JobRecord) -> None:
        """Loads the job's data and state and compiles its programs on the preparing thread."""
        spec = FinetuneJob(dataset=self.files.path(job.training_file),
                           eval_dataset=self.files.path(job.validation_file) if job.validation_file else None,
                           lora=self.lora, learning_rate=BASE_LEARNING_RATE * job.learning_rate_multiplier,
                           warmup_steps=1, micro_batch_rows=job.batch_size, seq_len=self.seq_len, total_steps=None,
                           epochs=job.n_epochs, eval_fraction=0.0, eval_interval=0,
                           checkpoint_dir=self._dir(job) / "state", checkpoint_interval=self.checkpoint_steps,
                           seed=job.seed, name=job.id)
        self._preparing = (job, self._preparer.submit(engine.prepare_finetune, spec))
        self._event(job, "Preparing the job: loading its data and compiling its programs")

    def _register(self, engine: Engine, job: JobRecord, future: concurrent.futures.Future) -> None:
        """Registers a prepared job with the engine (its setup then runs between steps), unless it was cancelled
        or paused while it was prepared (a paused one is prepared again when it resumes)."""
        try:
            prepared: PreparedJob = future.result()
        except (HarliError, OSError) as e:
            with self._lock:
                job.error = {"code": "invalid_training_job", "message": str(e), "param": None}
            self._update(job, "failed", f"Fine-tuning job failed: {e}", finished=True, level="error")
            return
        if job.status != "queued":
            return
        handle = engine.finetune(prepared, setup_between_steps=True)
        self._active, self._seen_steps = (job, handle), handle.progress().step
        total = handle.progress().total_steps
        self._update(job, "running", f"Fine-tuning job started: {total} steps")
        self._follow(job, handle)

    def _follow(self, job: JobRecord, handle: JobHandle) -> None:
        progress = handle.progress()
        if progress.step > self._seen_steps:
            with self._lock:
                for entry in handle.recent_history(progress.step - self._seen_steps):
                    if self._seen_steps < entry["step"] <= progress.step:
                        self._event(job, f"Step {entry['step']}/{progress.total_steps}: training loss="
                                         f"{entry['loss']:.4f}", "metrics",
                                    {"step": entry["step"], "train_loss": entry["loss"],
                                     "total_steps": progress.total_steps})
                job.trained_tokens = progress.tokens
                self._save(job)
            crossed = progress.step // self.checkpoint_steps > self._seen_steps // self.checkpoint_steps
            self._seen_steps = progress.step
            if crossed and progress.status is JobStatus.RUNNING:  # a boundary passed since the last tick
                self._checkpoint(job, handle, progress.step, progress.loss)
        if progress.status is JobStatus.FINISHED:
            self._active = None
            self._writer.submit(handle.wait_saved)  # its final checkpoint, before its adapter's export
            if progress.eval_loss is not None:  # the validation file's loss at the end
                self._event(job, f"Step {progress.step}: validation loss={progress.eval_loss:.4f}", "metrics",
                            {"step": progress.step, "valid_loss": progress.eval_loss})
            self._export(job, handle, None, job.model_name, self._dir(job) / "adapter", progress.tokens)
        elif progress.status is JobStatus.PAUSED and job.status == "running":
            self._update(job, "paused", f"Fine-tuning job paused: {progress.reason}", level="warn")

    def _checkpoint(self, job: JobRecord, handle: JobHandle, step: int, loss: float | None) -> None:
        """Exports the adapter at `step` (off this thread) and serves it by its checkpoint name while the job
        trains on. A step that already has one was made before a crash that the job resumed from an earlier
        state: the same data through the same programs, so that checkpoint stays as it is."""
        if any(c["step_number"] == step for c in job.checkpoints):
            return
        self._export(job, handle, step, f"{job.model_name}:ckpt-step-{step}",
                     self._dir(job) / "checkpoints" / f"step-{step}", loss)

    def _export(self, job: JobRecord, handle: JobHandle, step: int | None, name: str, directory: Path,
                value: float | int | None) -> None:
        """Copies the adapter's weights to the host now (the next update replaces them) and has the writer export
        them to `directory` and serve them as `name`; `_take_exports` records the result."""
        weights, lora = jax.device_get(handle.adapters), handle.lora_config

        def write() -> None:
            export_peft(weights, lora, self.engine.cfg, directory, self.base_model)
            self._serve(name, directory)

        self._exports.append(Export(job, handle, step, name, value, self._writer.submit(write)))

    def _take_exports(self, wait: bool = False) -> None:
        """Records the exports the writer finished, in order (all of them with `wait`): a checkpoint, or the
        final adapter (the job succeeds); one that failed pauses its job, or fails it at the end."""
        while self._exports and (wait or self._exports[0].future.done()):
            export = self._exports.pop(0)
            job = export.job
            try:
                export.future.result()
            except (HarliError, OSError) as e:
                self._export_failed(export, e)
                continue
            if export.step is None:
                if job.status in FINAL:  # cancelled while its adapter was written
                    continue
                with self._lock:
                    job.fine_tuned_model, job.trained_tokens = job.model_name, export.value
                self._update(job, "succeeded", f"The job has successfully completed: {job.model_name}",
                             finished=True)
                continue
            with self._lock:
                job.checkpoints.append({"id": f"ftckpt-{uuid.uuid4().hex[:24]}",
                                        "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                                        "fine_tuned_model_checkpoint": export.name, "fine_tuning_job_id": job.id,
                                        "step_number": export.step,
                                        "metrics": {"step": export.step, "train_loss": export.value}})
                self._event(job, f"Checkpoint at step {export.step}: {export.name}")
            self._retire_checkpoints(job)
            with self._lock:
                self._save(job)

    def _export_failed(self, export: Export, error: Exception) -> None:
        """A checkpoint that cannot be written pauses its job (which keeps its state); a final adapter fails it."""
        job = export.job
        if export.step is None:
            message = f"cannot export the final adapter to {self._dir(job) / 'adapter'}: {error}"
            with self._lock:
                job.error = {"code": "adapter_export_failed", "message": message, "param": None}
            self._update(job, "failed", f"Fine-tuning job failed: {message}", finished=True, level="error")
            return
        directory = self._dir(job) / "checkpoints" / f"step-{export.step}"
        export.handle.pause()
        if job.status == "running":
            self._update(job, "paused", f"Fine-tuning job paused: cannot export the checkpoint of step "
                                        f"{export.step} to {directory}: {error}", level="error")

    def _retire_checkpoints(self, job: JobRecord) -> None:
        """Stops serving the job's checkpoints older than its newest `keep_checkpoints` and deletes their exports;
        one that a request still uses stays until a later checkpoint."""
        for checkpoint in job.checkpoints[: max(len(job.checkpoints) - self.keep_checkpoints, 0)]:
            name = checkpoint["fine_tuned_model_checkpoint"]
            if self.engine.adapters.get(name) is not None and not self.engine.remove_adapter(name):
                continue
            self._writer.submit(shutil.rmtree, self._dir(job) / "checkpoints" / f"step-{checkpoint['step_number']}",
                                ignore_errors=True)
            with self._lock:
                job.checkpoints.remove(checkpoint)

    def shutdown(self, engine: Engine) -> None:
        """At server shutdown: the exports under way finished and recorded, a job being prepared dropped (it is
        still queued), the registered job checkpointed, so that the next run resumes it."""
        self._preparer.shutdown(wait=False, cancel_futures=True)
        self._take_exports(wait=True)
        if self._active is not None:
            self._stop_active()
        self._writer.shutdown(wait=True)

    def _stop_active(self) -> None:
        """Checkpoints the registered job (a restarted server resumes it from there) and says so in its events."""
        job, handle = self._active
        self._active = None
        try:
            handle.checkpoint()
        except HarliError as e:
            message, level = f"Server stopped: the job's state since its last checkpoint is lost: {e}", "error"
        else:
            message, level = (f"Server stopped: the job's state is saved at step {handle.progress().step} and a "
                              f"restarted server resumes it"), "info"
        self._event(job, message, level=level)
