"""`harli serve` in a subprocess, driven with the official `openai` client and raw HTTP: completions and chat, plain
and streamed, against `Engine.generate` on the same prompts; concurrent streams; the errors the OpenAI way; a
client that disconnects; the metrics; SIGTERM. The waiting-queue limit runs on an in-process `EngineLoop`."""

import asyncio
import http.client
import json
import signal
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import running_server
from harli_jax import Engine, EngineConfig, SamplingParams
from harli_jax.lora.data import chat_prompt_ids
from harli_jax.model import forward, load_model
from harli_jax.runtime.request import FinishedEvent, Request
from harli_jax.server.loop import EngineLoop, QueueFull

KEY = "test-key"
NAME = "tiny-test"
# A context long enough to disconnect from; no adapter slots (tests/server/test_finetuning.py serves adapters).
SIZES = ["--max-batch", "4", "--max-seq-len", "1024", "--prefill-chunk", "32", "--max-loras", "0"]
PROMPT = "the quick brown fox"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tiny_yaml):
    """The server process and its URL (the line it prints once /health answers)."""
    with running_server(tiny_yaml, "--api-key", KEY, "--served-model-name", NAME, "--drain-timeout", "5",
                        *SIZES) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(tiny_yaml):
    """An engine of the same weights and sizes as the server's (seed 0), in this process."""
    return Engine(load_model(tiny_yaml), EngineConfig(max_batch=4, max_seq_len=1024, prefill_chunk=32, max_logprobs=5))


def _raw(url, path, body=None, key=KEY, raw: bytes | None = None) -> tuple[int, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _metrics(url) -> dict:
    status, body = _raw(url, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_completions_plain_and_streamed_equal_the_engine(client, engine):
    want = engine.generate(PROMPT, SamplingParams(max_tokens=8, ignore_eos=True))[0]
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens == len(want.prompt_ids)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8  # the usage chunk comes last


def test_chat_plain_and_streamed_equal_the_engine(client, engine):
    prompt = chat_prompt_ids(MESSAGES, engine.tokenizer)
    want = engine.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True))[0]
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want.text
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None  # not asked for


def _reference_logprobs(engine, prompt_ids, token_ids, k):
    """Each generated token's log-probability and the top-k (id, logprob), from the dense forward's logits."""
    ids = jnp.asarray([list(prompt_ids) + list(token_ids)])
    logits = forward(engine.runner.params, engine.cfg, ids)[0, len(prompt_ids) - 1: -1]
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    top = np.argsort(-log_probs, axis=-1)[:, :k]
    return log_probs[np.arange(len(token_ids)), list(token_ids)], top, np.take_along_axis(log_probs, top, axis=-1)


def test_logprobs_match_the_dense_forward_in_the_engine_and_through_both_apis(client, engine):
    [output] = engine.generate(PROMPT, SamplingParams(max_tokens=6, ignore_eos=True, logprobs=3))
    want, top_ids, top = _reference_logprobs(engine, output.prompt_ids, output.token_ids, 3)
    np.testing.assert_allclose([lp.logprob for lp in output.logprobs], want, atol=2e-4)
    for lp, ids, values in zip(output.logprobs, top_ids, top, strict=True):
        assert [i for i, _ in lp.top] == ids.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], values, atol=2e-4)
    out = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    got = out.choices[0].logprobs
    np.testing.assert_allclose(got.token_logprobs, want, atol=2e-4)
    assert len(got.tokens) == 6 and got.text_offset[0] == 0
    # Keyed by token text (the legacy format): tokens of the same text share a key; greedy: the best is the token.
    assert all(1 <= len(t) <= 3 and max(t.values()) == pytest.approx(v) for t, v in zip(got.top_logprobs, want,
                                                                                         strict=True))
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    np.testing.assert_allclose([lp.token_logprobs[0] for lp in streamed], want, atol=2e-4)  # every token's chunk
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == c.logprob
                                     for c in content)  # greedy: the token is the most likely one
    with pytest.raises(openai.BadRequestError, match="exceeds this engine's max_logprobs"):
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, logprobs=50)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2, top_logprobs=2)


