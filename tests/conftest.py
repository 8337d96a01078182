"""Shared fixtures: tiny random HF models built offline with transformers (CPU torch)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLVM's lowest optimization level for XLA:CPU programs in the test session (and the scripts it starts): compiles
# take most of the suite's time and the tests time nothing; the benchmarks run without it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# One persistent compilation cache for the session, empty at its start, shared with the scripts it starts: an
# engine built again with the same shapes loads its programs instead of compiling them. `jax_events()` counts a
# program loaded from it like a compile, so the no-recompile tests still see every program made after warm-up.
SESSION_CACHE = tempfile.mkdtemp(prefix="harli-test-xla-cache-")
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)
os.environ.update(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=SESSION_CACHE,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import contextlib  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from harli_jax.lora.trainer import TrainBatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The package's log goes through the root logger, where pytest captures it (harli_jax.logs leaves a logger
# whose level is set alone).
logging.getLogger("harli_jax").setLevel(logging.INFO)

# name -> (HF class, config kwargs). Heads/KV heads give GQA ratios 1, 2 and 4; "llama-gqa2" also has an
# explicit head_dim different from hidden/heads.
HF_VARIANTS = {
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa2": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "llama-gqa4": ("llama", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama3-rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32})),
    "qwen2-tied": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


def build_hf_model(variant: str, seed: int = 0):
    """A tiny random HF causal LM with weights large enough that a wrong formula shows in the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, kwargs = HF_VARIANTS[variant]
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                        **kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def train_bpe_tokenizer(directory: Path, vocab_size: int = 100) -> None:
    """Writes a small byte-level BPE `tokenizer.json` trained on a pangram (alphabet: the pangram's letters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<eot>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """`hf_checkpoint(variant, dtype=None)` -> (HF model, directory it was saved to with save_pretrained)."""
    cache = {}

    def make(variant: str, dtype=None):
        key = (variant, str(dtype))
        if key not in cache:
            model = build_hf_model(variant)
            if dtype is not None:
                model = model.to(dtype)
            path = tmp_path_factory.mktemp(variant)
            model.save_pretrained(path)
            cache[key] = (model, path)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_yaml() -> Path:
    return REPO / "configs" / "models" / "tiny.yaml"


@contextlib.contextmanager
def jax_events(suffix: str | tuple[str, ...] = ("backend_compile_duration", "cache_retrieval_time_sec"),
               thread=None):
    """Collects the names of the JAX monitoring events ending in `suffix` (programs made by default: XLA compiles
    and loads from the persistent cache; or "jaxpr_trace_duration" for traces) that happen inside the block (on
    `thread` only, if given)."""
    import threading

    from jax import monitoring

    seen: list[str] = []

    def listen(name, *_, **__):
        if name.endswith(suffix) and (thread is None or threading.current_thread() is thread):
            seen.append(name)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        monitoring.unregister_event_duration_listener(listen)


def with_garbage(case, kind):
    """A kernel test case's arena (`case["arena"]`, `case["valid"]`) with every slot that holds no valid token
    overwritten (other layers included): NaN (`kind="nan"`) or the dtype's largest values of either sign."""
    import jax.numpy as jnp
    import numpy as np

    arena = np.asarray(case["arena"].astype(jnp.float32))
    if kind == "nan":
        garbage = np.full(arena.shape, np.nan, np.float32)
    else:
        big = float(jnp.finfo(case["arena"].dtype).max)
        garbage = np.random.default_rng(1).choice([big, -big], size=arena.shape).astype(np.float32)
    return jnp.asarray(np.where(case["valid"], arena, garbage), case["arena"].dtype)


ROWS, SEQ = 2, 16  # the shape of `train_batch`


def train_batch(vocab, seed=0):
    """A packed `[ROWS, SEQ]` micro-batch: two samples and padding in one row, a prompt without loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (ROWS, SEQ)).astype(np.int32)
    segment_ids = np.array([[1] * 9 + [2] * 5 + [0] * 2, [1] * 16], np.int32)
    positions = np.array([list(range(9)) + list(range(5)) + [0, 0], list(range(16))], np.int32)
    same_next = np.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], np.zeros((ROWS, 1), bool)], axis=1)
    targets = np.where(same_next, np.roll(tokens, -1, axis=1), 0).astype(np.int32)
    loss_mask = (same_next & (segment_ids > 0)).astype(np.float32)
    loss_mask[0, :3] = 0  # a prompt without loss
    return TrainBatch(tokens=jnp.asarray(tokens), targets=jnp.asarray(targets), loss_mask=jnp.asarray(loss_mask),
                      segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions))


def launch_server(model, *args: str):
    """`harli serve --model MODEL --port 0 ARGS` in a subprocess: (process, URL, its stderr lines so far), once it
    prints the URL (its output is drained by threads, so a chatty server never blocks on a full pipe)."""
    import re
    import subprocess
    import sys
    import threading
    import time

    process = subprocess.Popen([sys.executable, "-m", "harli_jax.cli", "serve", "--model", str(model), "--port", "0",
                                *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    errors: list[str] = []
    for pipe, into in ((process.stdout, lines), (process.stderr, errors)):
        threading.Thread(target=into.extend, args=(pipe,), daemon=True).start()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        found = [m.group(1) for line in lines if (m := re.search(r"listening on (http://\S+)", line))]
        if found:
            return process, found[0], errors
        time.sleep(0.05)
    process.kill()
    process.wait()
    time.sleep(0.2)
    pytest.fail(f"the server did not start: {''.join(errors)}")


@contextlib.contextmanager
def running_server(model, *args: str):
    """`launch_server` for the block; the process is killed after it unless it has exited."""
    process, url, errors = launch_server(model, *args)
    try:
        yield process, url, errors
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def resident_slots(cfg, adapters, rank=8):
    """Resident adapter slots holding `adapters` (slot i: adapters[i]), on every projection."""
    from harli_jax.lora.adapters import empty_slots, slot_weights, write_slot

    slots = empty_slots(cfg, len(adapters), rank, dtype=jnp.float32)
    for i, one in enumerate(adapters):
        slots = write_slot(slots, np.int32(i), slot_weights(one, slots))
    return slots


def assert_tree_close(got, want, rtol):
    """Every leaf within `rtol` of the reference, relative to the leaf's largest magnitude."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        err = float(jnp.max(jnp.abs(g - w)) / (jnp.max(jnp.abs(w)) + 1e-30))
        assert err <= rtol, err


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's caches after each test module. Every XLA:CPU executable holds a few memory maps of JIT code;
    kept for the whole session they pass the kernel's limit (vm.max_map_count, 65530) and the next compile
    segfaults (it did, ~8 min into a clean-clone run)."""
    yield
    jax.clear_caches()
    gc.collect()
