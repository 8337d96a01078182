"""Crash-safe finetune jobs through `harli finetune`: killed (SIGKILL) at a random step and run again with the same
command, a job ends with the uninterrupted run's adapter; the checkpoints of another job are refused with one
message; a finished job run again says so; checkpoints that do not restore. (A truncated newest checkpoint
through a job: tests/lora/test_finetune.py.)"""

import os
import shutil
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO
from harli_jax.errors import CheckpointError
from harli_jax.lora.checkpoint import TrainCheckpointer
from harli_jax.lora.trainer import TrainState

STEPS = 8


def _finetune(tmp_path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harli_jax.cli", "finetune", "--model", str(REPO / "configs/models/tiny.yaml"),
            "--steps", str(STEPS), "--rows", "2", "--seq-len", "32", "--rank", "4", "--seed", "3",
            "--checkpoint-dir", str(tmp_path / name / "ckpt"), "--checkpoint-interval", "1",
            "--out", str(tmp_path / name / "adapter"), *extra]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _kill_at_step(command: list[str], step: int) -> None:
    """Runs `command` and SIGKILLs it as soon as it reports optimizer step `step` (a checkpoint of that step may
    be half written)."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in process.stderr:
            if line.startswith(f"step {step}/"):
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL


def _adapter(tmp_path, name: str) -> dict[str, np.ndarray]:
    return load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    done = _run(_finetune(root, "straight"))
    assert done.returncode == 0, done.stderr[-3000:]
    return _adapter(root, "straight")


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_at_a_random_step_the_same_command_ends_with_the_uninterrupted_adapter(uninterrupted, tmp_path,
                                                                                    seed):
    step = int(np.random.default_rng(seed).integers(1, STEPS))
    command = _finetune(tmp_path, "job")
    _kill_at_step(command, step)
    again = _run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    resumed = _adapter(tmp_path, "job")
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(resumed[name], value, rtol=0, atol=1e-6)
    if seed == 0:  # the same directory once more: the job is done
        finished = _run(command)
        assert finished.returncode == 0 and f"already finished at step {STEPS}/{STEPS}" in finished.stderr
        # ... and with another rank: one message naming the difference, no traceback.
        other = _run([*command, "--rank", "8"])
        assert other.returncode == 2
        assert "lora rank: 4 in the checkpoint, 8 in this job" in other.stderr
        assert "Traceback" not in other.stderr and "Event loop is closed" not in other.stderr, other.stderr


def _train_state(value: float) -> TrainState:
    w = {"w": jnp.full((4, 4), value, jnp.float32)}
    return TrainState(lora=w, opt_state={"m": jnp.zeros(4)}, accum=w, accum_tokens=jnp.float32(0),
                      step=jnp.int32(value))


def _truncate(step_dir) -> None:
    """Cuts every file of a checkpoint in half."""
    for f in [f for f in step_dir.rglob("*") if f.is_file()]:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_checkpoints_that_do_not_restore_stay_in_place_until_an_older_one_does(tmp_path):
    saver = TrainCheckpointer(tmp_path)
    for step in (1, 2, 3):
        saver.save(step, _train_state(step), {"step": step})
        saver.wait()
    saver.close()
    # A save of step 4 that the process died in: Orbax's temporary directory, half written.
    shutil.copytree(tmp_path / "3", tmp_path / "4.orbax-checkpoint-tmp-1765000000")
    _truncate(tmp_path / "4.orbax-checkpoint-tmp-1765000000")
    for step in (2, 3):
        _truncate(tmp_path / str(step))

    # Step 1 restores: the two newer ones are named and kept aside, step 1 is taken; the unfinished save is no
    # checkpoint (never tried, so never set aside).
    checkpointer = TrainCheckpointer(tmp_path)
    state, record = checkpointer.restore_latest(_train_state(0), check=lambda record: None)
    assert record == {"step": 1} and float(state.lora["w"][0, 0]) == 1.0
    names = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".") and "orbax-checkpoint-tmp" not in p.name}
    assert names == {"1", "unreadable-step-2", "unreadable-step-3"}
    checkpointer.close()

    # None restores: an error naming each, and every checkpoint left where it was (a cause that passes, such as
    # a full device, must not turn the next run into a fresh start).
    _truncate(tmp_path / "1")
    checkpointer = TrainCheckpointer(tmp_path)
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path} restores: .*step 1"):
        checkpointer.restore_latest(_train_state(0), check=lambda record: None)
    assert (tmp_path / "1").is_dir()
    checkpointer.close()
