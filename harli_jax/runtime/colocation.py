"""Co-location policies: after each inference step, which training work runs before and inside the next one.

A window is one inference step plus the micro-steps after it; the gap between two tokens of a request is a
window. Every policy sees the same `WindowContext` and answers with the micro-steps to run now, as
(kind, size) pairs in execution order, and the work fused into the next inference step (`lora.fused`):

- `harli`: predictor-driven and hybrid. The budget is the time until the earliest next-token deadline of the
  decoding requests (a request ahead of its TPOT target has banked slack, capped; no gap may pass the TBT
  cap) less a safety margin. It picks the fused work of the next step (a forward window or a backward slice
  of layers, or none) and the micro-steps before it that do the most of a micro-batch while the micro-steps'
  bounds and the next step's (with its fused work) stay within the budget.
- `harli-temporal`: `harli` with nothing fused: the micro-steps between steps only (the ablation that shows
  what fused steps add, at one SLO).
- `cobatch`: FlexLLM's token-level co-serving, SLO-blind: inference tokens first, finetune tokens fill a fixed
  per-step token budget, the backward a fixed number of layers per step; the budget set offline for the peak.
- `decode-only`: no training while requests run (a separate-instances baseline).
- `temporal-K`: K micro-steps after every K inference steps, SLO-blind (FlexLLM's temporal sharing).
- `static`: a fixed number of layers of micro-steps after every inference step, set offline for the peak.

When no request runs, the engine trains through the single-program path regardless of the policy.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Sequence

from harli_jax.errors import ConfigError

POLICIES = ("harli", "harli-temporal", "cobatch", "decode-only", "temporal-K", "static")


class MicroKind(enum.StrEnum):
    """What a training micro-step runs: a chunk of the forward (layers of every token, or positions of every row
    through every layer) or of the backward; the forward chunk that reaches the last layer also runs the loss
    (a token chunk runs its own tokens' loss), the backward chunk that reaches the first layer commits."""

    FORWARD = "forward"
    FORWARD_LOSS = "forward+loss"
    TOKENS = "tokens"
    TOKENS_LAST = "tokens+last"
    BACKWARD = "backward"
    BACKWARD_COMMIT = "backward+commit"


MicroStep = tuple[MicroKind, int]  # (kind, layers, or positions of a token chunk)
# Where a micro-batch is: "forward" (layers left), "tokens" (positions left of a forward in token chunks) or
# "backward" (layers left).
Phase = tuple[str, int]


def advance(phase: Phase, size: int, num_layers: int) -> tuple[MicroKind, Phase | None]:
    """The one phase machine of a micro-batch, shared by the policies and the trainer: running `size` of the
    layers (positions) left in `phase` is a micro-step of this kind, after which the micro-batch is in the
    returned phase (None: committed, done)."""
    name, left = phase
    if size < left:
        return MicroKind(name), (name, left - size)
    if name == "forward":
        return MicroKind.FORWARD_LOSS, ("backward", num_layers)
    if name == "tokens":
        return MicroKind.TOKENS_LAST, ("backward", num_layers)
    return MicroKind.BACKWARD_COMMIT, None


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The compiled sizes of micro-steps: layers of a forward or backward chunk, positions of a token chunk; and
    those that may ride in an inference step (a fused token chunk, forward window or backward slice)."""

    layers: tuple[int, ...]
    tokens: tuple[int, ...] = ()
    fused_tokens: tuple[int, ...] = ()
    fused_layers: tuple[int, ...] = ()  # backward slices
    fused_windows: tuple[int, ...] = ()  # forward windows

    def of(self, phase: str) -> tuple[int, ...]:
        return self.tokens if phase == "tokens" else self.layers

    def fused_of(self, phase: str) -> tuple[int, ...]:
        return {"tokens": self.fused_tokens, "forward": self.fused_windows, "backward": self.fused_layers}[phase]


@dataclasses.dataclass(frozen=True)
class WindowContext:
    now: float
    slo: float  # TPOT SLO, seconds
    margin: float  # safety margin, seconds
    next_step_bound: float  # predicted bound of the next inference step alone, seconds
    deadlines: Sequence[float]  # next-token deadline of every decoding request (TPOT-banked, TBT-capped)
    num_layers: int
    pending: Phase | None  # the in-flight micro-batch's phase and layers left in it, or None
    can_start: bool  # a new micro-batch may lease its stash now
    inference_steps: int  # inference steps since the last window that trained
    fresh: Phase | None = None  # the phase a new micro-batch starts in; None: ("forward", num_layers)
    next_tokens: int = 0  # inference tokens of the next step
    rows: int = 1  # rows of a micro-batch: a token chunk of n positions is rows * n tokens
    # The next step's bound with (phase, size) work fused in; None: the next step cannot carry any.
    fused_bound: Callable[[str, int], float] | None = None
    # Seconds of the banked slack kept for a later step: what a pending prompt chunk's step will cost beyond a
    # decode step (the colocated role), so a window does not spend what that step needs.
    reserve: float = 0.0

    @property
    def start_phase(self) -> Phase:
        return self.fresh if self.fresh is not None else ("forward", self.num_layers)

    @property
    def seq_len(self) -> int:
        """Positions of a micro-batch row (what a token-chunked forward covers; 0 if forwards run in layers)."""
        phase = self.start_phase
        return phase[1] if phase[0] == "tokens" else 0

    @property
    def first_phase(self) -> Phase | None:
        """The phase the next micro-step continues: the pending micro-batch's, or a new one's when allowed."""
        if self.pending is not None:
            return self.pending
        return self.start_phase if self.can_start else None


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    steps: tuple[MicroStep, ...]  # micro-steps to run now, before the next inference step
    budget: float  # seconds the policy allowed for the window and the next step (inf when SLO-blind)
    predicted: float  # sum of the steps' predicted bounds, and the next step's when the policy predicts it
    fused: MicroStep | None = None  # the work that rides in the next inference step


def largest_chunk(chunks: Sequence[int], limit: int) -> int:
    """The largest compiled chunk size of at most `limit`; `chunks` holds 1 (or the smallest step)."""
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


def progress(step: MicroStep, ctx: WindowContext) -> float:
    """The share of a micro-batch a micro-step does: its forward is one half, its backward the other."""
    kind, n = step
    if kind in (MicroKind.TOKENS, MicroKind.TOKENS_LAST):
        return n / (2 * ctx.seq_len)
    return n / (2 * ctx.num_layers)


def plan_greedy(budget: float, ctx: WindowContext, cost: Callable[[MicroStep], float], sizes: Sizes,
                max_microbatches: int = 4) -> tuple[list[MicroStep], list[Phase | None], float]:
    """Micro-steps in execution order, each the largest compiled size whose predicted bound still fits the
    budget; returns them, the phase before each and after the last, and their summed bound."""
    steps: list[MicroStep] = []
    phases: list[Phase | None] = [ctx.first_phase]
    used = 0.0
    started = 0 if ctx.pending is not None else 1
    pending = phases[0]
    while pending is not None:
        options = [(n, *advance(pending, n, ctx.num_layers)) for n in sizes.of(pending[0]) if n <= pending[1]]
        fits = [(n, kind, after) for n, kind, after in options if used + cost((kind, n)) <= budget]
        if not fits:
            break
        n, kind, pending = max(fits, key=lambda fit: fit[0])
        steps.append((kind, n))
        used += cost((kind, n))
        if pending is None and ctx.can_start and started < max_microbatches:
            pending, started = ctx.start_phase, started + 1
        phases.append(pending)
    return steps, phases, used


class Policy:
    name = "base"

    def plan(self, ctx: WindowContext) -> WindowPlan:
        raise NotImplementedError


class HarliPolicy(Policy):
    """Predictor-driven and hybrid: for the next step it chooses the work fused into it (a forward window or a
    backward slice, or none) and the micro-steps before it that do the most of a micro-batch with the window's
    and the next step's predicted bounds within the budget. A fused forward window never reaches the last
    layer: the loss runs as a micro-step."""

    name = "harli"
    fuses = True

    def __init__(self, cost: Callable[[MicroStep], float], sizes: Sizes, bank_cap: float = 1.0):
        self.cost, self.sizes, self.bank_cap = cost, sizes, bank_cap

    def budget(self, ctx: WindowContext) -> float:
        """Seconds until the earliest next-token deadline (banked slack capped at `bank_cap` SLOs), less the
        margin and the reserve: the window and the next step must fit in it."""
        room = ctx.slo * (1 + self.bank_cap)
        if ctx.deadlines:
            room = min(room, min(ctx.deadlines) - ctx.now)
        else:
            room = min(room, ctx.slo)
        return room - ctx.margin - ctx.reserve

    def plan(self, ctx: WindowContext) -> WindowPlan:
        budget = self.budget(ctx)
        steps, phases, used = plan_greedy(budget - ctx.next_step_bound, ctx, self.cost, self.sizes)
        best = (sum(progress(s, ctx) for s in steps), -len(steps), steps, None, used + ctx.next_step_bound)
        for name in ("tokens", "forward", "backward") if ctx.fused_bound is not None and self.fuses else ():
            for size in self.sizes.fused_of(name):
                # The longest prefix of the greedy steps after which this fused work applies.
                bound = ctx.fused_bound(name, size)
                for cut in range(len(steps), -1, -1):
                    phase = phases[cut]
                    last = 1 if name == "forward" else 0  # a window leaves the last layer and the loss
                    if phase is None or phase[0] != name or phase[1] < size + last:
                        continue
                    prefix, spent = steps[:cut], sum(self.cost(s) for s in steps[:cut])
                    if spent + bound > budget:
                        continue
                    fused = (advance(phase, size, ctx.num_layers)[0], size)
                    score = sum(progress(s, ctx) for s in prefix) + progress(fused, ctx)
                    best = max(best, (score, -len(prefix), prefix, fused, spent + bound), key=lambda b: b[:2])
                    break
        score, _, steps, fused, predicted = best
        return WindowPlan(tuple(steps), budget, predicted, fused)


class HarliTemporalPolicy(HarliPolicy):
    """harli with nothing fused: the micro-steps between inference steps only."""

    name = "harli-temporal"
    fuses = False


class CoBatchPolicy(Policy):
    """FlexLLM's token-level co-serving, SLO-blind: inference tokens first, then finetune tokens of a token chunk
    fill the step up to `token_budget`; a micro-batch's backward runs `backward_layers` layers per step."""

    name = "cobatch"

    def __init__(self, token_budget: int, backward_layers: int, sizes: Sizes):
        self.token_budget, self.backward_layers, self.sizes = token_budget, backward_layers, sizes

    def plan(self, ctx: WindowContext) -> WindowPlan:
        phase = ctx.first_phase
        if phase is None or ctx.fused_bound is None:  # nothing to train, or the next step cannot carry it
            return WindowPlan((), math.inf, 0.0)
        name, left = phase
        if name == "tokens":
            room = (self.token_budget - ctx.next_tokens) // max(ctx.rows, 1)
            fits = [n for n in self.sizes.fused_tokens if n <= min(room, left)]
        else:
            fits = [n for n in self.sizes.fused_layers if n <= min(self.backward_layers, left)]
        if not fits:
            return WindowPlan((), math.inf, 0.0)
        size = max(fits)
        return WindowPlan((), math.inf, 0.0, (advance(phase, size, ctx.num_layers)[0], size))


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
        return WindowPlan(tuple(seq[: self.k]), math.inf, 0.0)


class StaticPolicy(Policy):
    """`layers` layers of micro-steps (one chunk) after every inference step."""

    name = "static"

    def __init__(self, layers: int, chunks: Sequence[int]):
        self.layers, self.chunks = layers, tuple(chunks)

    def plan(self, ctx: WindowContext) -> WindowPlan:
        if self.layers == 0:
            return WindowPlan((), 0.0, 0.0)
        seq = micro_sequence(ctx.pending, ctx.can_start, ctx.num_layers, self.layers, self.chunks)
        return WindowPlan(tuple(seq[:1]), math.inf, 0.0)


def make_policy(name: str, cost: Callable[[MicroStep], float], sizes: Sizes, *, temporal_k: int = 2,
                temporal_chunk: int = 1, static_layers: int = 1, bank_cap: float = 1.0, cobatch_tokens: int = 64,
                cobatch_layers: int = 1) -> Policy:
    if name == "harli":
        return HarliPolicy(cost, sizes, bank_cap)
    if name == "harli-temporal":
        return HarliTemporalPolicy(cost, sizes, bank_cap)
    if name == "cobatch":
        return CoBatchPolicy(cobatch_tokens, cobatch_layers, sizes)
    if name == "decode-only":
        return DecodeOnlyPolicy()
    if name == "temporal-K":
        return TemporalPolicy(temporal_k, temporal_chunk, sizes.layers)
    if name == "static":
        return StaticPolicy(static_layers, sizes.layers)
    raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
