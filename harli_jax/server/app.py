"""The OpenAI-compatible HTTP API over an `EngineLoop` (FastAPI): `/v1/completions`, `/v1/chat/completions`
(each plain or streamed as server-sent events ending with `data: [DONE]`; a request's `model` is the base model or
one of its adapters), `/v1/models`, `/health`, `/metrics` (Prometheus, vLLM's metric names under a `harli:`
prefix, and what an inference gateway routes by under vLLM's own names: `vllm:num_requests_running|waiting`,
`vllm:kv_cache_usage_perc`, `vllm:lora_requests_info`, `vllm:cache_config_info`), and fine-tuning: `/v1/files`
and `/v1/fine_tuning/jobs` (harli_jax.server.finetuning).

Errors come back the OpenAI way, `{"error": {"message", "type", "param", "code"}}`: 400 for a bad parameter,
malformed JSON, a prompt over the context or bad fine-tuning data, 401 for a wrong API key, 404 for an unknown
model, job or file, 429 when the server already holds `max batch + max waiting` requests or the engine did not
admit a request within its queue timeout (admission control keeps the TPOT SLO of the requests it runs), 503 when
the engine is down. A client that disconnects
(streaming or not) aborts its request, which frees its pages.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from harli_jax.lora.data import DataError, chat_prompt_ids
from harli_jax.runtime.processing import RequestError
from harli_jax.runtime.request import Event, FinishedEvent, FinishReason, GenerationOutput, SamplingParams
from harli_jax.runtime.request import Request as EngineRequest
from harli_jax.server import protocol
from harli_jax.server.finetuning import FineTuning
from harli_jax.server.loop import ENGINE_THREAD, EngineLoop, EngineStopped, QueueFull, Snapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   20.0, 40.0, 80.0)


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of their own: request histograms and counters from finished
    outputs (`finished`), gauges from the engine thread's snapshots (`observe`)."""

    def __init__(self, tpot_slo_s: float | None = None, model_name: str = "", max_loras: int = 0):
        self.tpot_slo_s, self.max_loras = tpot_slo_s, max_loras
        self.registry = registry = CollectorRegistry()
        self.ttft = Histogram("harli:time_to_first_token_seconds", "Time to first token", registry=registry,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("harli:inter_token_latency_seconds", "Time between two tokens of a request",
                             registry=registry, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram("harli:e2e_request_latency_seconds", "Arrival to last token", registry=registry,
                             buckets=LATENCY_BUCKETS)
        self.queue = Histogram("harli:request_queue_time_seconds", "Arrival to first admission to the batch",
                               registry=registry, buckets=LATENCY_BUCKETS)
        self.slo_violations = Counter("harli:slo_violations", "Finished requests whose TPOT exceeded the SLO",
                                      registry=registry)
        self.step_time = Histogram("harli:step_duration_seconds", "Inference step wall time (a fused one with its "
                                   "finetune work)", registry=registry, buckets=LATENCY_BUCKETS)
        self.window_predicted = Histogram("harli:train_window_predicted_seconds", "Predicted bound of each "
                                          "training window", registry=registry, buckets=LATENCY_BUCKETS)
        self.window_observed = Histogram("harli:train_window_seconds", "Observed time of each training window",
                                         registry=registry, buckets=LATENCY_BUCKETS)
        self.micro_steps = Counter("harli:finetune_micro_steps", "Training micro-steps run between steps",
                                   registry=registry)
        self.fused_steps = Counter("harli:finetune_fused_steps", "Inference steps with finetune work fused in",
                                   registry=registry)
        self.prompt_tokens = Counter("harli:prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("harli:generation_tokens", "Generated tokens of finished requests",
                                         registry=registry)
        self.success = Counter("harli:request_success", "Finished requests by finish reason", ["finished_reason"],
                               registry=registry)
        self.engine_compiles = Counter("harli:engine_thread_compiles", "XLA compiles on the engine thread (every "
                                       "stream waits through each; none is expected after warm-up)", registry=registry)
        self.refused = Counter("harli:requests_refused", "Requests refused with a 429: over max waiting, or not "
                               "admitted within the queue timeout", registry=registry)
        self.gauges = {
            "running": Gauge("harli:num_requests_running", "Requests in the engine's batch", registry=registry),
            "waiting": Gauge("harli:num_requests_waiting", "Requests waiting for the batch", registry=registry),
            "kv_usage": Gauge("harli:kv_cache_usage_perc", "Share of the arena's pages holding K/V",
                              registry=registry),
            "trained_tokens": Gauge("harli:finetune_trained_tokens", "Tokens the finetune job has trained",
                                    registry=registry)}
        self.pages = Gauge("harli:arena_pages", "Arena pages by owner", ["owner"], registry=registry)
        # What an inference gateway routes replicas by (the Gateway API Inference Extension's endpoint picker),
        # under vLLM's names and labels.
        self.gateway = {
            name: Gauge(metric, text, ["model_name"], registry=registry).labels(model_name)
            for name, metric, text in (
                ("running", "vllm:num_requests_running", "Requests in the engine's batch"),
                ("waiting", "vllm:num_requests_waiting", "Requests waiting for the batch"),
                ("kv_usage", "vllm:kv_cache_usage_perc", "KV-cache usage: the share of the arena's pages holding "
                                                         "K/V, 1 meaning all"))}
        self.lora_info = None if not max_loras else Gauge(
            "vllm:lora_requests_info", "The LoRA adapters resident (loaded, ready to serve) and those the waiting "
            "requests ask for (names, comma-separated), and the most resident at once; the value is the time of "
            "the latest update", ["running_lora_adapters", "waiting_lora_adapters", "max_lora"], registry=registry)
        self._lora_labels: tuple[str, str, str] | None = None
        self.cache_info = Gauge("vllm:cache_config_info", "The KV cache: tokens per page (block_size) and pages "
                                "(num_gpu_blocks)", ["block_size", "num_gpu_blocks"], registry=registry)
        self.observe(Snapshot())

    def compiled(self, event: str, *_, **__) -> None:
        """A JAX monitoring event (a listener of `jax.monitoring`): counts the XLA compiles of the engine thread."""
        if event.endswith("backend_compile_duration") and threading.current_thread().name == ENGINE_THREAD:
            self.engine_compiles.inc()

    def observe(self, snapshot: Snapshot) -> None:
        for name, gauge in self.gauges.items():
            gauge.set(getattr(snapshot, name))
        for owner in ("kv", "lease", "free"):
            self.pages.labels(owner).set(getattr(snapshot, f"{owner}_pages"))
        for name, gauge in self.gateway.items():
            gauge.set(getattr(snapshot, name))
        if snapshot.page_tokens and not self.cache_info.collect()[0].samples:
            self.cache_info.labels(str(snapshot.page_tokens), str(snapshot.capacity_pages)).set(1)
        if self.lora_info is not None:
            labels = (",".join(snapshot.resident_adapters), ",".join(snapshot.waiting_adapters), str(self.max_loras))
            if labels != self._lora_labels:  # one series: the latest adapters
                self.lora_info.clear()
                self._lora_labels = labels
            self.lora_info.labels(*labels).set_to_current_time()
        step = snapshot.step
        if step is None:
            return
        self.step_time.observe(step.end - step.start)
        self.micro_steps.inc(len(step.train))
        if step.fused:
            self.fused_steps.inc()
        if step.predicted is not None:
            self.window_predicted.observe(step.predicted)
            self.window_observed.observe(step.train_time)

    def finished(self, output: GenerationOutput) -> None:
        if output.finish_reason is FinishReason.REFUSED:
            self.refused.inc()
            return
        self.success.labels(protocol.finish_reason(output.finish_reason)).inc()
        self.prompt_tokens.inc(len(output.prompt_ids))
        self.generation_tokens.inc(len(output.token_ids))
        if output.first_token_time is not None:
            self.ttft.observe(output.first_token_time - output.arrival_time)
        for a, b in zip(output.token_times, output.token_times[1:], strict=False):
            self.itl.observe(b - a)
        if output.token_times:
            self.e2e.observe(output.token_times[-1] - output.arrival_time)
        if output.queue_time is not None:
            self.queue.observe(output.queue_time)
        if self.tpot_slo_s is not None and output.tpot is not None and output.tpot > self.tpot_slo_s:
            self.slo_violations.inc()


def create_app(loop: EngineLoop, model_name: str, metrics: ServerMetrics, *, fine_tuning: FineTuning | None = None,
               api_key: str | None = None, default_max_tokens: int = 16) -> FastAPI:
    """The API serving `loop`'s engine under the name `model_name` (its adapters under theirs), with the
    fine-tuning routes when `fine_tuning` is given."""

    async def authenticate(request: Request) -> None:
        """Every /v1/ route needs the key (a dependency, not an HTTP middleware: Starlette's middleware would hide
        a client's disconnect from the routes)."""
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                raise protocol.ApiError(401, "invalid API key: send 'Authorization: Bearer <key>'",
                                        type="authentication_error", code="invalid_api_key")

    app = FastAPI(title="harli_jax", version="0.1.0", dependencies=[Depends(authenticate)])
    created = protocol.now()
    engine = loop.engine

    @app.exception_handler(protocol.ApiError)
    async def api_error(_: Request, e: protocol.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON ({first.get('msg')})"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(protocol.ApiError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(protocol.ApiError(e.status_code, str(e.detail), type=kind).body(),
                            status_code=e.status_code)

    @app.get("/health")
    async def health() -> Response:
        if not loop.alive:
            return JSONResponse(protocol.ApiError(503, "the engine is not running", type="server_error").body(),
                                status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        cards = [protocol.model_card(model_name, None, created)]
        cards += [protocol.model_card(name, model_name, created) for name in engine.adapters.names()]
        return {"object": "list", "data": cards}

    def token_text(token: int) -> str:
        """A token's own text (its id as text without a tokenizer)."""
        if engine.tokenizer is None:
            return str(token)
        return engine.tokenizer.decode([token], skip_special_tokens=False)

    def adapter_of(name: str) -> str | None:
        """The adapter a request's `model` names (None: the base model); a 404 for a model not served here."""
        if name == model_name:
            return None
        if engine.adapters.get(name) is None:
            raise protocol.ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r} and its "
                                         f"adapters (GET /v1/models lists them)",
                                    type="not_found_error", param="model", code="model_not_found")
        return name

    def start(prompt: str | list[int], sampling: SamplingParams, request_id: str, adapter: str | None):
        try:
            return loop.submit(EngineRequest(prompt, sampling, request_id=request_id, adapter=adapter))
        except RequestError as e:
            raise protocol.ApiError(400, str(e), param="prompt") from None
        except QueueFull as e:
            metrics.refused.inc()
            raise protocol.ApiError(429, str(e), type="rate_limit_error") from None
        except EngineStopped as e:
            raise protocol.ApiError(503, str(e), type="server_error") from None

    async def watch(stream, client: Request) -> None:
        """Aborts the request once its client disconnects (its pages are freed)."""
        while not await client.is_disconnected():
            await asyncio.sleep(0.25)
        loop.abort(stream.request_id)

    def refused(output: GenerationOutput) -> None:
        """A 429 for a request the engine never admitted within its queue timeout."""
        if output.finish_reason is FinishReason.REFUSED:
            raise protocol.ApiError(429, output.error or "not admitted: the server is overloaded",
                                    type="rate_limit_error")

    async def finish(stream, client: Request) -> GenerationOutput:
        """The request's output; a client that disconnects first aborts it."""
        watcher = asyncio.create_task(watch(stream, client))
        try:
            async for event in stream.events():
                if isinstance(event, FinishedEvent):
                    refused(event.output)
                    return event.output
        except EngineStopped as e:
            raise protocol.ApiError(503, str(e), type="server_error") from None
        finally:
            watcher.cancel()
            loop.abort(stream.request_id)  # a no-op once finished; a cancelled request ends here
        raise protocol.ApiError(503, "the request ended without an output", type="server_error")

    async def opened(stream, client: Request) -> AsyncIterator[Event]:
        """The request's events once the first has come, so that a refusal is still a 429 and not a stream."""
        events = stream.events()
        watcher = asyncio.create_task(watch(stream, client))
        try:
            first = await anext(events)
        except EngineStopped as e:
            raise protocol.ApiError(503, str(e), type="server_error") from None
        except StopAsyncIteration:
            raise protocol.ApiError(503, "the request ended without an output", type="server_error") from None
        except BaseException:  # cancelled (the client left) or failed before its first event: it ends here
            loop.abort(stream.request_id)
            raise
        finally:
            watcher.cancel()
        if isinstance(first, FinishedEvent):
            refused(first.output)

        async def chained() -> AsyncIterator[Event]:
            yield first
            async for event in events:
                yield event

        return chained()

    async def sse(stream, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except EngineStopped as e:
            error = protocol.ApiError(503, str(e), type="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            loop.abort(stream.request_id)  # a client gone mid-stream: the request stops, its pages are freed

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, client: Request):
        adapter = adapter_of(body.model)
        sampling = body.sampling(default_max_tokens)
        request_id = protocol.new_id("cmpl")
        stream = start(body.prompt_input(), sampling, request_id, adapter)
        if not body.stream:
            output = await finish(stream, client)
            return protocol.completion(request_id, body.model, output, protocol.now(), token_text)
        events = await opened(stream, client)

        async def chunks() -> AsyncIterator[dict]:
            stamp, offset = protocol.now(), 0
            async for event in events:
                if isinstance(event, FinishedEvent):
                    yield protocol.completion_chunk(request_id, body.model, stamp, "",
                                                    protocol.finish_reason(event.output.finish_reason))
                    if body.include_usage:
                        yield protocol.usage_chunk(request_id, body.model, stamp, event.output, chat=False)
                elif event.logprob is not None:  # every token's chunk, even one that adds no text yet
                    logprobs = protocol.completion_logprobs([event.token], [event.logprob], token_text, offset)
                    yield protocol.completion_chunk(request_id, body.model, stamp, event.text or "", None, logprobs)
                    offset += len(event.text or "")
                elif event.text:
                    yield protocol.completion_chunk(request_id, body.model, stamp, event.text)
                    offset += len(event.text)

        return StreamingResponse(sse(stream, chunks()), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(body: protocol.ChatRequest, client: Request):
        adapter = adapter_of(body.model)
        sampling = body.sampling(default_max_tokens)
        if engine.tokenizer is None:
            raise protocol.ApiError(400, "this model has no tokenizer: chat needs one (send token ids to "
                                         "/v1/completions)", param="messages")
        try:
            prompt = chat_prompt_ids([m.model_dump() for m in body.messages], engine.tokenizer)
        except DataError as e:
            raise protocol.ApiError(400, str(e), param="messages") from None
        request_id = protocol.new_id("chatcmpl")
        stream = start(prompt, sampling, request_id, adapter)
        if not body.stream:
            output = await finish(stream, client)
            return protocol.chat_completion(request_id, body.model, output, protocol.now(), token_text)
        events = await opened(stream, client)

        async def chunks() -> AsyncIterator[dict]:
            stamp = protocol.now()
            yield protocol.chat_chunk(request_id, body.model, stamp, {"role": "assistant", "content": ""})
            async for event in events:
                if isinstance(event, FinishedEvent):
                    yield protocol.chat_chunk(request_id, body.model, stamp, {},
                                              protocol.finish_reason(event.output.finish_reason))
                    if body.include_usage:
                        yield protocol.usage_chunk(request_id, body.model, stamp, event.output, chat=True)
                elif event.logprob is not None:
                    logprobs = protocol.chat_logprobs([event.token], [event.logprob], token_text)
                    yield protocol.chat_chunk(request_id, body.model, stamp, {"content": event.text or ""}, None,
                                              logprobs)
                elif event.text:
                    yield protocol.chat_chunk(request_id, body.model, stamp, {"content": event.text})

        return StreamingResponse(sse(stream, chunks()), media_type="text/event-stream")

    if fine_tuning is not None:
        add_fine_tuning_routes(app, loop, fine_tuning)
    else:
        @app.api_route("/v1/files{rest:path}", methods=["GET", "POST", "DELETE"])
        @app.api_route("/v1/fine_tuning{rest:path}", methods=["GET", "POST", "DELETE"])
        async def fine_tuning_off(rest: str) -> None:
            raise protocol.ApiError(404, "fine-tuning is off on this server: start harli serve with --state-dir DIR",
                                    type="not_found_error", code="fine_tuning_disabled")
    return app


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """The OpenAI API's list page: the items after the one with id `after`, at most `limit` of them."""
    if limit < 1:
        raise protocol.ApiError(400, f"limit must be >= 1, got {limit}", param="limit")
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    data = items[start: start + limit]
    return {"object": "list", "data": data, "has_more": start + limit < len(items)}


def add_fine_tuning_routes(app: FastAPI, loop: EngineLoop, jobs: FineTuning) -> None:
    """`/v1/files` and `/v1/fine_tuning/jobs` (create, list, retrieve, cancel, pause, resume, events,
    checkpoints) over `jobs`; changes to a job run on the engine thread, and the rest on worker threads (they wait
    for the records' lock and read files: the event loop that streams every request's tokens never does)."""

    async def on_engine(fn):
        try:
            return await asyncio.wrap_future(loop.call(fn))
        except EngineStopped as e:
            raise protocol.ApiError(503, str(e), type="server_error") from None

    @app.post("/v1/files")
    async def upload(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> dict:
        content = await file.read()
        return await asyncio.to_thread(jobs.files.upload, file.filename or "upload.jsonl", content, purpose)

    @app.get("/v1/files")
    async def files() -> dict:
        return {"object": "list", "data": await asyncio.to_thread(jobs.files.list), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def file(file_id: str) -> dict:
        return await asyncio.to_thread(jobs.files.get, file_id)

    @app.post("/v1/fine_tuning/jobs")
    async def create(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError as e:
            raise protocol.ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise protocol.ApiError(400, "the body must be a JSON object")
        return await asyncio.to_thread(jobs.create, body)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: int = 20) -> dict:
        return _page(await asyncio.to_thread(jobs.list), after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(job_id: str) -> dict:
        return await asyncio.to_thread(jobs.retrieve, job_id)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> dict:
        await asyncio.to_thread(jobs.get, job_id)
        return await on_engine(lambda: jobs.cancel(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    async def pause(job_id: str) -> dict:
        await asyncio.to_thread(jobs.get, job_id)
        return await on_engine(lambda: jobs.pause(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    async def resume(job_id: str) -> dict:
        await asyncio.to_thread(jobs.get, job_id)
        return await on_engine(lambda: jobs.resume(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, after: str | None = None, limit: int = 20) -> dict:
        return _page(await asyncio.to_thread(jobs.events, job_id), after, limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(job_id: str, after: str | None = None, limit: int = 10) -> dict:
        return _page(await asyncio.to_thread(jobs.checkpoints, job_id), after, limit)
