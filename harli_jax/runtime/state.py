"""The engine's record of one request: its tokens, how many have K/V in the arena, and its timing."""

from __future__ import annotations

import dataclasses

from harli_jax.runtime.arena import Owner
from harli_jax.runtime.request import FinishReason, GenerationOutput, PrefilledKV, SamplingParams, TokenLogprob


@dataclasses.dataclass(eq=False)
class RequestState:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stop_ids: frozenset[int]
    arrival_time: float
    output_ids: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # leading tokens of prompt + output whose K/V is in the arena
    preemptions: int = 0
    prefilled: PrefilledKV | None = None  # K/V to import when admitted (prefill/decode disaggregation)
    text: str | None = None
    adapter: str | None = None  # the LoRA adapter it is served with (None: the base model)
    adapter_slot: int = -1  # that adapter's resident slot while the request runs (-1: none held)
    scheduled_time: float | None = None  # perf_counter time of its first admission to the batch
    logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)  # per output token, if asked

    @property
    def owner(self) -> Owner:
        return Owner("kv", self.request_id)

    @property
    def num_pending(self) -> int:
        """Tokens whose K/V is still to be computed; 1 while decoding."""
        return len(self.prompt_ids) + len(self.output_ids) - self.num_computed

    def pending_ids(self, n: int) -> list[int]:
        """The next `n` tokens whose K/V is to be computed (without joining prompt and output: O(n))."""
        start, prompt = self.num_computed, len(self.prompt_ids)
        head = list(self.prompt_ids[start:start + n]) if start < prompt else []
        return head + self.output_ids[max(start - prompt, 0):max(start + n - prompt, 0)]

    def output(self, reason: FinishReason, error: str | None = None) -> GenerationOutput:
        return GenerationOutput(
            request_id=self.request_id, prompt_ids=self.prompt_ids, token_ids=tuple(self.output_ids),
            text=self.text, finish_reason=reason, arrival_time=self.arrival_time,
            first_token_time=self.token_times[0] if self.token_times else None,
            token_times=tuple(self.token_times), error=error, preemptions=self.preemptions,
            scheduled_time=self.scheduled_time,
            logprobs=tuple(self.logprobs) if self.sampling.logprobs is not None else None)
