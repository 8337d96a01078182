"""Injected faults through the Python API and `harli finetune`: each one gives a clear error for its input alone
(the step, the path) and the engine serves on, a request after it equal to the same request before it. A NaN
loss, a checkpoint directory that stops being writable, a dataset file removed while its job trains, corrupt
adapter files, stop strings that never match, and an abort storm."""

import json
import shutil
import threading

import numpy as np
import pytest
import safetensors.numpy

from harli_jax import CheckpointError, Engine, EngineConfig, FinetuneJob, SamplingParams
from harli_jax.cli import main
from harli_jax.lora.adapters import PEFT_CONFIG, PEFT_WEIGHTS
from harli_jax.lora.checkpoint import TrainCheckpointer
from harli_jax.lora.data import DataError, default_dataset
from harli_jax.model import load_model
from harli_jax.runtime.finetune import JobStatus
from harli_jax.runtime.processing import RequestError
from harli_jax.runtime.request import FinishReason
from harli_jax.runtime.scheduler import FinishedEvent

CONFIG = EngineConfig(max_batch=4, prefill_chunk=16, max_seq_len=64, num_pages=80, page_tokens=16,
                      compile_threads=2, max_loras=1, max_lora_rank=8)
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PROBE = [5, 17, 42, 99, 7]  # the request served after each fault


def _job(**kwargs):
    """A small job: every one has the same shapes, so they share their programs."""
    return FinetuneJob(**{"total_steps": 8, "eval_interval": 0, "micro_batch_rows": 2, "seq_len": 32,
                          "checkpoint_interval": 2, **kwargs})


@pytest.fixture(scope="module")
def engine(tiny_yaml):
    return Engine(load_model(tiny_yaml), CONFIG)


@pytest.fixture(scope="module")
def probe(engine):
    """The probe request's tokens on the engine before any fault."""
    return engine.generate(PROBE, GREEDY)[0].token_ids


def _serves_on(engine, probe):
    assert engine.generate(PROBE, GREEDY)[0].token_ids == probe
    assert engine.arena.table.usage()["kv"] == 0


def _weights(handle):
    return [np.array(leaf) for pair in handle.adapters.values() for leaf in (pair.a, pair.b)]


def test_a_nonfinite_loss_pauses_the_job_naming_the_step_with_its_last_good_weights_saved(engine, probe, tmp_path):
    # A learning rate of 1e30 blows the weights up after the first steps: the loss turns NaN from then on.
    handle = engine.finetune(_job(learning_rate=1e30, checkpoint_dir=tmp_path / "ckpt", checkpoint_interval=100))
    try:
        progress = handle.wait()
        assert progress.status is JobStatus.PAUSED and progress.skipped_updates == 3 and progress.step >= 1
        assert progress.reason == (f"3 consecutive non-finite updates at step {progress.step + 1} (skipped: the "
                                   f"weights are those of step {progress.step})")
        assert all(np.isfinite(w).all() for w in _weights(handle))  # no NaN in the weights
        # The pause saved the last good step (the interval would not have), on disk before it returned.
        assert handle._runner.checkpointer.latest_step() == progress.step
        assert (tmp_path / "ckpt" / str(progress.step) / "state").is_dir()
        _serves_on(engine, probe)
    finally:
        handle.stop()


@pytest.mark.parametrize("end", ["finish", "stop"])
def test_a_job_that_ends_leaves_the_wait_for_its_last_checkpoint_to_another_thread(engine, probe, tmp_path,
                                                                                   monkeypatch, end):
    # A job that finishes in an engine step, or that `stop(wait=False)` stops, starts its last save and returns;
    # the wait until it is on disk is `wait_saved`'s, on any thread (the server's writer), never the engine's.
    waits = []
    wait = TrainCheckpointer.wait

    def recorded(checkpointer):
        waits.append((threading.current_thread().name, checkpointer._pending))
        wait(checkpointer)

    monkeypatch.setattr(TrainCheckpointer, "wait", recorded)
    handle = engine.finetune(_job(total_steps=3, checkpoint_dir=tmp_path / "ckpt", checkpoint_interval=100))
    while not handle.done() and (end == "finish" or handle.progress().step < 1):
        engine.step()
    if end == "stop":
        handle.stop(wait=False)
    last = handle.progress().step
    assert handle.done() and last >= 1
    assert (threading.current_thread().name, last) not in waits  # its save started; nobody waited for it here
    saver = threading.Thread(target=handle.wait_saved, name="saver")
    saver.start()
    saver.join()
    assert ("saver", last) in waits
    assert TrainCheckpointer(tmp_path / "ckpt").latest_step() == last
    _serves_on(engine, probe)


