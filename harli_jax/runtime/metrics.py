"""Per-step records of the engine loop: what ran, in which program shape, and how long it took."""

from __future__ import annotations

import dataclasses
from collections import deque


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
    pack_time: float = 0.0  # host seconds packing the step's inputs (inside start..end)
    # The training that ran after the inference step (its window), and the policy's decision.
    train: tuple[str, ...] = ()  # micro-step kinds ("forward:2" = a forward chunk of 2 layers)
    fused: str = ""  # the finetune work fused into the step ("tokens:8" = a token chunk of 8 positions)
    train_time: float = 0.0
    budget: float | None = None  # seconds the policy allowed for training
    predicted: float | None = None  # predicted bound of the window
    decision_time: float = 0.0  # the policy's own time
    kv_pages: int = 0  # arena occupancy after the window
    lease_pages: int = 0
    free_pages: int = 0

    @property
    def latency(self) -> float:
        """The inference step alone."""
        return self.end - self.start

    @property
    def window(self) -> float:
        """The inference step plus the training after it."""
        return self.latency + self.train_time


@dataclasses.dataclass
class IdleTraining:
    """Training the engine ran while no request was to be served (the single-program path)."""

    calls: int = 0
    seconds: float = 0.0
    tokens: int = 0  # trained tokens


class StepLog:
    """The newest `limit` step records, indexed by step number: `log[i]`, `log[i:]`, `len(log)` (every step so
    far), iteration over what is kept. Older records are dropped, so a long serve does not grow."""

    def __init__(self, limit: int):
        self._records: deque[StepRecord] = deque(maxlen=limit)
        self._count = 0

    def append(self, record: StepRecord) -> None:
        self._records.append(record)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return bool(self._records)

    def __iter__(self):
        return iter(self._records)

    def __getitem__(self, index):
        first = self._count - len(self._records)  # step number of the oldest record kept
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            return [self._records[i - first] for i in range(max(start, first), stop, step)]
        i = index + self._count if index < 0 else index
        if not first <= i < self._count:
            raise IndexError(f"step record {index} is not kept (steps {first}..{self._count - 1} are)")
        return self._records[i - first]
