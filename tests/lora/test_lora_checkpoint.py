"""Crash-safe finetune jobs through `harli finetune`: killed (SIGKILL) at a random step and run again with the same
command, a job ends with the uninterrupted run's adapter; the checkpoints of another job are refused with one
message; a finished job run again says so. (A truncated newest checkpoint: tests/lora/test_finetune.py.)"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO

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
