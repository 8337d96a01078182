"""The two-stage latency predictor.

Stage 1 (solo): the latency of an inference step from its shape. The step program's padded shape (its bucket)
fixes the work of the weights and of the attention gather; the context actually attended adds KV reads. Per
bucket: latency = a + b * total_context, fitted with scikit-learn on a calibration sweep.

Stage 2 (co-run): the latency of an inference step with finetune work fused into it (a token chunk or a
backward slice, `lora.fused`), per (bucket, kind, size) the same line over total_context, from online
measurements (before there are any the policy bounds it by the step plus the same work as a micro-step); and
the latency of a window = one inference step plus the training micro-steps run after it, a linear model over
(stage-1 prediction, sum of micro-step predictions, number of micro-steps) that is scored on every window.

What the SLO measures is wall time, so the host's work between one step's window and the next dispatch is
predicted too (`host_bound`, a quantile of recent measurements) and the policy adds it to the next step.

The scheduler needs a bound, not a mean: every prediction comes with `bound = mean * (1 + margin)`. The margin
is split-conformal: the `quantile` (with the finite-sample correction) of actual / predicted - 1 over recent
measurements that were predicted *before* they were fitted, so it tracks the regime the engine runs in (slack
banked, training interleaved); until 32 such exist, the in-sample residuals. The engine refits online, in a
background thread (`fit_async`, installed by `refresh` between steps), so the serving loop never waits for
scikit-learn. Fitted models are exported to plain coefficients (a scikit-learn `predict` call is far too slow
per candidate) and cached on disk as JSON.
`error_report` gives MAPE and the under-prediction rate per stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.linear_model import LinearRegression

MicroStepKey = tuple[str, int]  # (micro-step kind, layers), e.g. ("forward+loss", 4)


@dataclasses.dataclass(frozen=True)
class Prediction:
    mean: float
    bound: float


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of y over x, both non-negative so every prediction is positive; the median when x
    does not vary or a line does not fit that way."""
    if len(x) >= 4 and np.ptp(x) > 0:
        reg = LinearRegression(positive=True).fit(x[:, None], y)
        if reg.intercept_ > 0:
            return float(reg.intercept_), float(reg.coef_[0])
    return float(np.median(y)), 0.0


def _margin(predicted: np.ndarray, actual: np.ndarray, quantile: float, conformal: bool = False) -> float:
    """The `quantile` of actual / predicted - 1: the relative margin that covers that share of the samples;
    `conformal` (held-out samples): the ceil((n + 1) q)-th smallest, split conformal's rank."""
    if not len(actual):
        return 0.25
    rel = actual / np.maximum(predicted, 0.5 * np.min(actual)) - 1.0
    if not conformal:
        return float(max(np.quantile(rel, quantile), 0.0))
    rank = min(len(rel), math.ceil((len(rel) + 1) * quantile)) - 1
    return float(max(np.sort(rel)[rank], 0.0))


HELD_OUT_MIN = 32  # held-out measurements a stage needs before its margin comes from them


def _stage(key: tuple) -> str:
    return "fused" if len(key) > 3 else "step"


def _errors(samples) -> dict[str, float]:
    """MAPE and P99 absolute percentage error of the mean, and the share of measurements over their bound."""
    if not samples:
        return {"samples": 0}
    bound, mean, actual = np.array(samples, float).T
    ape = np.abs(mean - actual) / np.maximum(actual, 1e-9)
    finite = np.isfinite(ape)
    return {"samples": int(len(actual)), "mape": float(np.mean(ape[finite])) if finite.any() else math.nan,
            "p99_ape": float(np.quantile(ape[finite], 0.99)) if finite.any() else math.nan,
            "under_prediction_rate": float(np.mean(actual > bound))}


