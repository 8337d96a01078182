"""What a replay reports: metrics by the definitions of the design, CSVs, a summary table and plots.

TTFT = first token time - arrival. In the decode role the first token comes with the prompt's K/V from the
prefill instance, so TTFT counts from the request's arrival at the decode instance to its first decode token (the
first token this engine generates; none for a one-token request). TPOT = (t_last - t_first) / (n_out - 1), over
every token of the request (in the decode role t_first is the arrival of the prefill's token). TBT = every gap
between consecutive tokens. SLO attainment = share of requests with TPOT <= the TPOT SLO (and TTFT <= its SLO
when set); token-level attainment (`tbt_attainment`) = share of gaps <= the TBT cap. Decode tokens/s counts the
tokens this engine generated. Finetune throughput = trained tokens per second. Harvest ratio = co-located finetune
tokens/s / the job's tokens/s alone on the same device. Fused steps = inference steps that carried finetune work
in the same program (`StepRecord.fused`: a token chunk, a forward window or a backward slice), by kind. The predictor's
errors are per stage (`LatencyPredictor.error_report()["stages"]`): inference steps alone, fused steps and whole
windows, each predicted before it was fitted.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harli_jax.runtime.metrics import StepRecord
from harli_jax.runtime.request import FinishReason, GenerationOutput


@dataclasses.dataclass
class RunResult:
    """Everything one policy's replay produced."""

    policy: str
    role: str  # "decode" (requests arrive with their prompt's K/V) or "colocated"
    tpot_slo: float  # seconds
    tbt_slo: float  # seconds: the cap on any single gap between two tokens
    ttft_slo: float | None
    outputs: list[GenerationOutput]
    steps: list[StepRecord]
    wall_s: float
    start: float  # perf_counter at the start of serving
    finetune_tokens: int
    loss_history: list[dict[str, float]]
    standalone_tokens_per_s: float | None
    predictor: dict[str, Any]  # LatencyPredictor.error_report(): the windows' errors, and "stages"
    reclaims: int
    abandoned: int
    interrupted: bool = False
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # the policy's CoLocationConfig overrides
    finetune_total_steps: int | None = None  # the job's schedule
    # The job's held-out set before training (the base model) and after the replay: (eval loss, exact match).
    eval_before: tuple[float, float] | None = None
    eval_after: tuple[float, float] | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0 to 100, linear interpolation) of `values`; None when there are none."""
    return float(np.percentile(values, q)) if len(values) else None


def to_ms(seconds: float | None, decimals: int | None = None) -> float | None:
    """Seconds in milliseconds, rounded to `decimals` when given; None stays None."""
    if seconds is None:
        return None
    return seconds * 1e3 if decimals is None else round(seconds * 1e3, decimals)


def ttft(o: GenerationOutput, role: str) -> float | None:
    """Time to first token: to the first token this engine generated (see the module's docstring)."""
    if role != "decode":
        return o.ttft
    return o.token_times[1] - o.arrival_time if len(o.token_times) > 1 else None


def fused_counts(steps: Sequence[StepRecord]) -> dict[str, int]:
    """Steps that carried fused finetune work, by phase: "tokens" (a token chunk; "tokens+last:8", the chunk that
    ends the forward, counts too), "forward" (a window of layers) or "backward" (a slice; "backward+commit:1"
    too)."""
    kinds: dict[str, int] = {}
    for s in steps:
        if s.fused:
            kind = s.fused.split(":")[0].split("+")[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items()))


STAGES = ("step", "fused", "window")
STAGE_KEYS = ("samples", "mape", "p99_ape", "under_prediction_rate")


