"""The OpenAI API's request bodies (as vLLM and SGLang accept them) and the responses built from engine outputs.

Requests: `/v1/completions` and `/v1/chat/completions` with `max_tokens`, `temperature`, `top_p`, `top_k`,
`stop`, `seed`, `stream` and `stream_options.include_usage`, `logprobs` (completions: the number of top logprobs;
chat: a bool, with `top_logprobs`), plus vLLM's `ignore_eos` and `min_tokens`. Fields this server does not
implement (`n` > 1, `echo`, ...) are refused with a 400 naming them, rather than
ignored; fields it does not know are ignored, as vLLM does. Chat messages are rendered by the tokenizer's chat
template, else in the plain chat format of harli_jax.lora.data (either way as fine-tuning data is trained).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from harli_jax.runtime.request import FinishReason, GenerationOutput, SamplingParams, TokenLogprob

OPENAI_DEFAULT_TEMPERATURE = 1.0  # the API's default (the engine's own default is greedy)


class ApiError(Exception):
    """An error the API returns as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    n: int = 1
    logprobs: Any = None
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams; an ApiError for what this server does not implement."""
        unsupported = {"n": self.n != 1, "presence_penalty": self.presence_penalty != 0,
                       "frequency_penalty": self.frequency_penalty != 0, "logit_bias": bool(self.logit_bias)}
        for name, given in unsupported.items():
            if given:
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top_k = self.top_k if self.top_k is not None else 0
        if top_k == -1:  # vLLM's spelling of "all tokens"
            top_k = 0
        seed = self.seed if self.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
        temperature = self.temperature if self.temperature is not None else OPENAI_DEFAULT_TEMPERATURE
        max_tokens = self.requested_max_tokens
        params = SamplingParams(max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                                temperature=temperature, top_k=top_k,
                                top_p=self.top_p if self.top_p is not None else 1.0, seed=seed, stop=stop,
                                ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                                logprobs=self.requested_logprobs)
        problems = params.problems()
        if problems:
            raise ApiError(400, "; ".join(problems), param=problems[0].split()[0])
        return params

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def requested_logprobs(self) -> int | None:
        """The top logprobs asked for per token (0: only the token's own), None for none."""
        if self.top_logprobs is not None:
            raise ApiError(400, "top_logprobs is a chat completions field; completions take logprobs: N",
                           param="top_logprobs")
        if self.logprobs is None:
            return None
        if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or self.logprobs < 0:
            raise ApiError(400, f"logprobs must be a non-negative integer, got {self.logprobs!r}", param="logprobs")
        return self.logprobs

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompt_input(self) -> str | list[int]:
        """The one prompt: text or token ids."""
        for name, given in {"echo": self.echo, "suffix": self.suffix is not None,
                            "best_of": self.best_of not in (None, 1)}.items():
            if given:
                raise ApiError(400, f"{name} is not supported by this server", param=name)
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request: a list of several prompts is not supported",
                               param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_tokens`, else the newer name `max_completion_tokens`."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    @property
    def requested_logprobs(self) -> int | None:
        if self.logprobs not in (None, True, False):
            raise ApiError(400, f"logprobs must be true or false, got {self.logprobs!r}", param="logprobs")
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        if self.top_logprobs is not None and (isinstance(self.top_logprobs, bool) or self.top_logprobs < 0):
            raise ApiError(400, f"top_logprobs must be a non-negative integer, got {self.top_logprobs!r}",
                           param="top_logprobs")
        return self.top_logprobs or 0


# Responses -------------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finish_reason(reason: FinishReason) -> str:
    """The API's finish_reason: "stop" or "length" ("abort" for an aborted request, as vLLM says)."""
    return {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}.get(reason, "abort")


def usage(output: GenerationOutput) -> dict[str, int]:
    prompt, completion = len(output.prompt_ids), len(output.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


TokenText = Callable[[int], str]  # a token id's own text


def completion_logprobs(tokens: Sequence[int], logprobs: Sequence[TokenLogprob | None], text: TokenText,
                        offset: int = 0) -> dict[str, Any]:
    """The completions API's `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    strings = [text(t) for t in tokens]
    offsets = list(itertools.accumulate((len(s) for s in strings[:-1]), initial=offset))
    return {"tokens": strings, "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
            "top_logprobs": [None if lp is None else _by_text(lp.top, text) for lp in logprobs],
            "text_offset": offsets}


def _by_text(top: Sequence[tuple[int, float]], text: TokenText) -> dict[str, float]:
    """Top (id, logprob) pairs keyed by token text; tokens of the same text keep the best one's logprob."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(text(token), value)
    return out


def chat_logprobs(tokens: Sequence[int], logprobs: Sequence[TokenLogprob | None], text: TokenText
                  ) -> dict[str, Any]:
    """The chat API's `logprobs` object: per token its text, logprob, UTF-8 bytes and top alternatives."""
    def entry(token: int, value: float) -> dict[str, Any]:
        s = text(token)
        return {"token": s, "logprob": value, "bytes": list(s.encode())}

    return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for t, lp in zip(tokens, logprobs, strict=True) if lp is not None]}


def completion(request_id: str, model: str, output: GenerationOutput, created: int,
               text: TokenText) -> dict[str, Any]:
    logprobs = None if output.logprobs is None else completion_logprobs(output.token_ids, output.logprobs, text)
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": output.text or "", "logprobs": logprobs,
                         "finish_reason": finish_reason(output.finish_reason)}],
            "usage": usage(output)}


def completion_chunk(request_id: str, model: str, created: int, text: str,
                     reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}


def chat_completion(request_id: str, model: str, output: GenerationOutput, created: int,
                    text: TokenText) -> dict[str, Any]:
    logprobs = None if output.logprobs is None else chat_logprobs(output.token_ids, output.logprobs, text)
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text or ""},
                         "logprobs": logprobs, "finish_reason": finish_reason(output.finish_reason)}],
            "usage": usage(output)}


def chat_chunk(request_id: str, model: str, created: int, delta: dict[str, str],
               reason: str | None = None, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}


def usage_chunk(request_id: str, model: str, created: int, output: GenerationOutput, chat: bool) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(output)}


def model_card(name: str, parent: str | None, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "harli_jax", "root": parent or name,
            "parent": parent}


def now() -> int:
    return int(time.time())