class LatencyPredictor:
    def __init__(self, quantile: float = 0.99, history: int = 4096):
        self.quantile = quantile
        self.step_coef: dict[tuple, tuple[float, float]] = {}  # bucket -> (a, b) over total_context
        self.step_margin = 0.25
        self.fused_margin = 0.25
        self.micro_mean: dict[MicroStepKey, float] = {}
        self.micro_margin = 0.25
        self.window_coef = (0.0, 1.0, 1.0, 0.0)  # intercept, x inference, x sum(micro), x count
        self.window_margin = 0.25
        self.host = 0.0  # the `quantile` of the host's seconds between a window and the next dispatch
        self._steps: dict[tuple, deque] = defaultdict(lambda: deque(maxlen=256))
        self._micro: dict[MicroStepKey, deque] = defaultdict(lambda: deque(maxlen=256))
        self._windows: deque = deque(maxlen=history)
        self._host: deque = deque(maxlen=512)
        # Held-out (predicted mean, actual) per stage: measured before any fit that includes them.
        self._held_out: dict[str, deque] = defaultdict(lambda: deque(maxlen=512))
        self.evaluations: deque = deque(maxlen=history)  # (predicted bound, predicted mean, actual) per window
        self.stage_evaluations: dict[str, deque] = defaultdict(lambda: deque(maxlen=history))  # same, per stage
        self.unfitted = 0  # observations since the last fit
        self.fit_seconds: deque = deque(maxlen=history)  # how long each fit took
        self._refit: Future | None = None
        self._pool: ThreadPoolExecutor | None = None

    # Fitting ------------------------------------------------------------------------------------------------

    def observe_step(self, bucket: tuple, total_context: int, latency: float) -> None:
        """An inference step's latency; `bucket` with a (kind, size) tail: a fused step's."""
        if bucket in self.step_coef:
            a, b = self.step_coef[bucket]
            mean = a + b * total_context
            stage = _stage(bucket)
            margin = self.fused_margin if stage == "fused" else self.step_margin
            self._held_out[stage].append((mean, latency))
            self.stage_evaluations[stage].append((mean * (1 + margin), mean, latency))
        self._steps[bucket].append((total_context, latency))
        self.unfitted += 1

    def observe_host(self, seconds: float) -> None:
        self._host.append(seconds)

    def observe_micro(self, kind: MicroStepKey, latency: float) -> None:
        self._micro[kind].append(latency)
        self.unfitted += 1

    def observe_window(self, bucket: tuple, total_context: int, micro: Sequence[MicroStepKey], latency: float) -> None:
        """A measured window; also scored against what the predictor says now (held-out: before any refit
        that includes it)."""
        p = self.window(bucket, total_context, micro)
        self.evaluations.append((p.bound, p.mean, latency))
        self._windows.append((bucket, total_context, tuple(micro), latency))

    def fit(self) -> None:
        """Refits every stage from what was observed (calibration sweep and online measurements)."""
        self._install(self._fitted(self._snapshot()))

    def fit_async(self) -> None:
        """Refits in a background thread from a snapshot taken now, unless a refit is still running; `refresh`
        installs the result."""
        if self._refit is not None:
            if not self._refit.done():
                return
            self.refresh()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="harli-predictor-fit")
        self._refit = self._pool.submit(self._fitted, self._snapshot())

    def refresh(self) -> None:
        """Installs a finished background refit, if there is one (on the caller's thread)."""
        if self._refit is not None and self._refit.done():
            done, self._refit = self._refit, None
            self._install(done.result())

    def wait_fit(self) -> None:
        """Waits for a background refit, if one runs, and installs it."""
        if self._refit is not None:
            self._refit.result()
            self.refresh()

    def _snapshot(self) -> dict:
        self.unfitted = 0
        return {"steps": {k: list(v) for k, v in self._steps.items()},
                "micro": {k: list(v) for k, v in self._micro.items()},
                "windows": [w for w in self._windows if w[2]], "host": list(self._host),
                "held_out": {k: list(v) for k, v in self._held_out.items()}}

    def _fitted(self, data: dict) -> dict:
        started = time.perf_counter()
        coef: dict[tuple, tuple[float, float]] = {}
        fits: dict[str, tuple[list, list]] = {"step": ([], []), "fused": ([], [])}
        for bucket, samples in data["steps"].items():
            ctx, lat = np.array(samples, float).T
            coef[bucket] = a, b = _fit_line(ctx, lat)
            preds, actual = fits[_stage(bucket)]
            preds.extend(a + b * ctx)
            actual.extend(lat)
        out = {"step_coef": coef}
        for stage, (preds, actual) in fits.items():
            held = data["held_out"].get(stage, [])
            if len(held) >= HELD_OUT_MIN:
                mean, measured = np.array(held, float).T
                out[f"{stage}_margin"] = _margin(mean, measured, self.quantile, conformal=True)
            elif preds:
                out[f"{stage}_margin"] = _margin(np.array(preds), np.array(actual), self.quantile)
        preds, actual = [], []
        micro_mean = {}
        for kind, samples in data["micro"].items():
            lat = np.array(samples, float)
            micro_mean[kind] = float(np.median(lat))
            preds.extend([micro_mean[kind]] * len(lat))
            actual.extend(lat)
        out["micro_mean"] = micro_mean
        if preds:
            out["micro_margin"] = _margin(np.array(preds), np.array(actual), self.quantile)
        windows = data["windows"]
        if len(windows) >= 16:
            def step_mean(b, c):
                a_b = coef.get(b)
                return a_b[0] + a_b[1] * c if a_b is not None else math.inf

            x = np.array([[step_mean(b, c), sum(micro_mean.get(k, math.inf) for k in m), len(m)]
                          for b, c, m, _ in windows])
            y = np.array([w[3] for w in windows])
            keep = np.isfinite(x).all(axis=1)
            if keep.sum() >= 16:
                reg = LinearRegression(positive=True).fit(x[keep], y[keep])
                out["window_coef"] = (float(reg.intercept_), *map(float, reg.coef_))
                out["window_margin"] = _margin(reg.predict(x[keep]), y[keep], self.quantile)
        if data["host"]:
            out["host"] = float(np.quantile(data["host"], self.quantile))
        out["fit_seconds"] = time.perf_counter() - started
        return out

    def _install(self, fitted: dict) -> None:
        """Takes a fit's results (from `fit`, or a background fit via `refresh`)."""
        self.fit_seconds.append(fitted.pop("fit_seconds"))
        self.step_coef = {**self.step_coef, **fitted.pop("step_coef")}
        for name, value in fitted.items():
            setattr(self, name, value)

    # Closed-form evaluation (no scikit-learn on the hot path) ------------------------------------------------

    def step(self, bucket: tuple, total_context: int) -> Prediction:
        coef = self.step_coef.get(bucket)
        if coef is None:  # unseen bucket: the slowest known one, to stay on the safe side
            mean = max((a + b * total_context for key, (a, b) in self.step_coef.items() if len(key) == 3),
                       default=math.inf)
        else:
            mean = coef[0] + coef[1] * total_context
        return Prediction(mean, mean * (1 + self.step_margin))

    def fused(self, key: tuple, total_context: int) -> Prediction | None:
        """A fused step's latency, `key` = (bucket..., kind, size); None until that shape has been measured."""
        coef = self.step_coef.get(key)
        if coef is None:
            return None
        mean = coef[0] + coef[1] * total_context
        return Prediction(mean, mean * (1 + self.fused_margin))

    def host_bound(self) -> float:
        return self.host

    def micro(self, kind: MicroStepKey) -> Prediction:
        mean = self.micro_mean.get(kind, math.inf)
        return Prediction(mean, mean * (1 + self.micro_margin))

    def window(self, bucket: tuple, total_context: int, micro: Sequence[MicroStepKey]) -> Prediction:
        c0, c_step, c_micro, c_count = self.window_coef
        step = self.step(bucket, total_context)
        if not micro:
            return step
        train = sum(self.micro(k).mean for k in micro)
        mean = c0 + c_step * step.mean + c_micro * train + c_count * len(micro)
        margin = max(self.window_margin, self.step_margin, self.micro_margin)
        return Prediction(mean, mean * (1 + margin))

    # Reporting and persistence ------------------------------------------------------------------------------

    def error_report(self) -> dict:
        """Of the windows: MAPE and P99 absolute percentage error of the mean, and the share over their bound;
        `stages`: the same for inference steps alone (stage 1), fused steps and windows (stage 2), each
        predicted before it was fitted."""
        window = _errors(list(self.evaluations))
        window["windows"] = window.pop("samples")
        stages = {stage: _errors(list(self.stage_evaluations[stage])) for stage in ("step", "fused")}
        stages["window"] = _errors(list(self.evaluations))
        return {**window, "stages": stages}

    def to_json(self) -> dict:
        return {"quantile": self.quantile,
                "steps": {json.dumps(list(k)): list(v) for k, v in self._steps.items()},
                "micro": {json.dumps(list(k)): list(v) for k, v in self._micro.items()},
                "host": list(self._host)}

    @classmethod
    def from_json(cls, data: dict) -> LatencyPredictor:
        p = cls(quantile=data["quantile"])
        for k, v in data["steps"].items():
            p._steps[tuple(json.loads(k))].extend(tuple(x) for x in v)
        for k, v in data["micro"].items():
            kind = json.loads(k)
            p._micro[(kind[0], kind[1])].extend(v)
        p._host.extend(data.get("host", ()))
        p.fit()
        return p

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> LatencyPredictor | None:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError, IndexError):  # a damaged cache: recalibrate
            return None
