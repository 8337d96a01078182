"""Co-location: the policies against a deterministic fake cost model, memory lending under pressure, and the
real engine keeping the SLO while it trains."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import jax_events
from harli_jax import Engine, EngineConfig, FinetuneJob, FinishedEvent, FinishReason, Request, SamplingParams
from harli_jax.lora.data import DataLoader
from harli_jax.model import init_params, load_model
from harli_jax.model.loader import LoadedModel
from harli_jax.runtime.colocation import (
    HarliPolicy,
    MicroKind,
    StaticPolicy,
    TemporalPolicy,
    WindowContext,
    advance,
    make_policy,
    micro_sequence,
)

LAYERS = 8


def fake_cost(kind):
    """Deterministic costs: a forward layer 1 ms, a backward layer 2 ms, loss and commit 0.5 ms each."""
    name, layers = kind
    per_layer = 1e-3 if name.startswith("forward") else 2e-3
    return per_layer * layers + (0.5e-3 if "+" in name else 0.0)


def _ctx(budget_ms, pending=None, can_start=True, deadlines=None, steps=0):
    slo = 0.05
    # budget = min(deadline) - now - next_step_bound - margin, with now 0, next step 5 ms, margin 5 ms.
    deadline = budget_ms / 1e3 + 0.01
    return WindowContext(now=0.0, slo=slo, margin=0.005, next_step_bound=0.005,
                         deadlines=[deadline] if deadlines is None else deadlines, num_layers=LAYERS,
                         pending=pending, can_start=can_start, inference_steps=steps)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(budget_ms=st.floats(0, 60), phase=st.sampled_from([None, "forward", "backward"]),
       left=st.integers(1, LAYERS), can_start=st.booleans())
def test_harli_never_exceeds_the_budget_and_fills_it(budget_ms, phase, left, can_start):
    policy = HarliPolicy(fake_cost, chunks=(1, 2, 4, 8), bank_cap=10.0)
    ctx = _ctx(budget_ms, None if phase is None else (phase, left), can_start)
    plan = policy.plan(ctx)
    assert plan.budget == pytest.approx(budget_ms / 1e3)
    used = sum(fake_cost(k) for k in plan.steps)
    assert used == pytest.approx(plan.predicted)
    assert used <= plan.budget + 1e-12
    # Every micro-step has a 1-layer form costing at most 2.5 ms, so a plan that stops while work is left
    # leaves less than that unused: at least 90% of any budget from 25 ms up.
    if plan.budget >= 0.025 and _work_left(plan, ctx):
        assert used >= 0.9 * plan.budget


def _work_left(plan, ctx):
    """Whether a micro-step could follow the plan (not after the last micro-batch it may run)."""
    if ctx.can_start:
        return True
    if ctx.pending is None:
        return False
    return not plan.steps or plan.steps[-1][0] != "backward+commit"


def test_harli_uses_banked_slack_but_respects_the_earliest_deadline():
    policy = HarliPolicy(fake_cost, chunks=(1, 2, 4, 8), bank_cap=1.0)
    tight = policy.plan(_ctx(0, deadlines=[0.012, 0.5]))  # one request is 2 ms from its deadline
    assert tight.budget == pytest.approx(0.002) and sum(fake_cost(k) for k in tight.steps) <= 0.002
    banked = policy.plan(_ctx(0, deadlines=[0.5]))  # far ahead: the bank is capped at one SLO
    assert banked.budget == pytest.approx(0.05 * 2 - 0.01)
    late = policy.plan(_ctx(0, deadlines=[-0.01]))  # already late: nothing runs
    assert late.steps == ()


def test_micro_steps_follow_the_phases_in_compiled_chunk_sizes():
    plan = HarliPolicy(fake_cost, chunks=(1, 2, 8)).plan(_ctx(50, pending=("forward", 3)))
    assert plan.steps[:3] == (("forward", 2), ("forward+loss", 1), ("backward+commit", 8))


def test_one_phase_machine_for_policies_and_trainer():
    assert advance(("forward", 3), 2, LAYERS) == (MicroKind.FORWARD, ("forward", 1))
    assert advance(("forward", 1), 1, LAYERS) == (MicroKind.FORWARD_LOSS, ("backward", LAYERS))
    assert advance(("backward", 5), 4, LAYERS) == (MicroKind.BACKWARD, ("backward", 1))
    assert advance(("backward", 2), 2, LAYERS) == (MicroKind.BACKWARD_COMMIT, None)
    # A whole micro-batch in chunks of 3 over compiled sizes (1, 2, 3, 8): every layer once each way.
    steps = micro_sequence(None, True, LAYERS, 3, (1, 2, 3, 8))
    assert steps == [("forward", 3), ("forward", 3), ("forward+loss", 2), ("backward", 3), ("backward", 3),
                     ("backward+commit", 2)]
    assert micro_sequence(None, False, LAYERS, 3, (1, 2, 3, 8)) == []


def test_baselines():
    ctx = _ctx(0, pending=("backward", 5), steps=2)
    chunks = (1, 2, 4, 8)
    assert TemporalPolicy(k=2, chunk=2, chunks=chunks).plan(ctx).steps == (("backward", 2), ("backward", 2))
    assert TemporalPolicy(k=3, chunk=2, chunks=chunks).plan(ctx).steps == ()  # only 2 inference steps so far
    assert StaticPolicy(layers=4, chunks=chunks).plan(ctx).steps == (("backward", 4),)
    # 5 layers are left: the largest compiled chunk that fits (4), then the last layer with the commit.
    assert StaticPolicy(layers=8, chunks=chunks).plan(ctx).steps == (("backward", 4),)
    assert StaticPolicy(layers=8, chunks=chunks).plan(_ctx(0, pending=("backward", 1))).steps == (
        ("backward+commit", 1),)
    assert TemporalPolicy(k=3, chunk=3, chunks=(1, 2, 3, 8)).plan(_ctx(0, pending=("forward", 5), steps=3)).steps \
        == (("forward", 3), ("forward+loss", 2), ("backward", 3))
    assert make_policy("decode-only", fake_cost, (1,)).plan(ctx).steps == ()
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fifo", fake_cost, (1,))


# The real engine -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_yaml):
    return load_model(tiny_yaml)


def _trace(n, rate, seed=0, prompt=(8, 48), output=(8, 32)):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    return [Request(rng.integers(3, 500, rng.integers(*prompt)).tolist(),
                    SamplingParams(max_tokens=int(rng.integers(*output)), ignore_eos=True), arrival=float(a))
            for a in arrivals]


def _deeper(tiny, num_layers):
    cfg = tiny.cfg.replace(num_layers=num_layers)
    return LoadedModel(cfg, init_params(cfg, seed=0), tiny.tokenizer)


def _attainment(engine, requests, slo):
    outputs = [e.output for e in engine.serve(requests) if isinstance(e, FinishedEvent)]
    assert len(outputs) == len(requests)
    return float(np.mean([o.tpot <= slo for o in outputs if o.tpot is not None]))


def test_harli_keeps_an_slo_that_a_slo_blind_policy_breaks(tiny, tmp_path):
    # An 8-layer model: one layer of a micro-step costs a fraction of a whole-model micro-step. The SLO is the
    # solo decode step plus half the cheaper whole-model micro-step, so `static` with all layers after every
    # step (SLO-blind) cannot keep it, while harli fits smaller micro-steps into the slack.
    model = _deeper(tiny, 8)
    base = dict(max_batch=8, prefill_chunk=32, max_seq_len=128, num_pages=300, calibration_dir=str(tmp_path),
                calibration_runs=2, compile_threads=2)
    job = FinetuneJob(total_steps=10_000, eval_interval=0)  # 8 x 128-token micro-batches
    blind = Engine(model, EngineConfig(**base, policy="static", static_layers=8))
    blind.finetune(job)
    costs = blind.calibrate()
    whole = min(costs.micro(("forward+loss", 8)).mean, costs.micro(("backward+commit", 8)).mean)
    slo = blind.time_decode_step(8) + 0.5 * whole
    requests = _trace(24, rate=25)
    assert _attainment(blind, requests, slo) <= 0.5

    harli = Engine(model, EngineConfig(**base, policy="harli", slo_margin=0.5))
    harli.set_tpot_slo(slo * 1e3)  # as `harli replay` sets an SLO derived from a measured step
    handle = harli.finetune(job)
    before = handle.progress().tokens
    assert _attainment(harli, requests, slo) >= 0.99
    trained_windows = [r for r in harli.step_records if r.train]
    assert trained_windows, "harli trained nothing while serving"
    assert handle.progress().tokens > before
    assert all(r.decision_time < 0.01 for r in harli.step_records)
    assert harli.predictor.error_report()["windows"] == len(trained_windows)


@pytest.mark.parametrize("policy", [dict(policy="static", static_layers=4),
                                    dict(policy="temporal-K", temporal_k=1, temporal_chunk=3),
                                    dict(policy="harli", tpot_slo_ms=40.0)])
def test_training_windows_do_not_recompile(tiny, tmp_path, policy):
    # 7 layers: 4- or 3-layer micro-steps leave 3 or 1 layers, and harli's powers of two leave 3, 5, 6 or 7.
    config = EngineConfig(max_batch=4, prefill_chunk=32, max_seq_len=64, num_pages=200,
                          calibration_dir=str(tmp_path), compile_threads=2, **policy)
    engine = Engine(_deeper(tiny, 7), config)
    handle = engine.finetune(FinetuneJob(total_steps=10_000, eval_interval=0, micro_batch_rows=2, seq_len=64))
    with jax_events() as compiles:
        # One step: static runs a 4-layer forward after it and leaves 3 layers to the idle path that follows.
        engine.generate([[5, 6, 7]], SamplingParams(max_tokens=1, ignore_eos=True))
        _attainment(engine, _trace(12, rate=50, prompt=(4, 24), output=(4, 24)), slo=1.0)
        handle.wait(max_steps=1)  # finishes the micro-batch in flight through the idle path
    trained = [k for r in engine.step_records for k in r.train]
    assert trained, "no training window ran"
    if policy["policy"] != "harli":  # the forward's last 3 (or 1) layers ran in compiled sizes, the loss on 1
        assert "forward+loss:1" in trained, trained
    assert compiles == []


def test_reclaims_before_requests_wait_and_no_sample_is_lost(tiny, tmp_path):
    # 8 layers, one per micro-step: a micro-batch holds its lease for 16 windows, longer than the burst takes
    # to fill the arena, so the burst must take the trainer's pages back.
    cfg = tiny.cfg.replace(num_layers=8)
    tiny = LoadedModel(cfg, init_params(cfg, seed=0), tiny.tokenizer)
    config = EngineConfig(max_batch=8, prefill_chunk=128, max_seq_len=128, num_pages=48, tpot_slo_ms=200.0,
                          policy="static", static_layers=1, calibration_dir=str(tmp_path), compile_threads=2)
    engine = Engine(tiny, config)
    handle = engine.finetune(FinetuneJob(total_steps=10_000, eval_interval=0, micro_batch_rows=4, seq_len=64))
    runner = handle._runner
    taken = _audit_loader(runner.loader)
    need = runner.micro.stash_pages_needed
    assert need < engine.arena.table.capacity
    waits = []
    grow = engine.arena.table.grow_kv

    def watched(request_id, tokens):
        granted = grow(request_id, tokens)
        if not granted:
            waits.append(engine.arena.table.usage()["lease"])
        return granted

    engine.arena.table.grow_kv = watched
    # A long, light request keeps the trainer on the micro-step path; the burst comes while it holds a lease.
    engine.submit([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True))
    events = []
    while engine.arena.table.usage()["lease"] == 0:
        events += engine.step()
    for _ in range(6):
        engine.submit(list(range(3, 100)), SamplingParams(max_tokens=28, ignore_eos=True))
    while engine.has_unfinished():
        events += engine.step()
    outputs = [e.output for e in events if isinstance(e, FinishedEvent)]
    assert len(outputs) == 7 and all(o.finish_reason is FinishReason.LENGTH for o in outputs)
    assert engine.arena.table.reclaims > 0, "the burst never needed the trainer's pages"
    assert all(lease == 0 for lease in waits), "a request waited for memory while the trainer held pages"
    progress = handle.progress()
    assert progress.abandoned_microbatches > 0
    handle.wait(max_steps=3)  # the job goes on after the burst
    assert handle.progress().step >= progress.step + 3
    # Every sample trained once, in the loader's order, none lost or counted twice.
    in_flight = runner.micro.current
    committed = taken[: len(taken) - len(in_flight.batch.pieces)] if in_flight is not None else taken
    order = _loader_order(runner, len(committed))
    assert committed == order


def _audit_loader(loader):
    """The (sample, window) pieces the job has taken from `loader` and not given back: with one micro-batch in
    flight at most, a micro-batch given back is the last one taken."""
    taken = []
    take, give_back = loader.next_batch, loader.push_back

    def next_batch():
        batch = take()
        taken.extend(batch.pieces)
        return batch

    def push_back(batch):
        n = len(batch.pieces)
        assert taken[-n:] == list(batch.pieces), "a micro-batch given back is not the last one taken"
        del taken[-n:]
        give_back(batch)

    loader.next_batch, loader.push_back = next_batch, push_back
    return taken


def _loader_order(runner, n):
    """The first n (sample, window) pieces of the job's data order, from a fresh loader."""
    fresh = DataLoader(runner.train_set, runner.job.micro_batch_rows, runner.job.seq_len, seed=runner.job.seed,
                       overflow=runner.job.overflow)
    pieces = []
    while len(pieces) < n:
        pieces.extend(fresh.next_batch().pieces)
    return pieces[:n]
