"""Finetune jobs through the engine: learning, exact resume in a new process, abandoned micro-batches,
bad input, NaN handling, serving the trained adapter."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, jax_events
from harli_jax import CheckpointError, Engine, EngineConfig, FinetuneJob, LoRAConfig, SamplingParams
from harli_jax.lora.data import DataError, default_dataset
from harli_jax.lora.default_data import held_out
from harli_jax.model import load_model
from harli_jax.runtime.finetune import JobStatus

CONFIG = EngineConfig(max_batch=4, prefill_chunk=16, max_seq_len=64, num_pages=80, page_tokens=16,
                      compile_threads=2, max_loras=1, max_lora_rank=8)


@pytest.fixture(scope="module")
def model(tiny_yaml):
    return load_model(tiny_yaml)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, CONFIG)


def _weights(handle):
    return {k: (np.array(p.a, copy=True), np.array(p.b, copy=True)) for k, p in sorted(handle.adapters.items())}


def test_default_finetune_learns_and_the_engine_serves_the_adapter(engine, model):
    handle = engine.finetune(FinetuneJob(eval_interval=0, seed=1))  # the defaults: 200 steps of 8 x 128 tokens
    initial = handle.evaluate()
    progress = handle.wait()
    assert progress.status is JobStatus.FINISHED and progress.step == 200
    assert progress.eval_loss < initial - 0.5, (initial, progress.eval_loss)
    assert progress.tokens > 0 and progress.tokens_per_s > 0
    assert [h["step"] for h in handle.history] == list(range(1, 201))

    # Upper-casing the prompt word: the trained adapter gets answers right that the base model does not, on
    # words that are nowhere in the job's data (dataset=None is default_dataset(seed=job seed)).
    samples = held_out(default_dataset(seed=1), 40, seed=99)
    assert not {s["prompt"] for s in samples} & {r["prompt"] for r in default_dataset(seed=1)}
    prompts = [s["prompt"] for s in samples]
    greedy = SamplingParams(max_tokens=8)
    base = engine.generate(prompts, greedy)
    engine.add_adapter("upper-casing", handle)
    tuned = engine.generate(prompts, greedy, adapter="upper-casing")

    def accuracy(outputs):
        return np.mean([o.text == s["completion"] for o, s in zip(outputs, samples, strict=True)])

    assert accuracy(base) == 0.0
    assert accuracy(tuned) >= 0.3, accuracy(tuned)


RESUME_SCRIPT = """
import json, sys
import numpy as np
from harli_jax import Engine, EngineConfig, FinetuneJob
engine = Engine.from_config(sys.argv[1], EngineConfig(max_seq_len=64, num_pages=8), warmup=False)
job = FinetuneJob(total_steps=int(sys.argv[3]), checkpoint_dir=sys.argv[2] if sys.argv[2] != "-" else None,
                  checkpoint_interval=3, eval_interval=0, micro_batch_rows=4, seq_len=32, seed=4)
handle = engine.finetune(job)
handle.wait(max_steps=int(sys.argv[4]))
handle.stop()
weights = {k: [np.asarray(p.a).tolist(), np.asarray(p.b).tolist()] for k, p in handle.adapters.items()}
print(json.dumps({"step": handle.progress().step, "weights": weights, "data": handle._runner.loader.state(),
                  "history": [h["loss"] for h in handle.history]}))
"""


def _run_job(tmp_path, ckpt, total, steps, with_log=False):
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(REPO / "configs/models/tiny.yaml"), str(ckpt),
                          str(total), str(steps)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return (result, out.stderr) if with_log else result


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The job's 7 steps in one run, without checkpoints."""
    return _run_job(tmp_path_factory.mktemp("straight"), "-", 7, 7)


