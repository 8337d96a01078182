"""Admission control on a real engine: at 3x the arrival rate it sustains, the requests it admits keep their TPOT
SLO, the rest wait and are refused at the queue timeout, and the engine serves on; without it the same trace
breaks the SLO of nearly every request. The scheduler's side (who waits, who is refused) is in test_scheduler."""

import time

import numpy as np
import pytest

from conftest import REPO
from harli_jax.model import load_model
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.request import FinishedEvent, FinishReason, Request, SamplingParams

CPU_MARGIN = 1.2  # a TPOT within 1.2x the SLO counts as kept: 2 shared cores jitter by that much, a breach doesn't


@pytest.fixture(scope="module")
def small():
    # Steps of tens of milliseconds: the tiny model's are a millisecond, within the host's own jitter.
    return load_model(REPO / "configs" / "models" / "small.yaml")


def _trace(n, rate, seed):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate else np.zeros(n)
    return [Request(rng.integers(3, 500, rng.integers(8, 32)).tolist(),
                    SamplingParams(max_tokens=int(rng.integers(16, 40)), ignore_eos=True), arrival=float(a))
            for a in arrivals]


def _outputs(engine, requests, realtime=True):
    return [e.output for e in engine.serve(requests, realtime=realtime) if isinstance(e, FinishedEvent)]


def _engine(model, tmp_path, admission):
    config = EngineConfig(max_batch=4, batch_buckets=(2, 4), prefill_chunk=32, max_seq_len=128,
                          calibration_dir=str(tmp_path), admission=admission, queue_timeout_s=2.0)
    engine = Engine(model, config)
    engine.set_tpot_slo(engine.time_decode_step(4) * 1e3)  # the SLO: one solo decode step of the full batch
    return engine


def test_at_three_times_the_sustainable_rate_admitted_requests_keep_their_slo(small, tmp_path):
    engine = _engine(small, tmp_path, admission=True)
    slo = engine.config.colocation.tpot_slo_ms / 1e3
    started = time.perf_counter()
    assert len(_outputs(engine, _trace(8, 0, seed=0), realtime=False)) == 8
    sustainable = 8 / (time.perf_counter() - started)  # requests per second with the batch kept full
    overload = _trace(30, 3 * sustainable, seed=1)
    outputs = _outputs(engine, overload)
    assert len(outputs) == len(overload)  # every request accounted for
    admitted = [o for o in outputs if o.finish_reason is FinishReason.LENGTH]
    refused = [o for o in outputs if o.finish_reason is FinishReason.REFUSED]
    assert len(admitted) + len(refused) == len(overload)
    assert admitted and refused
    assert all(o.token_ids == () and "queue timeout of 2 s" in o.error for o in refused)
    assert np.mean([o.tpot <= CPU_MARGIN * slo for o in admitted]) >= 0.99
    assert engine.arena.table.usage()["kv"] == 0
    [after] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4))  # it serves on
    assert after.finish_reason is FinishReason.LENGTH and len(after.token_ids) == 4

    blind = _engine(small, tmp_path, admission=False)  # the same trace, every request let in at once
    outputs = _outputs(blind, overload)
    admitted = [o for o in outputs if o.finish_reason is FinishReason.LENGTH]
    assert np.mean([o.tpot <= slo for o in admitted]) < 0.5
