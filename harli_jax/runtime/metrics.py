"""Per-step records of the engine loop: what ran, in which program shape, and how long it took."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepRecord:
    index: int
    start: float  # time.perf_counter() seconds
    end: float
    decode_seqs: int  # sequences that fed one token
    prefill_seqs: int  # sequences that fed part of their prompt
    prefill_tokens: int
    total_context: int  # tokens of K/V attended, summed over sequences
    max_context: int
    bucket_seqs: int  # the compiled program's padded shape
    bucket_tokens: int
    bucket_pages: int
    preempted: int

    @property
    def latency(self) -> float:
        return self.end - self.start
