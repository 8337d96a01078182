"""Orbax checkpoints of a finetune job: LoRA tree, optimizer state, step, and a JSON record (data cursor,
seed, history) so that a restart resumes exactly."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from harli_jax.errors import CheckpointError
from harli_jax.lora.trainer import TrainState

log = logging.getLogger("harli_jax")


def _first_line(error: Exception) -> str:
    """An exception's message up to its first line break (Orbax appends pages of context)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class TrainCheckpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        self._probe()
        self._max_to_keep = max_to_keep
        self._manager = self._open()
        self._pending: int | None = None  # the step of a save that may still be in flight

    def _probe(self) -> None:
        """A CheckpointError unless the directory takes a file (checked before Orbax, whose saves that fail in
        their background threads leave others waiting minutes for them)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {self.directory} is not writable: {e}") from None

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory,
                                     options=ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep))

    def _failed(self, step: int | None, error: Exception) -> CheckpointError:
        """The error of a save that failed, after a fresh manager replaces the one it left waiting on it."""
        with contextlib.suppress(Exception):
            self._manager.close()
        self._manager = self._open()
        return CheckpointError(f"cannot write the checkpoint of step {step} to {self.directory}: "
                               f"{_first_line(error)}")

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, record: dict[str, Any]) -> None:
        """Saves asynchronously; `wait()` or `close()` makes it durable. A CheckpointError naming the directory
        and the step when it cannot be written (or an earlier save failed)."""
        self.wait()
        try:
            self._probe()
        except CheckpointError as e:
            raise CheckpointError(f"cannot write the checkpoint of step {step}: {e}") from None
        try:
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             record=ocp.args.JsonSave(record)), force=True)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; name the checkpoint
            raise self._failed(step, e) from None
        self._pending = step

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      record=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many kinds; name the checkpoint
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {_first_line(e)}") from None
        return out.state, out.record

    def record(self, step: int) -> dict[str, Any]:
        """The JSON record of `step` alone (what job made it), without reading its arrays."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore())).record
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; name the checkpoint
            raise CheckpointError(f"cannot read the record of step {step} in {self.directory}: "
                                  f"{_first_line(e)}") from None

    def restore_latest(self, like: TrainState, check: Callable[[dict[str, Any]], None]
                       ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest checkpoint that restores whole, after `check(record)` (which raises for a checkpoint of
        another job); one that does not (cut short, corrupted) is reported by path and the one before it tried.
        None when the directory has no checkpoint; a CheckpointError naming each one when none restores (then
        every checkpoint stays where it is, so that a cause that passes leaves the job resumable). Once an older
        one restores, each unreadable newer one is kept aside as `unreadable-step-N` (the job saves that step
        again)."""
        failures: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                record = self.record(step)
                check(record)
                state, record = self.restore(step, like)
            except CheckpointError as e:
                failures.append((step, str(e)))
                log.warning("%s; trying the checkpoint before it", e)
                continue
            for failed, _ in failures:
                log.warning("the unreadable checkpoint of step %d is kept as %s", failed, self._set_aside(failed))
            if failures:
                log.warning("resumed from the older checkpoint %s", self.directory / str(step))
            return state, record
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} restores: "
                                  + "; ".join(message for _, message in failures))
        return None

    def _set_aside(self, step: int) -> Path:
        aside = self.directory / f"unreadable-step-{step}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.directory / f"unreadable-step-{step}-{n}"
        (self.directory / str(step)).rename(aside)
        self._manager.reload()
        return aside

    def wait(self) -> None:
        """Blocks until the last save is durable; a CheckpointError naming it when it failed."""
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; name the checkpoint
            raise self._failed(step, e) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
