"""What a replay reports: metrics by the definitions of the design, CSVs, a summary table and plots.

TTFT = first token time - arrival. TPOT = (t_last - t_first) / (n_out - 1). TBT = every gap between
consecutive tokens. SLO attainment = share of requests with TPOT <= SLO (and TTFT <= its SLO when set); the
token-level attainment is the share of gaps <= SLO. Finetune throughput = trained tokens per second. Harvest
ratio = co-located finetune tokens/s / standalone finetune tokens/s.
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
    tpot_slo: float  # seconds
    ttft_slo: float | None
    outputs: list[GenerationOutput]
    steps: list[StepRecord]
    wall_s: float
    start: float  # perf_counter at the start of serving
    finetune_tokens: int
    loss_history: list[dict[str, float]]
    standalone_tokens_per_s: float | None
    predictor: dict[str, float]
    reclaims: int
    abandoned: int
    interrupted: bool = False


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0 to 100, linear interpolation) of `values`; None when there are none."""
    return float(np.percentile(values, q)) if len(values) else None


def to_ms(seconds: float | None, decimals: int | None = None) -> float | None:
    """Seconds in milliseconds, rounded to `decimals` when given; None stays None."""
    if seconds is None:
        return None
    return seconds * 1e3 if decimals is None else round(seconds * 1e3, decimals)


def summarize(r: RunResult) -> dict[str, Any]:
    served = [o for o in r.outputs if o.finish_reason is not FinishReason.REJECTED]
    tpots = [o.tpot for o in served if o.tpot is not None]
    ttfts = [o.ttft for o in served if o.ttft is not None]
    gaps = [b - a for o in served for a, b in zip(o.token_times, o.token_times[1:], strict=False)]

    def meets(o: GenerationOutput) -> bool:
        ok = o.tpot is None or o.tpot <= r.tpot_slo
        return ok and (r.ttft_slo is None or (o.ttft is not None and o.ttft <= r.ttft_slo))

    window_time = sum(s.window for s in r.steps)
    tokens_per_s = r.finetune_tokens / r.wall_s if r.wall_s else 0.0
    return {
        "policy": r.policy,
        "tpot_slo_ms": r.tpot_slo * 1e3,
        "requests": len(r.outputs),
        "rejected": len(r.outputs) - len(served),
        "slo_attainment": float(np.mean([meets(o) for o in served])) if served else None,
        "token_slo_attainment": float(np.mean(np.array(gaps) <= r.tpot_slo)) if gaps else None,
        "tbt_p50_ms": to_ms(percentile(gaps, 50)), "tbt_p90_ms": to_ms(percentile(gaps, 90)),
        "tbt_p99_ms": to_ms(percentile(gaps, 99)),
        "tpot_p50_ms": to_ms(percentile(tpots, 50)), "tpot_p99_ms": to_ms(percentile(tpots, 99)),
        "ttft_p50_ms": to_ms(percentile(ttfts, 50)), "ttft_p99_ms": to_ms(percentile(ttfts, 99)),
        "decode_tokens_per_s": sum(len(o.token_ids) for o in served) / r.wall_s if r.wall_s else 0.0,
        "finetune_tokens": r.finetune_tokens,
        "finetune_tokens_per_s": tokens_per_s,
        "harvest_ratio": tokens_per_s / r.standalone_tokens_per_s if r.standalone_tokens_per_s else None,
        "final_loss": r.loss_history[-1]["loss"] if r.loss_history else None,
        "reclaims": r.reclaims,
        "abandoned_microbatches": r.abandoned,
        "predictor_mape": r.predictor.get("mape"),
        "predictor_under_prediction": r.predictor.get("under_prediction_rate"),
        "scheduler_overhead": sum(s.decision_time for s in r.steps) / window_time if window_time else 0.0,
        "windows_with_training": sum(bool(s.train) for s in r.steps),
        "steps": len(r.steps),
        "wall_s": r.wall_s,
        "interrupted": r.interrupted,
    }


COLUMNS = [("policy", "policy", "{}"), ("slo_attainment", "SLO ok", "{:.1%}"), ("tbt_p50_ms", "TBT p50", "{:.1f}"),
           ("tbt_p99_ms", "TBT p99", "{:.1f}"), ("ttft_p50_ms", "TTFT p50", "{:.1f}"),
           ("decode_tokens_per_s", "decode tok/s", "{:.0f}"), ("finetune_tokens_per_s", "ft tok/s", "{:.0f}"),
           ("harvest_ratio", "harvest", "{:.2f}"), ("reclaims", "reclaims", "{}"),
           ("predictor_mape", "pred MAPE", "{:.1%}")]