def test_a_checkpoint_directory_that_breaks_mid_job_pauses_it_and_a_fixed_one_trains_on(engine, probe, tmp_path):
    directory = tmp_path / "ckpt"
    handle = engine.finetune(_job(checkpoint_dir=directory))
    try:
        handle.wait(max_steps=2)
        handle.checkpoint()  # step 2 on disk
        # No more writes there (chmod 0o555 does not stop root, so a regular file takes the directory's place).
        shutil.rmtree(directory)
        directory.write_text("not a directory")
        handle.wait(max_steps=1)
        unwritable = f"checkpoint directory {directory} is not writable: "
        with pytest.raises(CheckpointError, match=f"cannot write the checkpoint of step 3: {unwritable}"):
            handle.checkpoint()  # asked for, it raises
        progress = handle.wait()  # the save at step 4 fails: the job pauses, wait() does not raise
        assert progress.status is JobStatus.PAUSED and progress.step == 4, progress
        assert progress.reason.startswith(f"cannot write the checkpoint of step 4: checkpoint directory {directory} "
                                          f"is not writable: ")
        assert progress.reason.endswith("(paused with its state in memory: make the directory writable and resume)")
        kept = _weights(handle)
        _serves_on(engine, probe)
        assert all(np.array_equal(a, b) for a, b in zip(kept, _weights(handle), strict=True))  # nothing lost
        directory.unlink()
        handle.resume()
        progress = handle.wait()
        assert progress.status is JobStatus.FINISHED and progress.step == 8 and progress.reason is None
        assert handle._runner.checkpointer.latest_step() == 8
    finally:
        handle.stop()


def test_a_dataset_file_removed_while_its_job_trains(engine, probe, tmp_path):
    """The job reads its dataset whole when it starts: one removed afterwards trains to the end; a job started
    on it after that is refused naming the file."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in default_dataset(seed=2)[:40]))
    handle = engine.finetune(_job(dataset=path, eval_fraction=0.0))
    try:
        handle.wait(max_steps=2)
        path.unlink()
        progress = handle.wait()
        assert progress.status is JobStatus.FINISHED and progress.step == 8
    finally:
        handle.stop()
    with pytest.raises(DataError, match=f"^{path}: no such data file$"):
        engine.finetune(_job(dataset=path))
    _serves_on(engine, probe)


def _truncated(directory):
    weights = directory / PEFT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])


def _edit_config(**changes):
    def edit(directory):
        config = json.loads((directory / PEFT_CONFIG).read_text())
        config.update(changes)
        (directory / PEFT_CONFIG).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return edit


def _nan_weights(directory):
    tensors = safetensors.numpy.load_file(str(directory / PEFT_WEIGHTS))
    name = sorted(tensors)[0]
    tensors[name] = np.full_like(tensors[name], np.nan)
    safetensors.numpy.save_file(tensors, str(directory / PEFT_WEIGHTS))


@pytest.fixture(scope="module")
def adapter(engine, tmp_path_factory):
    """A trained adapter exported in the PEFT format, and the probe's tokens with it."""
    handle = engine.finetune(_job(total_steps=2, learning_rate=3e-2))
    handle.wait()
    handle.stop()
    directory = handle.export_peft(tmp_path_factory.mktemp("adapter") / "good")
    engine.add_adapter("good", directory)
    return directory, engine.generate(PROBE, GREEDY, adapter="good")[0].token_ids


