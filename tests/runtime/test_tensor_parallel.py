"""Tensor parallelism on emulated CPU devices (a subprocess each: the device count is fixed before JAX is
imported), against one device: greedy tokens, bytes per device, micro-step gradients, checkpoints across degrees;
two processes against one; a lost process."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO

WORKER = REPO / "tests" / "runtime" / "tp_worker.py"
# tiny.yaml with 4 KV heads (it has 2): degrees 1, 2 and 4 divide it.
FOUR_KV_HEADS = (REPO / "configs" / "models" / "tiny.yaml").read_text().replace("num_kv_heads: 2", "num_kv_heads: 4")


def _worker(*args) -> dict | list:
    out = subprocess.run([sys.executable, str(WORKER), "4", *map(str, args)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def four_kv_heads(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "tiny4.yaml"
    path.write_text(FOUR_KV_HEADS)
    return path


@pytest.mark.parametrize("variant, degrees", [("llama-mha", (1, 2, 4)), ("llama-gqa2", (1, 2)),
                                              ("qwen2-tied", (1, 2))])
def test_greedy_tokens_and_bytes_per_device(hf_checkpoint, variant, degrees, tmp_path):
    """Llama with 4 and 2 KV heads, Qwen2 with q/k/v biases and a tied embedding: the same greedy tokens at every
    degree (a batch with prefill and decode), of the base model and of an adapter in a resident slot; each device
    holds 1/N of the arena and of the split weights."""
    _, path = hf_checkpoint(variant)
    runs = _worker("tokens", path, ",".join(map(str, degrees)), tmp_path)
    assert runs["1"]["adapter_tokens"] != runs["1"]["tokens"]  # the adapter changes them
    for tp in degrees:
        run = runs[str(tp)]
        assert run["tokens"] == runs["1"]["tokens"], tp
        assert run["adapter_tokens"] == runs["1"]["adapter_tokens"], tp
        assert run["loaded_in_place"]  # the loader placed each tensor's parts: the engine moved nothing
        device, total = run["arena"]
        assert device * tp == total
        device, total = run["split_weights"]
        assert device * tp == total and (total > 0) == (tp > 1)
        if tp > 1:
            assert run["arena_after_steps_split"]
            assert all(name.endswith("norm") for name in run["whole"]), run["whole"]  # only the norms are whole
            whole = run["all_weights"][1] - total
            assert run["all_weights"][0] == device + whole


def test_micro_step_gradients_match_one_device(four_kv_heads):
    runs = _worker("grads", four_kv_heads, "1,2,4")
    assert runs["1"].pop("arena split axes") == []
    assert len(runs["1"]) == 7  # every projection adapted
    for tp in ("2", "4"):
        assert runs[tp].pop("arena split axes") == [3]  # the stash kept the arena split by KV heads
        for name, (_, _, split) in runs[tp].items():
            # The adapter is split as its projection: A `[layers, in, rank]` by rows for o/down, else B
            # `[layers, rank, out]` by columns.
            assert split == ([[1], []] if name in ("o_proj", "down_proj") else [[], [2]]), name
        for name, (a, b, _) in runs[tp].items():
            for got, want in ((a, runs["1"][name][0]), (b, runs["1"][name][1])):
                want = np.asarray(want)
                assert np.abs(want).max() > 0, name
                assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max(), (tp, name)


def test_fused_steps_match_one_device(four_kv_heads):
    """A micro-batch in token chunks, or in layer windows, fused into decode steps (with two served adapters),
    then backward slices: the same loss, LoRA gradients and served tokens at every degree (tests/lora/test_fused.py's
    run)."""
    runs = _worker("fused", four_kv_heads, "1,2,4")
    for shape, tp in itertools.product(("tokens", "window"), ("2", "4")):
        run, one = runs[f"{shape}:{tp}"], runs[f"{shape}:1"]
        assert run["tokens"] == one["tokens"] > 0
        np.testing.assert_allclose(run["loss"], one["loss"], rtol=1e-5)
        assert run["served"] == one["served"]
        assert all(fused == alone for fused, alone in run["served"])  # the step it rode in is unchanged
        for name, pair in run["grads"].items():
            for got, want in zip(pair, one["grads"][name], strict=True):
                want = np.asarray(want)
                assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max(), (tp, name)


def test_a_checkpoint_written_at_tp2_resumes_at_tp1_and_tp4(four_kv_heads, tmp_path):
    straight, first = _worker("resume", four_kv_heads, f"{tmp_path / 'straight'},2,4", f"{tmp_path / 'tp2'},2,2")
    assert first["step"] == 2
    # The weights, loaded once at degree 2, lie on each engine's own devices (gathered onto one at TP 1).
    assert straight["weight_devices"] == first["weight_devices"] == 2
    for tp in (1, 4):
        shutil.copytree(tmp_path / "tp2", tmp_path / f"from-tp2-at-{tp}")
    resumes = _worker("resume", four_kv_heads, *(f"{tmp_path / f'from-tp2-at-{tp}'},{tp},4" for tp in (1, 4)))
    assert [r["weight_devices"] for r in resumes] == [1, 4]
    for resumed in resumes:
        assert resumed["start"] == 2 and resumed["step"] == 4
        np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)
        # The exported adapter is whole (gathered from the devices), as the uninterrupted run's.
        got, want = (load_file(str(Path(r["peft"]) / "adapter_model.safetensors")) for r in (resumed, straight))
        assert got.keys() == want.keys() and len(got) == 2 * 2 * 7  # A and B, 2 layers, every projection
        for name, value in want.items():
            assert got[name].shape == value.shape
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6)


def _harli(*args, devices: int, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                      f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "harli_jax.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ids(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if "ids: [" in line).split("ids: ")[1]


# What the Gloo library (XLA:CPU's collectives) prints on stdout as processes connect, in pieces that its threads
# may interleave, a newline or another piece anywhere between their words: "[Gloo] Rank R" and " is connected to N
# peer ranks. Expected number ... is : N". The pieces are removed, then any line left holding only a rank number.
GLOO = re.compile(r"\[Gloo\]\s*Rank"
                  r"|\s*is connected to\s*\d+\s*peer ranks\.\s*Expected number of connected peer ranks is\s*:\s*\d+")


def _text(stdout: str) -> str:
    """stdout without Gloo's messages (and the empty or rank-number lines they leave)."""
    return "\n".join(line for line in GLOO.sub("", stdout).splitlines()
                     if line.strip() and not line.strip().isdigit())


