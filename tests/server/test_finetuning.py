"""Fine-tuning through the OpenAI API on `harli serve`, driven with the official `openai` client: upload (and
refusing bad data by line), a job trained to `succeeded` with its events and servable checkpoints, chat with the
fine-tuned model against an in-process engine serving the job's exported PEFT adapter, two adapters in one
batch, pause / resume / cancel, the errors, and a restart that resumes a running job and serves the finished one."""

import concurrent.futures
import json
import signal
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import launch_server, running_server
from harli_jax import Engine, EngineConfig, SamplingParams
from harli_jax.lora.data import chat_prompt_ids, default_dataset
from harli_jax.model import load_model

NAME = "tiny-ft"
JOB_FLAGS = ["--served-model-name", NAME, "--max-batch", "4", "--max-seq-len", "128", "--prefill-chunk", "32",
             "--finetune-seq-len", "64", "--checkpoint-steps", "2", "--max-loras", "2", "--tpot-slo", "1000ms",
             "--policy", "temporal-K", "--drain-timeout", "5"]
MESSAGES = [{"role": "user", "content": "word: apple"}]
GREEDY = {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}


def _records(n):
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in default_dataset(seed=1)[:n]]


def _jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(tiny_yaml, state):
    with running_server(tiny_yaml, "--state-dir", str(state), *JOB_FLAGS) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(tiny_yaml):
    """The server's weights and sizes in this process, with room for two adapters."""
    return Engine(load_model(tiny_yaml), EngineConfig(max_batch=4, max_seq_len=128, prefill_chunk=32, max_loras=2))


def _wait(client, job_id, statuses, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} is still {job.status}")


@pytest.fixture(scope="module")
def finished(client):
    """A job trained to the end: (job, its training file)."""
    upload = client.files.create(file=("train.jsonl", _jsonl(_records(12))), purpose="fine-tune")
    validation = client.files.create(file=("valid.jsonl", _jsonl(_records(16)[12:])), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=NAME, training_file=upload.id, validation_file=validation.id,
                                         suffix="upper", seed=1, hyperparameters={"n_epochs": 1, "batch_size": 2})
    assert job.status == "queued" and job.fine_tuned_model is None
    return _wait(client, job.id, ("succeeded", "failed", "cancelled")), upload


