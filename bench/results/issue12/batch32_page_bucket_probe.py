import time, statistics, sys, numpy as np
from harli_jax import Engine, EngineConfig, SamplingParams
from harli_jax.model import load_model
m = load_model("configs/models/small.yaml")
rng = np.random.default_rng(0)
prompts = [rng.integers(3, 512, 128).tolist() for _ in range(32)]
for seq_len, asyn in [(256, True), (513, True), (256, False)]:
    e = Engine(m, EngineConfig(max_batch=32, max_seq_len=seq_len, async_dispatch=asyn))
    sp = SamplingParams(max_tokens=64, ignore_eos=True)
    e.generate(prompts, sp)
    n0 = len(e.step_records)
    t = time.perf_counter(); e.generate(prompts, sp); wall = time.perf_counter() - t
    recs = [r for r in e.step_records[n0:] if r.prefill_tokens == 0 and r.decode_seqs == 32]
    print(seq_len, asyn, "pages", sorted({r.bucket_pages for r in recs}), "median step ms", 1e3*statistics.median(r.end-r.start for r in recs), "wall", wall, flush=True)