def test_two_processes_of_two_devices_equal_one_of_four(four_kv_heads):
    generate = ("generate", "--model", four_kv_heads, "--prompt", "the quick brown fox", "--max-tokens", 8,
                "--tp", 4)
    one = _harli(*generate, devices=4)
    join = ("--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", 2, "--distributed-timeout", 30)
    follower = _harli(*generate, *join, "--process-id", 1, devices=2)
    leader = _harli(*generate, *join, "--process-id", 0, devices=2)
    try:
        results = [p.communicate(timeout=240) for p in (one, leader, follower)]
    finally:
        for p in (one, leader, follower):
            p.kill()
            p.wait()
    for p, (_, err) in zip((one, leader, follower), results, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert _ids(results[1][1]) == _ids(results[0][1])
    want, leader_out, follower_out = (out for out, _ in results)
    want = _text(want)
    # Process 0 prints the text, last (Gloo's messages come as the processes connect, their pieces interleaved
    # too finely to take apart reliably); the other only ran steps.
    assert want.strip() and leader_out.rstrip("\n").endswith(want) and want not in follower_out


def test_a_lost_process_stops_the_other_with_an_error(four_kv_heads):
    serve = ("serve", "--model", four_kv_heads, "--served-model-name", "m", "--port", 0, "--max-batch", 1,
             "--max-seq-len", 32, "--max-loras", 0, "--max-logprobs", 0, "--tpot-slo", "100ms", "--tp", 4,
             "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", 2, "--distributed-timeout", 5)
    follower = _harli(*serve, "--process-id", 1, devices=2)
    leader = _harli(*serve, "--process-id", 0, devices=2)
    try:
        lines = iter(leader.stdout.readline, "")
        url = next(line for line in lines if "listening on" in line).split("listening on ")[1].strip()
        # Both processes serve a request (process 0 announces each step, process 1 runs it), then one dies.
        body = {"model": "m", "prompt": "the quick", "max_tokens": 4, "ignore_eos": True}
        request = urllib.request.Request(f"{url}/v1/completions", method="POST", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 4
        follower.send_signal(signal.SIGKILL)
        started = time.monotonic()
        _, err = leader.communicate(timeout=60)
        assert leader.returncode != 0
        assert time.monotonic() - started < 45
        assert "another task died" in err
    finally:
        for p in (leader, follower):
            p.kill()
            p.wait()
