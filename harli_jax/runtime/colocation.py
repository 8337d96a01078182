"""Co-location policies: after each inference step, which training micro-steps run before the next one.

A window is one inference step plus the micro-steps after it; the gap between two tokens of a request is a
window. Every policy sees the same `WindowContext` and answers with the micro-steps to run, as
(kind, layers) pairs in execution order:

- `harli`: predictor-driven. The budget is the time until the earliest next-token deadline of the decoding
  requests (a request ahead of its TPOT target has banked slack; the bank is capped), minus the predicted
  bound of the next inference step and a safety margin. Micro-steps are added greedily, each as large as
  fits, while the window's predicted bound stays within the budget.
- `decode-only`: no training while requests run (a separate-instances baseline).
- `temporal-K`: K micro-steps after every K inference steps, SLO-blind (FlexLLM's temporal sharing).
- `static`: a fixed number of layers of micro-steps after every inference step, set offline for the peak.

When no request runs, the engine trains through the single-program path regardless of the policy.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence

from harli_jax.errors import ConfigError

POLICIES = ("harli", "decode-only", "temporal-K", "static")


class MicroKind(enum.StrEnum):
    """What a training micro-step runs: a chunk of the forward or of the backward; the forward chunk that
    reaches the last layer also runs the loss, the backward chunk that reaches the first layer commits."""

    FORWARD = "forward"
    FORWARD_LOSS = "forward+loss"
    BACKWARD = "backward"
    BACKWARD_COMMIT = "backward+commit"


MicroStep = tuple[MicroKind, int]  # (kind, layers)
Phase = tuple[str, int]  # where a micro-batch is: "forward" or "backward", and the layers left in that phase


def advance(phase: Phase, layers: int, num_layers: int) -> tuple[MicroKind, Phase | None]:
    """The one phase machine of a micro-batch, shared by the policies and the trainer: running `layers` of the
    layers left in `phase` is a micro-step of this kind, after which the micro-batch is in the returned phase
    (None: committed, done)."""
    name, left = phase
    if layers < left:
        return MicroKind(name), (name, left - layers)
    if name == "forward":
        return MicroKind.FORWARD_LOSS, ("backward", num_layers)
    return MicroKind.BACKWARD_COMMIT, None


@dataclasses.dataclass(frozen=True)
class WindowContext:
    now: float
    slo: float  # TPOT SLO, seconds
    margin: float  # safety margin, seconds
    next_step_bound: float  # predicted bound of the next inference step, seconds
    deadlines: Sequence[float]  # next-token deadline of every decoding request (TPOT-banked)
    num_layers: int
    pending: Phase | None  # the in-flight micro-batch's phase and layers left in it, or None
    can_start: bool  # a new micro-batch may lease its stash now
    inference_steps: int  # inference steps since the last window that trained


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    steps: tuple[MicroStep, ...]
    budget: float  # seconds the policy allowed for training (inf when SLO-blind)
    predicted: float  # sum of the steps' predicted bounds


def largest_chunk(chunks: Sequence[int], limit: int) -> int:
    """The largest compiled chunk size (layers per micro-step) of at most `limit` layers; `chunks` holds 1."""
    return max(n for n in chunks if n <= limit)


def micro_sequence(pending: Phase | None, can_start: bool, num_layers: int, chunk: int,
                   chunks: Sequence[int]) -> list[MicroStep]:
    """The micro-steps that follow, in pieces of at most `chunk` layers, each a compiled chunk size, up to the
    end of the (next) micro-batch."""
    out = []
    phase = pending if pending is not None else ("forward", num_layers) if can_start else None
    while phase is not None:
        n = largest_chunk(chunks, min(chunk, phase[1]))
        kind, phase = advance(phase, n, num_layers)
        out.append((kind, n))
    return out


def plan_greedy(budget: float, ctx: WindowContext, cost: Callable[[MicroStep], float],
                chunks: Sequence[int], max_microbatches: int = 4) -> WindowPlan:
    """Micro-steps in execution order, each the largest compiled chunk whose predicted bound still fits the
    budget."""
    steps: list[MicroStep] = []
    used = 0.0
    pending = ctx.pending if ctx.pending is not None else (("forward", ctx.num_layers) if ctx.can_start else None)
    started = 0 if ctx.pending is not None else 1
    while pending is not None:
        options = [(n, *advance(pending, n, ctx.num_layers)) for n in chunks if n <= pending[1]]
        fits = [(n, kind, after) for n, kind, after in options if used + cost((kind, n)) <= budget]
        if not fits:
            break
        n, kind, pending = max(fits, key=lambda fit: fit[0])
        steps.append((kind, n))
        used += cost((kind, n))
        if pending is None and ctx.can_start and started < max_microbatches:
            pending, started = ("forward", ctx.num_layers), started + 1
    return WindowPlan(tuple(steps), budget, used)


class Policy:
    name = "base"

    def plan(self, ctx: WindowContext) -> WindowPlan:
        raise NotImplementedError


class HarliPolicy(Policy):
    name = "harli"

    def __init__(self, cost: Callable[[MicroStep], float], chunks: Sequence[int], bank_cap: float = 1.0):
        self.cost, self.chunks, self.bank_cap = cost, tuple(chunks), bank_cap

    def budget(self, ctx: WindowContext) -> float:
        room = ctx.slo * (1 + self.bank_cap)
        if ctx.deadlines:
            room = min(room, min(ctx.deadlines) - ctx.now)
        else:
            room = min(room, ctx.slo)
        return room - ctx.next_step_bound - ctx.margin

    def plan(self, ctx: WindowContext) -> WindowPlan:
        return plan_greedy(self.budget(ctx), ctx, self.cost, self.chunks)


class DecodeOnlyPolicy(Policy):
    name = "decode-only"

    def plan(self, ctx: WindowContext) -> WindowPlan:
        return WindowPlan((), 0.0, 0.0)


class TemporalPolicy(Policy):
    """K micro-steps of `chunk` layers after every K inference steps."""

    name = "temporal-K"

    def __init__(self, k: int, chunk: int, chunks: Sequence[int]):
        self.k, self.chunk, self.chunks = k, chunk, tuple(chunks)

    def plan(self, ctx: WindowContext) -> WindowPlan:
        if ctx.inference_steps < self.k:
            return WindowPlan((), 0.0, 0.0)
        seq = micro_sequence(ctx.pending, ctx.can_start, ctx.num_layers, self.chunk, self.chunks)
        return WindowPlan(tuple(seq[: self.k]), float("inf"), 0.0)


class StaticPolicy(Policy):
    """`layers` layers of micro-steps (one chunk) after every inference step."""

    name = "static"

    def __init__(self, layers: int, chunks: Sequence[int]):
        self.layers, self.chunks = layers, tuple(chunks)

    def plan(self, ctx: WindowContext) -> WindowPlan:
        if self.layers == 0:
            return WindowPlan((), 0.0, 0.0)
        seq = micro_sequence(ctx.pending, ctx.can_start, ctx.num_layers, self.layers, self.chunks)
        return WindowPlan(tuple(seq[:1]), float("inf"), 0.0)


def make_policy(name: str, cost: Callable[[MicroStep], float], chunks: Sequence[int], *, temporal_k: int = 2,
                temporal_chunk: int = 1, static_layers: int = 1, bank_cap: float = 1.0) -> Policy:
    if name == "harli":
        return HarliPolicy(cost, chunks, bank_cap)
    if name == "decode-only":
        return DecodeOnlyPolicy()
    if name == "temporal-K":
        return TemporalPolicy(temporal_k, temporal_chunk, chunks)
    if name == "static":
        return StaticPolicy(static_layers, chunks)
    raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
