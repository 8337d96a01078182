"""The probe behind README.md's step 2: small.yaml's batch-32 decode step against the page bucket and the dispatch
mode (`python bench/results/issue12/batch32_page_bucket_probe.py`)."""

import statistics
import time

import numpy as np

from harli_jax import Engine, EngineConfig, SamplingParams
from harli_jax.model import load_model

model = load_model("configs/models/small.yaml")
rng = np.random.default_rng(0)
prompts = [rng.integers(3, 512, 128).tolist() for _ in range(32)]
sampling = SamplingParams(max_tokens=64, ignore_eos=True)
for seq_len, async_dispatch in [(256, True), (513, True), (256, False)]:
    engine = Engine(model, EngineConfig(max_batch=32, max_seq_len=seq_len, async_dispatch=async_dispatch))
    engine.generate(prompts, sampling)
    first = len(engine.step_records)
    started = time.perf_counter()
    engine.generate(prompts, sampling)
    wall = time.perf_counter() - started
    steps = [r for r in engine.step_records[first:] if r.prefill_tokens == 0 and r.decode_seqs == 32]
    print(f"max_seq_len {seq_len}, async {async_dispatch}: pages {sorted({r.bucket_pages for r in steps})}, "
          f"median step {1e3 * statistics.median(r.end - r.start for r in steps):.1f} ms, wall {wall:.2f} s")