def test_a_stream_ends_with_done(server):
    status, body = _raw(server[1], "/v1/completions", {"model": NAME, "prompt": PROMPT, "max_tokens": 3,
                                                       "stream": True})
    events = [e for e in body.decode().split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_lists_the_base_model(client):
    (card,) = client.models.list().data
    assert card.id == NAME and card.object == "model"


def test_sixteen_concurrent_streams_all_complete(client):
    results: dict[int, tuple[str, int]] = {}

    def stream(i):
        chunks = list(client.completions.create(model=NAME, prompt=f"{i} {PROMPT}", max_tokens=5, temperature=0.8,
                                                seed=i, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        results[i] = (chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {i: ("length", 5) for i in range(16)}


SAMPLING = [dict(temperature=0.9, seed=7), dict(temperature=1.0, top_p=0.5, seed=3),
            dict(temperature=1.0, top_k=5, seed=11), dict(temperature=0.7, top_k=20, top_p=0.9, seed=5),
            dict(temperature=0.0, stop="STOP"), dict(temperature=0.0, ignore_eos=True, max_tokens=40),
            dict(temperature=0.8, seed=1, min_tokens=10, max_tokens=12)]


@pytest.mark.parametrize("params", SAMPLING, ids=[",".join(p) for p in SAMPLING])
def test_each_sampling_parameter_over_http_gives_the_engines_output(client, engine, params):
    params = dict(params)
    if params.get("stop") == "STOP":  # a stop string the greedy text holds: the text ends before it
        greedy = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0].text
        params["stop"] = greedy[4:6]
    params.setdefault("max_tokens", 12)
    want = engine.generate(PROMPT, SamplingParams(**{**params, "stop": (params["stop"],) if "stop" in params
                                                      else ()}))[0]
    body = {k: v for k, v in params.items() if k not in ("top_k", "ignore_eos", "min_tokens")}
    extra = {k: v for k, v in params.items() if k in ("top_k", "ignore_eos", "min_tokens")}
    out = client.completions.create(model=NAME, prompt=PROMPT, extra_body=extra, **body)
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == want.finish_reason.value and out.usage.completion_tokens == len(
        want.token_ids)
    if "stop" in params:
        assert out.choices[0].finish_reason == "stop" and params["stop"] not in want.text


BAD = [
    ({"model": NAME, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens must be a positive integer"),
    ({"model": NAME, "prompt": PROMPT, "temperature": -1}, 400, "temperature must be >= 0"),
    ({"model": NAME, "prompt": PROMPT, "n": 2}, 400, "n is not supported"),
    ({"model": NAME, "prompt": PROMPT, "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens (9) must not exceed"),
    ({"model": NAME, "prompt": "x" * 1100, "max_tokens": 4}, 400, "exceeds the context length 1024"),
    ({"model": NAME, "prompt": ""}, 400, "prompt must not be empty"),
    ({"model": NAME}, 400, "prompt: Field required"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model 'gpt-4' does not exist"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_requests_get_the_openai_error(server, body, status, message):
    got, raw = _raw(server[1], "/v1/completions", body)
    error = json.loads(raw)["error"]
    assert got == status and message in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_malformed_json_a_wrong_key_and_the_client_errors(server, client):
    status, raw = _raw(server[1], "/v1/chat/completions", raw=b'{"model": ')
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
    status, raw = _raw(server[1], "/v1/models", key="wrong")
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    status, raw = _raw(server[1], "/v1/chat/completions", {"model": NAME, "messages": [{"role": "bot",
                                                                                          "content": "hi"}]})
    assert status == 400 and "messages.0.role" in json.loads(raw)["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
        client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0)


def test_fine_tuning_routes_say_how_to_turn_them_on(client):
    with pytest.raises(openai.NotFoundError, match="start harli serve with --state-dir DIR"):
        client.fine_tuning.jobs.list()
    with pytest.raises(openai.NotFoundError, match="fine-tuning is off"):
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_aborts_its_request_and_frees_its_pages(server, stream):
    host, port = server[1].removeprefix("http://").split(":")
    before = _metrics(server[1]).get(("harli:request_success_total", (("finished_reason", "abort"),)), 0.0)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": PROMPT, "max_tokens": 1000,
                                                              "ignore_eos": True, "stream": stream}),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")  # it is running
    else:
        deadline = time.monotonic() + 30
        while _metrics(server[1])[("harli:num_requests_running", ())] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # until it runs
    connection.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = _metrics(server[1])
        aborted = m.get(("harli:request_success_total", (("finished_reason", "abort"),)), 0.0)
        if aborted == before + 1 and m[("harli:num_requests_running", ())] == 0:
            break
        time.sleep(0.1)
    assert aborted == before + 1, "the request was not aborted"
    assert m[("harli:arena_pages", (("owner", "kv"),))] == 0 and m[("harli:kv_cache_usage_perc", ())] == 0


def test_a_client_that_reads_its_stream_slowly_gets_every_token_and_delays_no_one(client):
    slow = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                     stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    first = next(slow)  # the request runs; its chunks queue up while this client sleeps
    started = time.perf_counter()
    fast = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    fast_done = time.perf_counter() - started
    chunks = [first]
    for chunk in slow:
        time.sleep(0.1)
        chunks.append(chunk)
    assert fast.usage.completion_tokens == 8
    assert chunks[-1].usage.completion_tokens == 24  # every token reached the slow reader
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert fast_done < 0.1 * len(chunks)  # served while the slow reader was still at its first chunks


def test_metrics_count_every_finished_request(server):
    m = _metrics(server[1])
    finished = sum(v for (name, _), v in m.items() if name == "harli:request_success_total")
    assert finished >= 2 + 2 + 1 + 16 + 1  # the requests of the tests above that reached the engine
    assert m[("harli:e2e_request_latency_seconds_count", ())] == finished
    assert m[("harli:time_to_first_token_seconds_count", ())] == finished
    assert m[("harli:generation_tokens_total", ())] >= 8 + 8 + 6 + 6 + 16 * 5
    assert 0 < m[("harli:request_queue_time_seconds_count", ())] <= finished  # an aborted waiting one has none
    assert m[("harli:step_duration_seconds_count", ())] >= 16 * 5 / 4  # 16 streams of 5 tokens, 4 per step
    assert m[("harli:slo_violations_total", ())] <= finished and m[("harli:finetune_micro_steps_total", ())] == 0


def test_sigterm_drains_and_exits_0(server):
    process, _, errors = server
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    time.sleep(0.2)  # the reader thread takes the last lines
    assert "harli serve: stopped" in "".join(errors)


def test_the_waiting_queue_is_bounded(engine):
    loop = EngineLoop(engine, max_waiting=1)  # batch 4 + 1 waiting
    loop.start()

    async def fill():
        long = SamplingParams(max_tokens=60, ignore_eos=True)
        streams = [loop.submit(Request(PROMPT, long, request_id=f"q{i}")) for i in range(5)]
        with pytest.raises(QueueFull, match="retry later"):
            loop.submit(Request(PROMPT, long, request_id="q5"))
        for s in streams:
            loop.abort(s.request_id)
        return [[e async for e in s.events()][-1] for s in streams]

    try:
        last = asyncio.run(fill())
    finally:
        loop.stop()
    assert all(isinstance(e, FinishedEvent) for e in last) and loop.in_flight() == 0


def test_a_drain_lets_the_requests_in_flight_finish_and_ends_the_rest_with_their_event(engine):
    # What SIGTERM does once the HTTP server has stopped (EngineLoop.stop): a request that finishes within the
    # drain time finishes; one that cannot is aborted; every stream ends with its FinishedEvent, none lost.
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # at most 100 steps a second: 900 tokens take 9 s
    loop = EngineLoop(engine)
    loop.start()

    async def drain():
        streams = [loop.submit(Request(PROMPT, SamplingParams(max_tokens=n, ignore_eos=True), request_id=f"d{i}"))
                   for i, n in enumerate((5, 5, 900, 900))]
        stopping = threading.Thread(target=loop.stop, kwargs={"drain_s": 1.0})
        stopping.start()
        ends = [[e async for e in s.events()][-1] for s in streams]
        await asyncio.to_thread(stopping.join, 60)
        return ends

    started = time.monotonic()
    try:
        ends = asyncio.run(drain())
    finally:
        engine.step = step
    took = time.monotonic() - started
    assert all(isinstance(e, FinishedEvent) for e in ends)
    outputs = [e.output for e in ends]
    assert [o.finish_reason.value for o in outputs] == ["length", "length", "aborted", "aborted"]
    assert [len(o.token_ids) for o in outputs[:2]] == [5, 5] and all(len(o.token_ids) < 900 for o in outputs[2:])
    assert 1.0 <= took < 9.0 and loop.in_flight() == 0 and not engine.has_unfinished()


def test_a_request_not_admitted_within_the_queue_timeout_gets_429_plain_or_streamed(tiny_yaml):
    from fastapi.testclient import TestClient

    from harli_jax.server.app import ServerMetrics, create_app

    # One sequence per step: while a long request runs, every other one waits, and 0.3 s later is refused.
    engine = Engine(load_model(tiny_yaml), EngineConfig(max_batch=1, max_seq_len=512, prefill_chunk=32,
                                                        max_loras=0, queue_timeout_s=0.3))
    # The tiny model decodes 400 tokens in about 0.4 s here, a race with the HTTP requests behind it: a device
    # 5 ms slower per step keeps the long request running for 2 s, well past the others' timeout.
    step = engine.step
    engine.step = lambda: (time.sleep(0.005), step())[1]
    metrics = ServerMetrics()
    loop = EngineLoop(engine, on_finished=metrics.finished)
    loop.start()
    try:
        with TestClient(create_app(loop, NAME, metrics)) as http:
            body = {"model": NAME, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
            long = threading.Thread(target=lambda: results.append(http.post("/v1/completions", json=body)))
            results = []
            long.start()
            while not engine.has_unfinished():
                time.sleep(0.01)
            short = {"model": NAME, "prompt": PROMPT, "max_tokens": 4}
            plain = http.post("/v1/completions", json=short)
            streamed = http.post("/v1/chat/completions", json={"model": NAME, "messages": MESSAGES, "max_tokens": 4,
                                                                "stream": True})
            long.join(timeout=120)
    finally:
        loop.stop()
    for response in (plain, streamed):
        assert response.status_code == 429
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and "queue timeout of 0.3 s" in error["message"]
    [done] = results
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 400
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    assert families["harli:requests_refused"].samples[0].value == 2


# Each engine flag of `harli serve`: (flag, the field, a value for the file, the flag's text, its parsed value).
FILE_AND_FLAG = [
    ("--max-batch", "max_batch", 4, "6", 6), ("--max-seq-len", "max_seq_len", 96, "128", 128),
    ("--prefill-chunk", "prefill_chunk", 16, "32", 32), ("--queue-timeout", "queue_timeout_s", 2.5, "1", 1.0),
    ("--admission", "admission", False, None, True), ("--dtype", "dtype", "bfloat16", "float16", "float16"),
    ("--max-loras", "max_loras", 2, "3", 3), ("--max-cpu-loras", "max_cpu_loras", 12, "16", 16),
    ("--max-lora-rank", "max_lora_rank", 8, "4", 4),
    ("--max-logprobs", "max_logprobs", 5, "0", None), ("--policy", "policy", "decode-only", "cobatch", "cobatch"),
    ("--tp", "tensor_parallel", 2, "1", 1), ("--compilation-cache", "compile_cache_dir", "/cache", "off", "off"),
]


@pytest.mark.parametrize("flag, field, in_file, text, parsed", FILE_AND_FLAG, ids=[f[0] for f in FILE_AND_FLAG])
def test_an_engine_flag_overrides_the_engine_config_file_only_when_given(tmp_path, tiny_yaml, flag, field, in_file,
                                                                         text, parsed):
    import yaml

    from harli_jax.runtime.config import GROUPS
    from harli_jax.server.main import ENGINE_FLAGS, SERVER_DEFAULTS, build_parser, engine_config

    assert {f[0] for f in FILE_AND_FLAG} == {f[0] for f in ENGINE_FLAGS}  # every engine flag is checked here
    group = {cls: name for name, cls in GROUPS.items()}[{f[0]: f[1] for f in ENGINE_FLAGS}[flag]]
    path = tmp_path / "engine.yaml"
    path.write_text(yaml.safe_dump({field: in_file}))

    def value(*flags: str):
        config = engine_config(build_parser().parse_args(["--model", str(tiny_yaml), *flags]))
        return getattr(getattr(config, group), field)

    default = SERVER_DEFAULTS.get(field, getattr(getattr(EngineConfig(), group), field))
    assert value() == default != in_file  # no file, no flag: the server's default
    assert value("--engine-config", str(path)) == in_file  # the file's value, not the flag's default
    given = [flag] if text is None else [flag, text]
    assert value("--engine-config", str(path), *given) == value(*given) == parsed  # the flag, where given


def test_the_tpot_slo_comes_from_the_engine_config_file_unless_the_flag_sets_it(tmp_path, tiny_yaml):
    from harli_jax.server.main import build_parser, engine_config, tpot_slo

    path = tmp_path / "engine.yaml"
    path.write_text("colocation:\n  tpot_slo_ms: 50\n")

    def slo(*flags: str) -> str:
        args = build_parser().parse_args(["--model", str(tiny_yaml), *flags])
        return tpot_slo(args, engine_config(args))

    assert slo() == "4x"
    assert slo("--engine-config", str(path)) == "50ms"
    assert slo("--engine-config", str(path), "--tpot-slo", "3x") == slo("--tpot-slo", "3x") == "3x"


def test_metrics_speak_the_inference_gateways_protocol(tiny_yaml, tmp_path):
    # What the Gateway API Inference Extension's endpoint picker reads from a replica, under vLLM's names and labels
    # (GAIE's model server protocol): queue length, KV-cache usage and its size, the resident LoRA adapters and
    # those the waiting requests ask for.
    from fastapi.testclient import TestClient

    from harli_jax import LoRAConfig
    from harli_jax.lora.adapters import export_peft, init_lora
    from harli_jax.model.params import LoRAPair
    from harli_jax.server.app import ServerMetrics, create_app

    model = load_model(tiny_yaml)
    engine = Engine(model, EngineConfig(max_batch=2, max_seq_len=512, prefill_chunk=32, max_loras=2, max_lora_rank=4))
    lora = LoRAConfig(rank=4, alpha=8, targets=("q_proj",))
    for i, name in enumerate(("a", "b", "c")):
        weights = {k: LoRAPair(p.a, 0.1 * jax.random.normal(jax.random.key(i), p.b.shape), p.scale)
                   for k, p in init_lora(model.cfg, lora).items()}
        export_peft(weights, lora, model.cfg, tmp_path / name)
        engine.add_adapter(name, tmp_path / name)
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())[1]  # 300 tokens take 3 s or more: time to read the metrics
    metrics = ServerMetrics(model_name=NAME, max_loras=2)
    loop = EngineLoop(engine, on_finished=metrics.finished, on_snapshot=metrics.observe)
    loop.start()

    def gateway_metrics(http) -> dict:
        families = text_string_to_metric_families(http.get("/metrics").text)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
                if s.name.startswith("vllm:")}

    model_label = (("model_name", NAME),)
    try:
        with TestClient(create_app(loop, NAME, metrics)) as http:
            done = []
            posts = [threading.Thread(target=lambda m=m: done.append(http.post("/v1/completions", json={
                "model": m, "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True}))) for m in ("a", "b", "c")]
            for post in posts[:2]:
                post.start()
            deadline = time.monotonic() + 60
            while gateway_metrics(http)[("vllm:num_requests_running", model_label)] < 2:
                assert time.monotonic() < deadline, "the requests did not start"
                time.sleep(0.01)
            posts[2].start()  # the batch is full: it waits
            while (m := gateway_metrics(http))[("vllm:num_requests_waiting", model_label)] < 1:
                assert time.monotonic() < deadline, "the third request did not wait"
                time.sleep(0.01)
            running = dict(m)
            for post in posts:
                post.join(timeout=120)
            after = gateway_metrics(http)
    finally:
        loop.stop()
    assert [r.status_code for r in done] == [200, 200, 200]
    assert running[("vllm:num_requests_running", model_label)] == 2
    assert 0 < running[("vllm:kv_cache_usage_perc", model_label)] < 1
    [(labels, stamp)] = [(dict(k[1]), v) for k, v in running.items() if k[0] == "vllm:lora_requests_info"]
    assert labels == {"running_lora_adapters": "a,b", "waiting_lora_adapters": "c", "max_lora": "2"}
    assert abs(stamp - time.time()) < 60  # the time of its latest update
    assert after[("vllm:num_requests_running", model_label)] == after[("vllm:num_requests_waiting", model_label)] == 0
    assert after[("vllm:kv_cache_usage_perc", model_label)] == 0
    [labels] = [dict(k[1]) for k in after if k[0] == "vllm:lora_requests_info"]  # one series: the latest
    resident = labels.pop("running_lora_adapters").split(",")  # c took the slot of a or b
    assert len(resident) == 2 and "c" in resident and set(resident) <= {"a", "b", "c"}
    assert labels == {"waiting_lora_adapters": "", "max_lora": "2"}
    assert after[("vllm:cache_config_info", (("block_size", str(engine.arena.layout.page_tokens)),
                                              ("num_gpu_blocks", str(engine.arena.table.capacity))))] == 1