def predictor_stages(predictor: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The predictor's errors per stage, every key present (None where the stage had no sample or no finite
    error)."""
    stages = predictor.get("stages") or {}

    def value(stage: str, key: str) -> float | None:
        v = (stages.get(stage) or {}).get(key, 0 if key == "samples" else None)
        return None if _nan(v) else v

    return {stage: {key: value(stage, key) for key in STAGE_KEYS} for stage in STAGES}


def summarize(r: RunResult) -> dict[str, Any]:
    served = [o for o in r.outputs if o.finish_reason is not FinishReason.REJECTED]
    tpots = [o.tpot for o in served if o.tpot is not None]
    ttfts = [t for t in (ttft(o, r.role) for o in served) if t is not None]
    gaps = [b - a for o in served for a, b in zip(o.token_times, o.token_times[1:], strict=False)]
    imported = 1 if r.role == "decode" else 0  # the prefill instance's token of each request

    def meets(o: GenerationOutput) -> bool:
        if o.tpot is not None and o.tpot > r.tpot_slo:
            return False
        first = ttft(o, r.role)
        if r.ttft_slo is None or first is not None:
            return r.ttft_slo is None or first <= r.ttft_slo
        return r.role == "decode" and len(o.token_times) == 1  # its only token came with its K/V: none to miss

    window_time = sum(s.window for s in r.steps)
    tokens_per_s = r.finetune_tokens / r.wall_s if r.wall_s else 0.0
    generated = sum(max(0, len(o.token_ids) - imported) for o in served)
    return {
        "policy": r.policy,
        "role": r.role,
        "settings": dict(r.settings),
        "tpot_slo_ms": r.tpot_slo * 1e3,
        "tbt_slo_ms": r.tbt_slo * 1e3,
        "ttft_slo_ms": to_ms(r.ttft_slo),
        "requests": len(r.outputs),
        "rejected": len(r.outputs) - len(served),
        "slo_attainment": float(np.mean([meets(o) for o in served])) if served else None,
        "tbt_attainment": float(np.mean(np.array(gaps) <= r.tbt_slo)) if gaps else None,
        "tbt_p50_ms": to_ms(percentile(gaps, 50)), "tbt_p90_ms": to_ms(percentile(gaps, 90)),
        "tbt_p99_ms": to_ms(percentile(gaps, 99)),
        "tpot_p50_ms": to_ms(percentile(tpots, 50)), "tpot_p99_ms": to_ms(percentile(tpots, 99)),
        "ttft_p50_ms": to_ms(percentile(ttfts, 50)), "ttft_p99_ms": to_ms(percentile(ttfts, 99)),
        "decode_tokens_per_s": generated / r.wall_s if r.wall_s else 0.0,
        "finetune_tokens": r.finetune_tokens,
        "finetune_tokens_per_s": tokens_per_s,
        "standalone_tokens_per_s": r.standalone_tokens_per_s,
        "harvest_ratio": tokens_per_s / r.standalone_tokens_per_s if r.standalone_tokens_per_s else None,
        "finetune_steps": r.loss_history[-1]["step"] if r.loss_history and "step" in r.loss_history[-1] else None,
        "finetune_total_steps": r.finetune_total_steps,
        "final_loss": r.loss_history[-1]["loss"] if r.loss_history else None,
        "eval_loss_before": r.eval_before[0] if r.eval_before else None,
        "eval_loss_after": r.eval_after[0] if r.eval_after else None,
        "exact_match_before": r.eval_before[1] if r.eval_before else None,
        "exact_match_after": r.eval_after[1] if r.eval_after else None,
        "reclaims": r.reclaims,
        "abandoned_microbatches": r.abandoned,
        "predictor_mape": r.predictor.get("mape"),
        "predictor_under_prediction": r.predictor.get("under_prediction_rate"),
        "predictor_stages": predictor_stages(r.predictor),
        "scheduler_overhead": sum(s.decision_time for s in r.steps) / window_time if window_time else 0.0,
        "windows_with_training": sum(bool(s.train) for s in r.steps),
        "fused_steps": sum(bool(s.fused) for s in r.steps),
        "fused_by_kind": fused_counts(r.steps),
        "steps": len(r.steps),
        "wall_s": r.wall_s,
        "interrupted": r.interrupted,
    }


# What each policy does, for the printed report (a policy without an entry points to the policies' module).
POLICY_TEXT = {
    "harli": "hybrid: finetune work fused into decode steps (forward windows, backward slices) plus micro-steps "
             "between them, chosen by the latency predictor to fit before each request's next-token deadline "
             "within the SLO",
    "harli-temporal": "harli with nothing fused: its micro-steps between decode steps only (what fusing adds is "
                      "harli over this, at the same SLO)",
    "decode-only": "no training while requests run (the separate-instances baseline)",
    "temporal-K": "K training micro-steps after every K inference steps, SLO-blind (FlexLLM's temporal sharing)",
    "static": "a fixed number of layers of training after every inference step, chosen offline for the peak",
    "cobatch": "FlexLLM's token-level co-serving, SLO-blind: inference tokens first, finetune tokens of a token "
               "chunk fill a fixed per-step token budget, swept offline for the peak",
}
ROLE_TEXT = {"decode": "decode role: requests arrive with their prompt's K/V (prefilled elsewhere), only decode "
                       "runs under the SLO",
             "colocated": "colocated role: prompts are prefilled in chunks on the decoding engine"}
COLUMNS = [("policy", "policy", "{}"), ("tpot_slo_ms", "TPOT SLO ms", "{:.1f}"),
           ("slo_attainment", "TPOT ok", "{:.1%}"), ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
           ("tbt_slo_ms", "TBT cap ms", "{:.1f}"), ("tbt_attainment", "TBT ok", "{:.1%}"),
           ("tbt_p99_ms", "TBT p99 ms", "{:.1f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:.1f}"),
           ("decode_tokens_per_s", "decode tok/s", "{:.0f}"), ("finetune_tokens_per_s", "finetune tok/s", "{:.0f}"),
           ("harvest_ratio", "harvest", "{:.1%}"), ("reclaims", "reclaims", "{}"),
           ("fused_steps", "fused steps", "{}"), ("predictor_mape", "pred MAPE", "{:.1%}"),
           ("exact_match_before", "exact before", "{:.0%}"), ("exact_match_after", "exact after", "{:.0%}")]


def explain(policies: Sequence[str], role: str) -> str:
    """What the table's policies and columns mean, a line each."""
    lines = [f"{p}: {POLICY_TEXT.get(p, 'see harli_jax.runtime.colocation')}" for p in policies]
    lines.append(f"{ROLE_TEXT.get(role, role)}. TPOT ok: requests whose time per output token is within the TPOT "
                 "SLO; TBT ok: gaps between two tokens within the TBT cap.")
    lines.append("harvest: finetune tokens/s during the replay / the job's tokens/s alone on the same device. "
                 "fused steps: decode steps that carried finetune work in the same program. pred MAPE: of the "
                 "windows (the stages are under the table). exact before / after: the finetune job's held-out "
                 "samples that greedy decoding answers exactly with the base model, and with the job's adapter "
                 "after the replay.")
    return "\n".join(lines)