def _assert_same_run(resumed, straight):
    assert resumed["step"] == 7
    assert resumed["history"] == straight["history"]  # same losses: same data order and weights at every step
    assert resumed["data"] == straight["data"]
    for k, (a, b) in straight["weights"].items():
        np.testing.assert_allclose(resumed["weights"][k][0], a, atol=1e-6, rtol=0)
        np.testing.assert_allclose(resumed["weights"][k][1], b, atol=1e-6, rtol=0)


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(tmp_path, straight):
    first = _run_job(tmp_path, tmp_path / "ckpt", 7, 4)  # checkpoints at step 3 (the interval) and 4 (the stop)
    assert first["step"] == 4
    files = [f for f in (tmp_path / "ckpt" / "4").rglob("*") if f.is_file()]
    largest = max(files, key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    resumed, log = _run_job(tmp_path, tmp_path / "ckpt", 7, 100, with_log=True)
    assert f"cannot restore step 4 from {tmp_path / 'ckpt'}" in log and "resumed from the older checkpoint" in log
    assert (tmp_path / "ckpt" / "unreadable-step-4").is_dir()  # kept aside, not deleted
    _assert_same_run(resumed, straight)  # from step 3: steps 4-7 trained once each, as without the crash


def test_resume_in_a_new_process_is_exact(tmp_path, straight):
    first = _run_job(tmp_path, tmp_path / "ckpt", 7, 3)
    assert first["step"] == 3
    resumed = _run_job(tmp_path, tmp_path / "ckpt", 7, 100)
    _assert_same_run(resumed, straight)


def _micro_step_job(engine, abandon_at=None):
    """Four optimizer steps on the micro-step path (one layer per chunk); optionally the second micro-batch
    loses its lease after its first forward chunk."""
    handle = engine.finetune(FinetuneJob(total_steps=4, eval_interval=0, micro_batch_rows=4, seq_len=32, seed=2,
                                         name=f"micro-{abandon_at}"))
    runner = handle._runner
    micro = runner.micro
    started = 0
    while runner.active:
        assert micro.start()
        started += 1
        while micro.current is not None:
            kind = micro.run(1).kind
            if started == abandon_at and kind == "forward":
                assert engine.arena.table.reclaim(engine.arena.table.capacity)
                assert micro.run(1) == (None, 0.0)
                assert micro.current is None
                break
    assert engine.arena.table.usage()["lease"] == 0
    return handle


def test_an_abandoned_microbatch_changes_nothing(engine):
    clean = _micro_step_job(engine)
    abandoned = _micro_step_job(engine, abandon_at=2)
    assert abandoned.progress().abandoned_microbatches == 1 and clean.progress().abandoned_microbatches == 0
    assert [h["loss"] for h in abandoned.history] == [h["loss"] for h in clean.history]
    for (a1, b1), (a2, b2) in zip(_weights(clean).values(), _weights(abandoned).values(), strict=True):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)


def test_bad_data_and_checkpoint_dir(engine, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n{"prompt": "a", "completion": "b"}\n')
    handle = engine.finetune(FinetuneJob(dataset=str(bad), total_steps=1, eval_fraction=0, name="bad"))
    assert [p.line for p in handle._runner.train_set.problems] == [2]
    handle.stop()
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        engine.finetune(FinetuneJob(dataset=str(bad), total_steps=1, strict_data=True))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl"):
        engine.finetune(FinetuneJob(dataset=str(empty), total_steps=1))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="not writable"):
        engine.finetune(FinetuneJob(total_steps=1, checkpoint_dir=str(blocker / "ckpt")))
    with pytest.raises(ValueError, match="LoRA dropout"):
        LoRAConfig(dropout=0.1)


def test_nonfinite_loss_skips_updates_then_pauses(model):
    first = model.params.layers[0]
    broken = dataclasses.replace(first, mlp_norm=first.mlp_norm.at[3].set(np.nan))
    params = dataclasses.replace(model.params, layers=(broken, *model.params.layers[1:]))
    engine = Engine(model.__class__(model.cfg, params, model.tokenizer), CONFIG, warmup=False)
    handle = engine.finetune(FinetuneJob(total_steps=10, eval_interval=0, max_nonfinite=3))
    before = _weights(handle)
    progress = handle.wait()
    assert progress.status is JobStatus.PAUSED and "3 consecutive non-finite" in progress.reason
    assert progress.skipped_updates == 3 and progress.step == 0
    for (a1, b1), (a2, b2) in zip(before.values(), _weights(handle).values(), strict=True):
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(handle.adapters))


def test_a_second_job_reuses_the_first_ones_programs(engine):
    def job(seed):
        return FinetuneJob(total_steps=2, eval_interval=0, micro_batch_rows=4, seq_len=32, seed=seed,
                           name=f"retrace-{seed}")

    engine.finetune(job(0)).wait()
    with jax_events("jaxpr_trace_duration") as traces:
        second = engine.finetune(job(1))  # other data order and init: same shapes and optimizer settings
        second.wait()
        jax.jit(lambda x: x - 1)(np.float32(1))  # the counter does see a trace
    assert second.progress().step == 2
    assert len(traces) == 1
