"""The model runner's compile cache: a second process reuses the programs the first compiled."""

import json
import os
import subprocess
import sys

from conftest import REPO

# Builds an engine (which compiles its step programs) and prints the persistent-cache hits it had.
SCRIPT = """
import json, sys
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda name, **_: hits.append(name) if name.endswith("cache_hits") else None)
from harli_jax import Engine, EngineConfig
from harli_jax.model import load_model
config = EngineConfig(max_batch=1, max_seq_len=16, prefill_chunk=8, compile_cache_dir=sys.argv[1],
                      calibration_dir=sys.argv[1])
Engine(load_model(sys.argv[2]), config, warmup=True)
print(json.dumps({"hits": len(hits)}))
"""


def test_a_restart_reuses_the_compiled_programs(tmp_path, tiny_yaml):
    env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "true", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def start() -> int:
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cache"), str(tiny_yaml)], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["hits"]

    assert start() == 0
    assert any((tmp_path / "cache").iterdir())
    assert start() > 0
