"""What a user submits (Request, SamplingParams) and what comes back (events, GenerationOutput)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import numpy as np

from harli_jax.options import option


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 is greedy. `top_k` 0 and `top_p` 1 disable those filters."""

    max_tokens: int = option(16, "new tokens to generate at most")
    temperature: float = option(0.0, "sampling temperature; 0 is greedy")
    top_k: int = option(0, "sample among the k most likely tokens; 0: all")
    top_p: float = option(1.0, "nucleus sampling mass; 1: all")
    seed: int = option(0, "sampler seed")
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = option(0, "new tokens before a stop id, EOS or stop string may end the request")
    logprobs: int | None = option(None, "report each new token's logprob and this many top logprobs (the "
                                        "engine's RunnerConfig.max_logprobs at most); unset: none")

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            out.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            out.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            out.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            out.append(f"seed must be in [0, 2**32), got {self.seed}")
        if any(not s for s in self.stop):
            out.append("stop strings must be non-empty")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            out.append(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        elif isinstance(self.max_tokens, int) and self.min_tokens > self.max_tokens:
            out.append(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or self.logprobs < 0):
            out.append(f"logprobs must be a non-negative integer, got {self.logprobs!r}")
        return out


@dataclasses.dataclass
class Request:
    """A prompt (token ids or text) to continue. `arrival` is seconds after `Engine.serve` starts;
    `prefilled_kv`, its prompt's K/V from a prefill engine (the request then only decodes here); `adapter`, the
    name of a LoRA adapter added to the engine (`Engine.add_adapter`; None: the base model)."""

    prompt: Sequence[int] | str
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    arrival: float = 0.0
    request_id: str | None = None
    prefilled_kv: PrefilledKV | None = None
    adapter: str | None = None


@dataclasses.dataclass(frozen=True)
class PrefilledKV:
    """A prompt's K/V computed elsewhere (prefill/decode disaggregation), plus the first token sampled there.

    `kv` is `[pages, layers, 2, kv_heads, page_tokens, head_dim]`, the arena's page layout, holding the K/V
    of all `len(prompt_ids)` prompt tokens.
    """

    prompt_ids: tuple[int, ...]
    first_token: int
    kv: np.ndarray
    page_tokens: int


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # a stop token id, EOS or stop string
    ABORTED = "aborted"
    REJECTED = "rejected"  # invalid request: `error` says why
    REFUSED = "refused"  # never admitted within the queue timeout (overload): `error` says how long it waited


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely tokens' (id, logprob), best
    first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int
    index: int  # 0 for the first generated token
    time: float
    text: str | None = None  # the text this token adds (None without a tokenizer; may be "" mid-character)
    logprob: TokenLogprob | None = None  # when the request asked for logprobs (none for an imported token)


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    request_id: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str | None
    finish_reason: FinishReason
    arrival_time: float
    first_token_time: float | None
    token_times: tuple[float, ...]
    error: str | None = None
    preemptions: int = 0
    scheduled_time: float | None = None  # when it was first admitted to the batch (None: never)
    logprobs: tuple[TokenLogprob | None, ...] | None = None  # per generated token, when asked for

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """Arrival to first admission to the batch."""
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (t_last - t_first) / (n - 1)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclasses.dataclass(frozen=True)
class FinishedEvent:
    output: GenerationOutput

    @property
    def request_id(self) -> str:
        return self.output.request_id


Event = TokenEvent | FinishedEvent