def _newest_checkpoints(client, job_id, past_step, timeout=180):
    """The job's checkpoints (newest first) once one is past `past_step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
        if checkpoints and checkpoints[0].step_number > past_step:
            return checkpoints
        time.sleep(0.2)
    pytest.fail(f"job {job_id} made no checkpoint past step {past_step}")


def test_an_upload_is_validated_by_line(client):
    good = _records(2)
    bad = [good[0], "not an object", {"messages": [{"role": "user", "content": "no answer"}]}, good[1]]
    raw = _jsonl(bad).replace(b'"not an object"', b"{not json")
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", raw), purpose="fine-tune")
    message = e.value.body["message"]
    assert message.startswith("bad.jsonl is not valid fine-tuning data: line 2: ") and "line 3: " in message, message
    with pytest.raises(openai.BadRequestError, match="purpose 'assistants' is not supported"):
        client.files.create(file=("a.jsonl", _jsonl(good)), purpose="assistants")
    assert "bad.jsonl" not in [f.filename for f in client.files.list().data]  # nothing kept of a refused upload


def test_a_job_trains_to_succeeded_with_events_and_checkpoints(client, finished):
    job, upload = finished
    assert job.status == "succeeded", [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
    assert job.fine_tuned_model == f"ft:{NAME}:upper:{job.id}" and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 1 and job.training_file == upload.id
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert messages[0].startswith("The job has successfully completed") and messages[-1].startswith("Created")
    (valid,) = [e.data for e in events if e.type == "metrics" and "valid_loss" in e.data]
    steps = [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert steps == sorted(steps, reverse=True) and steps[0] >= 2 and len(steps) == steps[0]
    assert valid["step"] == steps[0] and 0 < valid["valid_loss"] < 20
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [s for s in range(steps[0] - 1, 0, -1) if s % 2 == 0][:10]
    assert checkpoints[-1].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-2"
    assert [j.id for j in client.fine_tuning.jobs.list().data][0] == job.id
    models = {m.id: m for m in client.models.list().data}
    assert models[job.fine_tuned_model].parent == NAME and checkpoints[-1].fine_tuned_model_checkpoint in models


def test_the_fine_tuned_model_and_a_checkpoint_in_one_batch_equal_the_exported_adapters(client, finished, engine,
                                                                                        state, server):
    job, _ = finished
    checkpoint = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1]
    engine.add_adapter("final", state / "jobs" / job.id / "adapter")
    engine.add_adapter("step-2", state / "jobs" / job.id / "checkpoints" / "step-2")
    config = json.loads((state / "jobs" / job.id / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == NAME
    prompt = chat_prompt_ids(MESSAGES, engine.tokenizer)
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    want = {a: engine.generate(prompt, sampling, adapter=a)[0].text for a in ("final", "step-2", None)}
    assert len(set(want.values())) > 1  # the adapters change the answer, so the comparison can tell them apart
    names = {"final": job.fine_tuned_model, "step-2": checkpoint.fine_tuned_model_checkpoint, None: NAME}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:  # both adapters and the base model in the same steps
        futures = {pool.submit(client.chat.completions.create, model=names[a], messages=MESSAGES, **GREEDY): a
                   for a in ("final", "step-2", None) * 2}
        for future, adapter in futures.items():
            assert future.result().choices[0].message.content == want[adapter], adapter
    metrics = urllib.request.urlopen(f"{server[1]}/metrics", timeout=30).read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples if not s.labels}
    assert samples["harli:finetune_trained_tokens"] == job.trained_tokens  # the last job's, as the engine saw it


def test_pause_resume_and_cancel(client, finished):
    upload = client.files.create(file=("long.jsonl", _jsonl(_records(12))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=NAME, training_file=upload.id, hyperparameters={"n_epochs": 500})
    _wait(client, job.id, ("running",))
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    paused_at = client.fine_tuning.jobs.retrieve(job.id).trained_tokens
    time.sleep(0.5)
    assert client.fine_tuning.jobs.retrieve(job.id).trained_tokens == paused_at  # it does not train while paused
    assert client.fine_tuning.jobs.resume(job.id).status == "running"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.parametrize("body,status,message", [
    ({"model": "other", "training_file": "file-x"}, 404, "model 'other' cannot be fine-tuned here"),
    ({"model": NAME}, 400, "training_file is required"),
    ({"model": NAME, "training_file": "file-nope"}, 404, "no file with id 'file-nope'"),
    ({"model": NAME, "training_file": "FILE", "hyperparameters": {"n_epochs": 0}}, 400, "n_epochs must be >= 1"),
    ({"model": NAME, "training_file": "FILE", "hyperparameters": {"batch_size": "big"}}, 400,
     "batch_size must be an integer or 'auto'"),
    ({"model": NAME, "training_file": "FILE", "suffix": "a:b"}, 400, "suffix must be"),
])
def test_bad_job_requests_get_the_openai_error(client, finished, body, status, message):
    _, upload = finished
    body = {k: upload.id if v == "FILE" else v for k, v in body.items()}
    with pytest.raises(openai.APIStatusError) as e:
        client.post("/fine_tuning/jobs", body=body, cast_to=object)
    assert e.value.status_code == status and message in e.value.body["message"], e.value.body


def test_unknown_jobs_and_models_are_404(client, finished):
    for call in (lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.cancel("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.list_events("ftjob-nope"),
                 lambda: client.chat.completions.create(model=f"ft:{NAME}:x:ftjob-nope", messages=MESSAGES)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_a_restart_resumes_the_running_job_and_serves_the_finished_one(client, finished, server, tiny_yaml, state):
    job, upload = finished
    before = client.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, **GREEDY)
    running = client.fine_tuning.jobs.create(model=NAME, training_file=upload.id, hyperparameters={"n_epochs": 500})
    _wait(client, running.id, ("running",))
    # 4 or more made, every 2 steps: the first retired. The job keeps training: the checkpoints are read again
    # after the models, until no checkpoint came between the two reads.
    served, kept = set(), None
    while kept != (kept := _newest_checkpoints(client, running.id, past_step=8)):
        served = {m.id for m in client.models.list().data}
    assert [c.step_number for c in kept] == [kept[0].step_number - 2 * i for i in range(3)]  # the newest 3
    assert {c.fine_tuned_model_checkpoint for c in kept} <= served
    assert f"ft:{NAME}::{running.id}:ckpt-step-2" not in served
    process, _, errors = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, "".join(errors)
    again, url, _ = launch_server(tiny_yaml, "--state-dir", str(state), *JOB_FLAGS)
    try:
        restarted = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        listed = {j.id: j for j in restarted.fine_tuning.jobs.list(limit=100).data}
        assert listed[job.id].status == "succeeded" and listed[job.id].fine_tuned_model == job.fine_tuned_model
        after = restarted.chat.completions.create(model=job.fine_tuned_model, messages=MESSAGES, **GREEDY)
        assert after.choices[0].message.content == before.choices[0].message.content
        resumed = _wait(restarted, running.id, ("running",))
        assert restarted.fine_tuning.jobs.pause(running.id).status == "paused"  # no checkpoint comes meanwhile
        exports = sorted(p.name for p in (state / "jobs" / running.id / "checkpoints").iterdir())
        kept = restarted.fine_tuning.jobs.checkpoints.list(running.id).data
        assert len(kept) == 3 and exports == sorted(f"step-{c.step_number}" for c in kept)  # the rest deleted
        messages = [e.message for e in restarted.fine_tuning.jobs.list_events(resumed.id, limit=1000).data]
        assert any(m.startswith("Server stopped: the job's state is saved at step") for m in messages)
        assert "Queued again after a server restart" in messages
        assert restarted.fine_tuning.jobs.cancel(running.id).status == "cancelled"
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0


def _written_bytes() -> int:
    """Bytes this process has written (write system calls), from /proc."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def test_a_job_writes_the_same_bytes_at_every_step_however_long_it_runs(tiny_yaml, tmp_path):
    # Its record is rewritten at each optimizer step and its events are appended: what a step writes must not grow
    # with the job's age (a record holding every event made it grow by one event a step).
    from harli_jax.server.finetuning import FineTuning

    engine = Engine(load_model(tiny_yaml), EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=32, max_loras=1,
                                                        compile_threads=2))
    jobs = FineTuning(tmp_path, engine, NAME, seq_len=64, checkpoint_steps=10_000)
    upload = jobs.files.upload("train.jsonl", _jsonl(_records(40)), "fine-tune")
    job = jobs.create({"model": NAME, "training_file": upload["id"],
                       "hyperparameters": {"n_epochs": 2, "batch_size": 1}})
    while jobs.get(job["id"]).status != "running":  # prepared on a thread of its own, then registered
        jobs.tick(engine)
        time.sleep(0.05)
    while engine.colocation.setting_up:  # its setup: one program per step
        engine.step()
    written = []
    for _ in range(40):
        before = _written_bytes()
        engine.step()  # nothing to serve: one micro-batch, one optimizer step
        jobs.tick(engine)  # records the step
        jobs.flush()  # its writes made
        written.append(_written_bytes() - before)
    jobs.cancel(job["id"])
    steps = [e for e in jobs.events(job["id"]) if e["type"] == "metrics"]
    numbers = [e["data"]["step"] for e in steps]  # newest first, every step (the setup's last step trained one)
    assert numbers == list(range(numbers[0], 0, -1)) and numbers[0] >= 40
    first, last = written[5:15], written[-10:]  # after the first steps' one-off writes
    assert max(written[5:]) < 1.5 * min(written[5:]), written
    assert sum(last) < 1.1 * sum(first), written
    record = json.loads((tmp_path / "jobs" / job["id"] / "job.json").read_text())
    assert "events" not in record and record["status"] == "cancelled"


