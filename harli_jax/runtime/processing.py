"""Requests in and text out, outside the engine core: the input processor validates and tokenizes a request
into the state the scheduler runs; the output processor detokenizes each request incrementally and finds
stop strings in the new text only."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from harli_jax.errors import HarliError
from harli_jax.model.config import ModelConfig
from harli_jax.model.tokenizer import TextStream, Tokenizer
from harli_jax.runtime.request import FinishReason, PrefilledKV, Request
from harli_jax.runtime.state import RequestState


class RequestError(HarliError, ValueError):
    """A request that cannot be served as given; only that request is refused."""


class InputProcessor:
    """Turns a `Request` into a `RequestState`, or raises RequestError naming what is wrong with it."""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer | None, seq_len: int, page_tokens: int,
                 capacity_pages: int, max_logprobs: int | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.seq_len, self.page_tokens, self.capacity_pages = seq_len, page_tokens, capacity_pages
        self.max_logprobs = max_logprobs

    def prompt_ids(self, prompt: Sequence[int] | str) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids")
            if not prompt:
                raise RequestError("the prompt is empty")
            return tuple(self.tokenizer.encode(prompt))
        ids = tuple(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            raise RequestError("prompt token ids must be integers")
        bad = [int(t) for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt token ids {bad[:8]} are outside the vocabulary (size {self.cfg.vocab_size})")
        return tuple(int(t) for t in ids)

    def process(self, request: Request, request_id: str, arrival_time: float,
                prefilled_kv: PrefilledKV | None = None) -> RequestState:
        s = request.sampling
        problems = s.problems()
        if problems:
            raise RequestError("; ".join(problems))
        if s.logprobs is not None and (self.max_logprobs is None or s.logprobs > self.max_logprobs):
            most = "none: RunnerConfig.max_logprobs is unset" if self.max_logprobs is None else self.max_logprobs
            raise RequestError(f"logprobs {s.logprobs} exceeds this engine's max_logprobs ({most})")
        prompt_ids = self.prompt_ids(request.prompt)
        if len(prompt_ids) + s.max_tokens > self.seq_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({s.max_tokens}) exceeds the "
                               f"context length {self.seq_len}")
        if -(-(len(prompt_ids) + s.max_tokens) // self.page_tokens) > self.capacity_pages:
            raise RequestError(f"the request needs more pages than the arena has ({self.capacity_pages})")
        if prefilled_kv is not None:
            self._check_prefilled(prefilled_kv, prompt_ids)
        stop_ids = set(s.stop_token_ids) | (set() if s.ignore_eos else set(self.cfg.eos_token_ids))
        return RequestState(request_id=request_id, prompt_ids=prompt_ids, sampling=s, stop_ids=frozenset(stop_ids),
                            arrival_time=arrival_time, prefilled=prefilled_kv, adapter=request.adapter)

    def _check_prefilled(self, kv: PrefilledKV, prompt_ids: tuple[int, ...]) -> None:
        want = (-(-len(prompt_ids) // self.page_tokens), self.cfg.num_layers, 2, self.cfg.num_kv_heads,
                self.page_tokens, self.cfg.head_dim)
        if tuple(kv.prompt_ids) != prompt_ids:
            raise RequestError("prefilled_kv was computed for a different prompt")
        if kv.page_tokens != self.page_tokens or tuple(kv.kv.shape) != want:
            raise RequestError(f"prefilled_kv has shape {tuple(kv.kv.shape)} with page_tokens {kv.page_tokens}; "
                               f"this engine needs {want} with page_tokens {self.page_tokens}")
        if not 0 <= kv.first_token < self.cfg.vocab_size:
            raise RequestError(f"prefilled_kv.first_token {kv.first_token} is outside the vocabulary")


@dataclasses.dataclass
class _Detokenized:
    """A request's incremental detokenization: its decoder, the text so far, and how much was given out."""

    text: TextStream
    decoded: str = ""
    emitted: int = 0  # characters of `decoded` given out in token events
    final: str | None = None  # the finished request's text


class OutputProcessor:
    """Per-request incremental detokenization (only the last few ids are decoded per token) and the finish
    decision: stop ids, stop strings (searched in the new text and the tail it may complete), max_tokens.
    While stop strings are set, the last characters that could begin one are held back until the request
    goes on past them or ends; the token that ends a request carries the rest of its text."""

    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        self._streams: dict[str, _Detokenized] = {}

    def new_token(self, state: RequestState) -> tuple[str | None, FinishReason | None]:
        """The text the request's newest token adds, and why the request ends with it (None: it goes on)."""
        ids, stops = state.output_ids, state.sampling.stop
        stream = self._streams.get(state.request_id)
        if stream is None and self.tokenizer is not None:
            stream = self._streams[state.request_id] = _Detokenized(self.tokenizer.stream())
        reason, cut = None, None
        may_stop = len(ids) >= state.sampling.min_tokens
        if ids[-1] in state.stop_ids and may_stop:
            reason = FinishReason.STOP
        elif stream is not None:
            delta = stream.text.add(ids[-1])
            stream.decoded += delta
            if stops and delta and may_stop:
                start = max(len(stream.decoded) - len(delta) - max(map(len, stops)) + 1, 0)
                hits = [i for i in (stream.decoded.find(stop, start) for stop in stops) if i >= 0]
                if hits:
                    reason, cut = FinishReason.STOP, min(hits)
        if reason is None and len(ids) >= state.sampling.max_tokens:
            reason = FinishReason.LENGTH
        if stream is None:
            return None, reason
        if reason is None:
            visible = len(stream.decoded) - (max(map(len, stops)) - 1 if stops else 0)
        else:
            stream.final = stream.decoded[:cut] if cut is not None else self._decode_shown(ids, state, reason)
            stream.decoded, visible = stream.final, len(stream.final)
        text = stream.decoded[stream.emitted:visible] if visible > stream.emitted else ""
        stream.emitted = max(stream.emitted, visible)
        return text, reason

    def _decode_shown(self, ids: list[int], state: RequestState, reason: FinishReason) -> str:
        """The whole output decoded, less a stop id at its end."""
        shown = ids[:-1] if reason is FinishReason.STOP and ids and ids[-1] in state.stop_ids else ids
        return self.tokenizer.decode(shown)

    def finished_text(self, state: RequestState) -> str | None:
        """The finished request's text (None without a tokenizer); forgets its stream."""
        stream = self._streams.pop(state.request_id, None)
        if self.tokenizer is None:
            return None
        return stream.final if stream is not None and stream.final is not None else self._decode_shown(
            state.output_ids, state, FinishReason.ABORTED)
