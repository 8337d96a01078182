"""Orbax checkpoints of a finetune job: LoRA tree, optimizer state, step, and a JSON record (data cursor,
seed, history) so that a restart resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from harli_jax.errors import CheckpointError
from harli_jax.lora.trainer import TrainState


class TrainCheckpointer:
    def __init__(self, directory: str | Path, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint directory {directory} is not writable: {e}") from None
        self._manager = ocp.CheckpointManager(self.directory,
                                              options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, record: dict[str, Any]) -> None:
        """Saves asynchronously; `wait()` or `close()` makes it durable."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         record=ocp.args.JsonSave(record)), force=True)

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict[str, Any]]:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      record=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many kinds; name the checkpoint
            raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from None
        return out.state, out.record

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