def format_stages(summaries: Sequence[dict[str, Any]]) -> str:
    """A line per policy whose predictor was scored: MAPE and under-prediction rate per stage (inference steps,
    fused steps, windows), with the samples, and its fused steps by kind."""
    lines = []
    for s in summaries:
        stages = s.get("predictor_stages") or {}
        parts = [f"{stage} {_pct(e.get('mape'))} MAPE, {_pct(e.get('under_prediction_rate'))} under "
                 f"({e.get('samples') or 0})" for stage, e in stages.items() if e.get("samples")]
        kinds = ", ".join(f"{k} {n}" for k, n in (s.get("fused_by_kind") or {}).items())
        if parts or kinds:
            lines.append(f"{s['policy']}: predictor {'; '.join(parts) or 'not scored'}"
                         + (f"; fused steps {kinds}" if kinds else ""))
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None or _nan(value) else f"{value:.1%}"


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one row per policy, each column's unit in its title."""
    rows = [[title for _, title, _ in COLUMNS]]
    for s in summaries:
        rows.append([fmt.format(s[key]) if s.get(key) is not None and not _nan(s[key]) else "-"
                     for key, _, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


LOSS_COLUMNS = ("step", "time_s", "loss", "grad_norm", "tokens")


def write_csvs(r: RunResult, directory: Path) -> None:
    """requests-<policy>.csv (one row per request), steps-<policy>.csv (one per inference step, times from the
    start of serving) and loss-<policy>.csv (one per optimizer step)."""
    with (directory / f"requests-{r.policy}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request_id", "arrival_s", "prompt_tokens", "output_tokens", "finish", "ttft_ms", "tpot_ms",
                    "preemptions", "error"])
        for o in r.outputs:
            w.writerow([o.request_id, round(o.arrival_time - r.start, 6), len(o.prompt_ids), len(o.token_ids),
                        o.finish_reason.value, _round_ms(ttft(o, r.role)), _round_ms(o.tpot), o.preemptions,
                        o.error or ""])
    fields = [f.name for f in dataclasses.fields(StepRecord)]
    with (directory / f"steps-{r.policy}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for s in r.steps:
            row = dataclasses.asdict(s)
            row["start"], row["end"] = row["start"] - r.start, row["end"] - r.start
            row["train"] = " ".join(s.train)
            w.writerow([row[k] for k in fields])
    with (directory / f"loss-{r.policy}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LOSS_COLUMNS)
        for h in r.loss_history:
            w.writerow([h.get(k, "") for k in LOSS_COLUMNS])


def _round_ms(seconds: float | None) -> float | str:
    return "" if seconds is None else to_ms(seconds, 3)


def plot(results: Sequence[RunResult], directory: Path) -> list[Path]:
    """PNG plots: per policy a timeline (gaps between tokens against the TBT cap, each request's TPOT against the
    TPOT SLO, finetune loss and throughput, arena occupancy, batch size); with several policies a comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = [_timeline(plt, r, directory) for r in results]
    if len(results) > 1:
        written.append(_comparison(plt, [summarize(r) for r in results], directory))
    return written


def _timeline(plt, r: RunResult, directory: Path) -> Path:
    fig, axes = plt.subplots(5, 1, figsize=(10, 13), sharex=True)
    served = [o for o in r.outputs if o.token_times]
    gaps_t = [b - r.start for o in served for b in o.token_times[1:]]
    gaps = [(b - a) * 1e3 for o in served for a, b in zip(o.token_times, o.token_times[1:], strict=False)]
    axes[0].scatter(gaps_t, gaps, s=3, alpha=0.5, label="gap between two tokens")
    axes[0].axhline(r.tbt_slo * 1e3, color="red", linestyle="--", label=f"TBT cap {r.tbt_slo * 1e3:.1f} ms")
    axes[0].set_ylabel("ms")
    axes[0].set_title(f"{r.policy} ({r.role} role): time between tokens")
    tpot = [(o.token_times[-1] - r.start, o.tpot * 1e3) for o in served if o.tpot is not None]
    axes[1].scatter([t for t, _ in tpot], [v for _, v in tpot], s=8, color="tab:orange",
                    label="request TPOT (at its last token)")
    axes[1].axhline(r.tpot_slo * 1e3, color="red", linestyle="--", label=f"TPOT SLO {r.tpot_slo * 1e3:.1f} ms")
    axes[1].set_ylabel("ms")
    axes[1].set_title("time per output token, per request")
    axes[2].set_title("finetune: loss and trained tokens/s")
    if r.loss_history:
        t = [h["time_s"] for h in r.loss_history]
        loss_line = axes[2].plot(t, [h["loss"] for h in r.loss_history], color="tab:purple", label="loss")
        twin = axes[2].twinx()
        tokens = np.array([h["tokens"] for h in r.loss_history], float)
        rate = np.diff(tokens, prepend=tokens[0]) / np.maximum(np.diff(t, prepend=0.0), 1e-9)
        rate_line = twin.plot(t, _smooth(rate), color="tab:green", label="finetune tokens/s")
        twin.set_ylabel("tokens/s")
        lines = loss_line + rate_line
        axes[2].legend(lines, [line.get_label() for line in lines], loc="upper right")
    else:
        axes[2].plot([], [], color="tab:purple", label="loss (no optimizer step during the replay)")
        axes[2].legend(loc="upper right")
    axes[2].set_ylabel("loss")
    ends = [s.end - r.start for s in r.steps]
    axes[3].stackplot(ends, [s.kv_pages for s in r.steps], [s.lease_pages for s in r.steps],
                      [s.free_pages for s in r.steps], labels=["KV", "trainer lease", "free"])
    axes[3].set_ylabel("pages")
    axes[3].set_title("arena occupancy by owner")
    axes[4].plot(ends, [s.decode_seqs for s in r.steps], drawstyle="steps-post", label="decoding")
    axes[4].plot(ends, [s.prefill_seqs for s in r.steps], drawstyle="steps-post", label="prefilling")
    axes[4].set_ylabel("sequences")
    axes[4].set_xlabel("seconds from the start of the replay")
    axes[4].set_title("batch size per step")
    for ax in (axes[0], axes[1], axes[3], axes[4]):
        ax.legend(loc="upper right")
    fig.tight_layout()
    path = directory / f"timeline-{r.policy}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _comparison(plt, summaries: Sequence[dict[str, Any]], directory: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [s["policy"] for s in summaries]
    bars = axes[0].bar(names, [s["finetune_tokens_per_s"] for s in summaries], color="tab:green",
                       label="trained tokens/s during the replay")
    axes[0].bar_label(bars, fmt="%.0f")
    standalone = summaries[0].get("standalone_tokens_per_s")
    if standalone:
        axes[0].axhline(standalone, color="gray", linestyle=":", label=f"alone {standalone:,.0f}")
    axes[0].set_title("finetune tokens/s")
    axes[0].legend(loc="lower right")
    bars = axes[1].bar(names, [100 * (s["slo_attainment"] or 0) for s in summaries], color="tab:blue",
                       label="requests within the TPOT SLO")
    axes[1].bar_label(bars, fmt="%.1f%%")
    axes[1].axhline(99, color="red", linestyle="--", label="target 99%")
    axes[1].set_ylim(0, 110)
    axes[1].set_title(f"requests within the TPOT SLO {summaries[0]['tpot_slo_ms']:.1f} ms (%)")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    path = directory / "comparison.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _smooth(x: np.ndarray, window: int = 5) -> np.ndarray:
    if len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="same")