def format_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A plain-text table, one row per policy (times in ms)."""
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


def write_csvs(r: RunResult, directory: Path) -> None:
    with (directory / f"requests-{r.policy}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request_id", "arrival_s", "prompt_tokens", "output_tokens", "finish", "ttft_ms", "tpot_ms",
                    "preemptions", "error"])
        for o in r.outputs:
            w.writerow([o.request_id, round(o.arrival_time - r.start, 6), len(o.prompt_ids), len(o.token_ids),
                        o.finish_reason.value, _round_ms(o.ttft), _round_ms(o.tpot), o.preemptions, o.error or ""])
    fields = [f.name for f in dataclasses.fields(StepRecord)]
    with (directory / f"steps-{r.policy}.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for s in r.steps:
            row = dataclasses.asdict(s)
            row["start"], row["end"] = row["start"] - r.start, row["end"] - r.start
            row["train"] = " ".join(s.train)
            w.writerow([row[k] for k in fields])


def _round_ms(seconds: float | None) -> float | str:
    return "" if seconds is None else to_ms(seconds, 3)


def plot(results: Sequence[RunResult], directory: Path) -> list[Path]:
    """PNG plots: per policy the TBT over time with the SLO line, finetune progress, arena occupancy and batch
    size; with several policies a comparison chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for r in results:
        fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
        gaps_t, gaps = [], []
        for o in r.outputs:
            for a, b in zip(o.token_times, o.token_times[1:], strict=False):
                gaps_t.append(b - r.start)
                gaps.append((b - a) * 1e3)
        axes[0].scatter(gaps_t, gaps, s=3, alpha=0.5, label="time between tokens")
        axes[0].axhline(r.tpot_slo * 1e3, color="red", linestyle="--", label=f"TPOT SLO {r.tpot_slo * 1e3:.1f} ms")
        axes[0].set_ylabel("ms")
        axes[0].set_title(f"{r.policy}: time between tokens")
        axes[0].legend(loc="upper right")
        if r.loss_history:
            t = [h["time_s"] for h in r.loss_history]
            axes[1].plot(t, [h["loss"] for h in r.loss_history], color="tab:purple", label="loss")
            axes[1].set_ylabel("loss")
            twin = axes[1].twinx()
            tokens = np.array([h["tokens"] for h in r.loss_history], float)
            rate = np.diff(tokens, prepend=tokens[0]) / np.maximum(np.diff(t, prepend=0.0), 1e-9)
            twin.plot(t, _smooth(rate), color="tab:green", label="finetune tokens/s")
            twin.set_ylabel("tokens/s")
            axes[1].set_title("finetune: loss and trained tokens/s")
        ends = [s.end - r.start for s in r.steps]
        axes[2].stackplot(ends, [s.kv_pages for s in r.steps], [s.lease_pages for s in r.steps],
                          [s.free_pages for s in r.steps], labels=["KV", "trainer lease", "free"])
        axes[2].set_ylabel("pages")
        axes[2].set_title("arena occupancy by owner")
        axes[2].legend(loc="upper right")
        axes[3].plot(ends, [s.decode_seqs + s.prefill_seqs for s in r.steps], drawstyle="steps-post")
        axes[3].set_ylabel("sequences")
        axes[3].set_xlabel("seconds")
        axes[3].set_title("batch size per step")
        fig.tight_layout()
        path = directory / f"timeline-{r.policy}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    if len(results) > 1:
        summaries = [summarize(r) for r in results]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        names = [s["policy"] for s in summaries]
        axes[0].bar(names, [s["finetune_tokens_per_s"] for s in summaries], color="tab:green")
        axes[0].set_title("finetune tokens/s")
        axes[1].bar(names, [100 * (s["slo_attainment"] or 0) for s in summaries], color="tab:blue")
        axes[1].axhline(99, color="red", linestyle="--")
        axes[1].set_ylim(0, 100)
        axes[1].set_title("requests within the TPOT SLO (%)")
        fig.tight_layout()
        path = directory / "comparison.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def _smooth(x: np.ndarray, window: int = 5) -> np.ndarray:
    if len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="same")