def test_events_of_a_job_record_that_held_them_are_kept(tiny_yaml, tmp_path):
    # A state directory of an earlier version: the events were in job.json; they move to the events file.
    from harli_jax.server.finetuning import FineTuning

    engine = Engine(load_model(tiny_yaml), EngineConfig(max_batch=2, max_seq_len=128, prefill_chunk=32, max_loras=1))
    events = [{"id": f"ftevent-{i}", "object": "fine_tuning.job.event", "created_at": i, "level": "info",
               "message": f"event {i}", "data": {}, "type": "message"} for i in range(3)]
    old = {"id": "ftjob-old", "model": NAME, "training_file": "file-x", "validation_file": None, "n_epochs": 1,
           "batch_size": 1, "learning_rate_multiplier": 1.0, "suffix": None, "seed": 0, "created_at": 0,
           "status": "cancelled", "events": events, "checkpoints": []}
    (tmp_path / "jobs" / "ftjob-old").mkdir(parents=True)
    (tmp_path / "jobs" / "ftjob-old" / "job.json").write_text(json.dumps(old))
    jobs = FineTuning(tmp_path, engine, NAME)
    assert jobs.events("ftjob-old") == events[::-1] and jobs.retrieve("ftjob-old")["status"] == "cancelled"
    assert "events" not in json.loads((tmp_path / "jobs" / "ftjob-old" / "job.json").read_text())
    # A crash in the middle of an append leaves a torn line: it is skipped, and the next event is whole.
    upload = jobs.files.upload("train.jsonl", _jsonl(_records(4)), "fine-tune")
    job = jobs.create({"model": NAME, "training_file": upload["id"]})
    jobs.flush()  # its events written
    with (tmp_path / "jobs" / job["id"] / "events.jsonl").open("a") as f:
        f.write('{"id": "ftevent-torn", "obj')
    jobs.pause(job["id"])
    assert [e["message"] for e in jobs.events(job["id"])] == [
        "Fine-tuning job paused", "Validated the training file", f"Created fine-tuning job: {job['id']}"]