@pytest.mark.parametrize("corrupt,file,message", [
    (_truncated, PEFT_WEIGHTS, "cannot read the PEFT adapter weights {}: Error while deserializing header"),
    (lambda d: (d / PEFT_WEIGHTS).unlink(), PEFT_WEIGHTS, "cannot read the PEFT adapter weights {}: "),
    (lambda d: (d / PEFT_CONFIG).write_text('{"r": 8,'), PEFT_CONFIG, "cannot read the PEFT adapter config {}: "),
    (lambda d: (d / PEFT_CONFIG).write_text("[8]"), PEFT_CONFIG, "{} is not a PEFT adapter config"),
    (_edit_config(r=None), PEFT_CONFIG, "{} lacks 'r'"),
    (_edit_config(r="eight"), PEFT_CONFIG, "{}: invalid literal for int()"),
    (_edit_config(r=4), PEFT_WEIGHTS, "{}: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (8, 64) "
                                      "is not of shape (4, 64)"),
    (_nan_weights, PEFT_WEIGHTS, "{} holds non-finite weights"),
], ids=["truncated", "no-weights", "config-cut", "config-list", "no-rank", "bad-rank", "wrong-rank", "nan"])
def test_a_corrupt_adapter_is_refused_naming_its_file(engine, probe, adapter, tmp_path, corrupt, file, message):
    good, with_good = adapter
    directory, name = tmp_path / "adapter", tmp_path.name  # a name per case
    shutil.copytree(good, directory)
    corrupt(directory)
    with pytest.raises(CheckpointError) as e:
        engine.add_adapter(name, directory)
    assert str(e.value).startswith(message.format(directory / file)), str(e.value)
    assert name not in engine.adapters.names()
    _serves_on(engine, probe)
    assert engine.generate(PROBE, GREEDY, adapter="good")[0].token_ids == with_good
    shutil.rmtree(directory)
    shutil.copytree(good, directory)
    engine.add_adapter(name, directory)  # the refused name was not taken
    assert engine.generate(PROBE, GREEDY, adapter=name)[0].token_ids == with_good


def test_stop_strings_that_never_match_end_at_max_tokens_with_all_the_text(engine):
    prompts = [[5, 17, 42], [300, 301, 302, 303], [77] * 9]
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    reference = engine.generate(prompts, sampling)
    never = [o.text + "\x00" for o in reference]  # longer than any output: held back to the end, never matched
    stopping = SamplingParams(max_tokens=12, ignore_eos=True, stop=(never[0], "\x00\x01", reference[1].text + "!"))
    outputs = engine.generate(prompts, [stopping, sampling, sampling])
    assert outputs[0].finish_reason is FinishReason.LENGTH and len(outputs[0].token_ids) == 12
    assert outputs[0].token_ids == reference[0].token_ids and outputs[0].text == reference[0].text
    for got, want in zip(outputs[1:], reference[1:], strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason is want.finish_reason
    # Streamed, the held-back text comes with the last token: the pieces add up to the whole text.
    rid = engine.submit(prompts[0], stopping)
    pieces, finished = [], None
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, FinishedEvent):
                finished = event.output
            elif event.request_id == rid and event.text:
                pieces.append(event.text)
    assert "".join(pieces) == finished.text == reference[0].text


def test_an_abort_storm_finishes_every_request_and_frees_every_page(engine, probe):
    rng = np.random.default_rng(7)
    submitted, finished = [], {}
    for i in range(24):
        prompt = rng.integers(3, 500, int(rng.integers(1, 40))).tolist()
        submitted.append(engine.submit(prompt, SamplingParams(max_tokens=int(rng.integers(1, 20)), ignore_eos=True)))
        if i % 4 == 0:
            engine.abort(submitted[-1])  # before it ever runs
            engine.abort(submitted[-1])  # twice
    with pytest.raises(RequestError, match="unknown request id 'nope'"):
        engine.abort("nope")
    steps = 0
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, FinishedEvent):
                assert event.output.request_id not in finished, "two finished events"
                finished[event.output.request_id] = event.output
        steps += 1
        live = [r for r in submitted if r not in finished]
        for rid in rng.permutation(live)[: int(rng.integers(0, 3))]:  # mid-prefill or mid-decode
            engine.abort(str(rid))
            if rng.random() < 0.3:
                engine.abort(str(rid))
        if steps % 5 == 0 and finished:
            with pytest.raises(RequestError, match="never submitted, or already finished"):
                engine.abort(next(iter(finished)))
    assert sorted(finished) == sorted(submitted)
    reasons = [o.finish_reason for o in finished.values()]
    assert reasons.count(FinishReason.ABORTED) >= 6 and FinishReason.LENGTH in reasons
    assert any(o.finish_reason is FinishReason.ABORTED and o.token_ids for o in finished.values())  # mid-decode
    engine.arena.table.check_invariants()
    assert engine.arena.table.usage()["kv"] == 0 and engine.arena.table.usage()["lease"] == 0
    _serves_on(engine, probe)


def test_harli_finetune_with_a_nonfinite_loss_exits_with_the_step(tiny_yaml, tmp_path, capsys):
    code = main(["finetune", "--model", str(tiny_yaml), "--steps", "8", "--rows", "2", "--seq-len", "32",
                 "--lr", "1e30", "--out", str(tmp_path / "adapter")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "harli: error: the job paused: 3 consecutive non-finite updates at step " in err, err
    assert not (tmp_path / "adapter").exists()  # no adapter of NaN weights written
