"""The model runner: a step's inputs in one buffer, and the compile cache (a second process reuses the programs
the first compiled)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conftest import REPO
from harli_jax.runtime.runner import InputLayout

# Builds an engine (which compiles its step programs) and prints the persistent-cache hits it had.
SCRIPT = """
import json, sys
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda name, **_: hits.append(name) if name.endswith("cache_hits") else None)
from harli_jax import Engine, EngineConfig
from harli_jax.model import load_model
config = EngineConfig(max_batch=1, max_seq_len=16, prefill_chunk=8, compile_cache_dir=sys.argv[1],
                      calibration_dir=sys.argv[3])
Engine(load_model(sys.argv[2]), config, warmup=True)
print(json.dumps({"hits": len(hits)}))
"""


def test_a_restart_reuses_the_compiled_programs(tmp_path, tiny_yaml):
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "true", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def start(cache: str) -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, cache, str(tiny_yaml), str(tmp_path / "calibration")],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["hits"]

    cache = str(tmp_path / "cache")
    assert start(cache) == 0
    assert any((tmp_path / "cache").iterdir())
    assert start(cache) > 0
    env["JAX_COMPILATION_CACHE_DIR"] = cache  # even where JAX is pointed at a warm cache, "off" turns it off
    assert start("off") == 0


def test_a_step_s_inputs_travel_as_one_buffer_and_come_back_whole():
    layout = InputLayout(seqs=3, tokens=7, pages=4, max_query=5, long_rows=2)
    flat, views = layout.host()
    assert views["token_source"].tolist() == [-1] * 7 and views["top_p"].tolist() == [1.0] * 3
    rng = np.random.default_rng(0)
    for view in views.values():
        view[...] = rng.uniform(0, 1, view.shape) if view.dtype == np.float32 else rng.integers(0, 1000, view.shape)
    views["seed"][0] = 2**32 - 1  # uint32 bits, not an int32 value
    batch, token_source = jax.jit(layout.unpack)(jnp.asarray(flat))
    got = {**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name != "sampling"},
           **{f.name: getattr(batch.sampling, f.name) for f in dataclasses.fields(batch.sampling)},
           "token_source": token_source}
    for name, view in views.items():
        assert got[name].dtype == view.dtype and np.array_equal(np.asarray(got[name]), view), name
    assert (batch.max_query, batch.long_rows) == (5, 2)