def test_a_server_killed_mid_job_resumes_it_from_its_last_checkpoint_to_the_same_adapter(tiny_yaml, tmp_path):
    # SIGKILL while the job trains (no shutdown checkpoint, no drain), with what a kill in the middle of a write
    # would leave, then a restart on the same state directory: the upload and the job are there (and nothing
    # half-written), the job resumes from its last complete checkpoint, trains to the end, and its adapter equals
    # that of the same job run without a kill (the same data order, the same programs).
    from harli_jax.lora import load_peft
    from harli_jax.model import ModelConfig
    from harli_jax.server.finetuning import FineTuning

    data = _jsonl(_records(12))
    hyper = {"n_epochs": 4, "batch_size": 2}  # 6 steps an epoch, 24 in all
    state = tmp_path / "state"
    with running_server(tiny_yaml, "--state-dir", str(state), *JOB_FLAGS) as (process, url, errors):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        upload = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=NAME, training_file=upload.id, seed=3, hyperparameters=hyper)
        newest = _newest_checkpoints(client, job.id, past_step=5)[0].step_number
        process.kill()  # SIGKILL: nothing more is written
        process.wait()
    # What a kill in the middle of a write leaves (each write goes through a temporary file, or appends): an upload
    # stored before its record, a temporary file of an upload and of the job's record, a torn event line, a
    # checkpoint's export half written and not recorded, an Orbax save not committed.
    files, directory = state / "files", state / "jobs" / job.id
    (files / "file-0123456789abcdef01234567.jsonl").write_bytes(data)
    (files / ".file-89abcdef0123456789abcdef.jsonl.x1y2z3").write_bytes(data[:100])
    (directory / ".job.json.a1b2c3").write_text('{"id": "ftjob-')
    with (directory / "events.jsonl").open("ab") as f:
        f.write(b'{"id": "ftevent-torn", "object": "fine_tuning.job.ev')
    half = directory / "checkpoints" / f"step-{newest + 1}"  # a step the job never exports again
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    uncommitted = directory / "state" / f"{newest + 2}.orbax-checkpoint-tmp-1796000000000000"
    uncommitted.mkdir(parents=True)
    (uncommitted / "junk").write_bytes(b"\x00" * 64)
    with running_server(tiny_yaml, "--state-dir", str(state), *JOB_FLAGS) as (process, url, errors):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [f.id for f in client.files.list().data] == [upload.id]
        done = _wait(client, job.id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", "".join(errors)
        events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data[::-1]  # oldest first
        served = {m.id for m in client.models.list().data}
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == sorted(
            f"step-{c.step_number}" for c in checkpoints)
        for checkpoint in checkpoints:  # each loads, each is served
            load_peft(directory / "checkpoints" / f"step-{checkpoint.step_number}", ModelConfig.from_yaml(tiny_yaml))
            assert checkpoint.fine_tuned_model_checkpoint in served
    assert sorted(p.name for p in files.iterdir()) == sorted([f"{upload.id}.jsonl", f"{upload.id}.json"])
    assert not list(directory.glob(".*"))
    messages = [e.message for e in events]
    restart = messages.index("Queued again after a server restart")
    before = [e.data["step"] for e in events[:restart] if e.type == "metrics"]
    after = [e.data["step"] for e in events[restart:] if e.type == "metrics" and "train_loss" in e.data]
    assert before[-1] >= 6 and after[0] <= before[-1] and after[-1] == 24  # redone from a checkpoint, to the end
    assert after == list(range(after[0], 25))

    engine = Engine(load_model(tiny_yaml), EngineConfig(max_batch=4, max_seq_len=128, prefill_chunk=32, max_loras=2,
                                                        policy="temporal-K", tpot_slo_ms=1000.0))
    reference = FineTuning(tmp_path / "reference", engine, NAME, seq_len=64, checkpoint_steps=2)
    same = reference.create({"model": NAME, "seed": 3, "hyperparameters": hyper, "training_file":
                             reference.files.upload("train.jsonl", data, "fine-tune")["id"]})
    while reference.retrieve(same["id"])["status"] not in ("succeeded", "failed", "cancelled"):
        engine.step()
        reference.tick(engine)
    assert reference.retrieve(same["id"])["status"] == "succeeded"
    cfg = ModelConfig.from_yaml(tiny_yaml)
    got = load_peft(state / "jobs" / job.id / "adapter", cfg)[1]
    want = load_peft(tmp_path / "reference" / "jobs" / same["id"] / "adapter", cfg)[1]
    assert set(got) == set(want)
    for target in want:
        for name in ("a", "b"):
            np.testing.assert_allclose(np.asarray(getattr(got[target], name)), np.asarray(getattr(want[target], name)),
                                       rtol=0, atol=1e-5, err_msg=f"{target}.{name}")


MAX_GAP_S = 1.0  # the longest gap between two tokens while a job starts under traffic (see its test)


def _engine_compiles(url) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        families = text_string_to_metric_families(response.read().decode())
        return next(s.value for f in families for s in f.samples if s.name == "harli:engine_thread_compiles_total")


def test_a_job_created_under_streaming_traffic_stalls_no_stream(tiny_yaml, tmp_path):
    # The job's data, state and programs are prepared on a thread of its own and its setup runs one program between
    # two steps: the streams decoding meanwhile never wait long, and the engine thread compiles nothing from the
    # first request on (harli fuses under this SLO: its fused step programs compile too). The bound is MAX_GAP_S:
    # on this 2-core CPU the preparing thread, the engine, the HTTP server and these clients share two cores, and
    # the longest gap measured 0.34-0.60 s over five runs (the 500 ms is not held reliably here); with the
    # job prepared on the engine thread it was 10.9 s.
    flags = ["--served-model-name", NAME, "--max-batch", "4", "--max-seq-len", "128", "--prefill-chunk", "32",
             "--finetune-seq-len", "64", "--checkpoint-steps", "2", "--max-loras", "2", "--tpot-slo", "100ms",
             "--compilation-cache", "off"]
    with running_server(tiny_yaml, "--state-dir", str(tmp_path), *flags) as (process, url, errors):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        before = _engine_compiles(url)
        stop, gaps = threading.Event(), []

        def stream(i):
            while not stop.is_set():
                times = [time.perf_counter() for _ in client.completions.create(
                    model=NAME, prompt=f"stream {i}", max_tokens=40, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})]
                gaps.extend(np.diff(times[1:]).tolist())  # between tokens (the first arrives after the prefill)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream, i) for i in range(4)]
            time.sleep(2.0)
            upload = client.files.create(file=("train.jsonl", _jsonl(_records(12))), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(model=NAME, training_file=upload.id,
                                                 hyperparameters={"n_epochs": 1, "batch_size": 2})
            _newest_checkpoints(client, job.id, past_step=1)  # prepared, set up, trained, a checkpoint served
            time.sleep(1.0)
            stop.set()
            for s in streams:
                s.result()
        assert len(gaps) > 200, "".join(errors)
        assert max(gaps) < MAX_GAP_S, f"longest gap between two tokens {max(gaps):.3f}s"
        assert _engine_compiles(url) == before, "".join(errors)
