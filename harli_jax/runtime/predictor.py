"""The two-stage latency predictor.

Stage 1 (solo): the latency of an inference step from its shape. The step program's padded shape (its bucket)
fixes the work of the weights and of the attention gather; the context actually attended adds KV reads. Per
bucket: latency = a + b * total_context, fitted with scikit-learn on a calibration sweep.

Stage 2 (co-run): the latency of a window = one inference step plus the training micro-steps run after it.
Each micro-step kind (forward or backward chunk of n layers) has its own solo latency; a linear model over
(stage-1 prediction, sum of micro-step predictions, number of micro-steps) is meant to capture their
interference (on one compute stream: dispatch gaps, cache effects). Today stage 2 only *scores*: every
measured window is compared with its prediction (`error_report`, the MAPE and under-prediction that reports
show), and its coefficients are fitted once 16 windows with training were seen, by a `fit()` that the engine
runs only while nothing is being served. No decision uses it: the `harli` policy plans a window with the
stage-1 bound of the next step and the solo bounds of the micro-steps (`micro`), summed.

The scheduler needs a bound, not a mean: every prediction comes with `bound = mean * (1 + margin)`, the margin
calibrated as the `quantile` of the relative residuals, so about 1 - quantile of steps run over their bound.
Fitted models are exported to plain coefficients (a scikit-learn `predict` call is far too slow per
candidate) and cached on disk as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict, deque
from collections.abc import Sequence
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


def _margin(predicted: np.ndarray, actual: np.ndarray, quantile: float) -> float:
    """The `quantile` of actual / predicted - 1: the relative margin that covers that share of the samples."""
    if not len(actual):
        return 0.25
    rel = actual / np.maximum(predicted, 0.5 * np.min(actual)) - 1.0
    return float(max(np.quantile(rel, quantile), 0.0))


class LatencyPredictor:
    def __init__(self, quantile: float = 0.99, history: int = 4096):
        self.quantile = quantile
        self.step_coef: dict[tuple, tuple[float, float]] = {}  # bucket -> (a, b) over total_context
        self.step_margin = 0.25
        self.micro_mean: dict[MicroStepKey, float] = {}
        self.micro_margin = 0.25
        self.window_coef = (0.0, 1.0, 1.0, 0.0)  # intercept, x inference, x sum(micro), x count
        self.window_margin = 0.25
        self._steps: dict[tuple, deque] = defaultdict(lambda: deque(maxlen=256))
        self._micro: dict[MicroStepKey, deque] = defaultdict(lambda: deque(maxlen=256))
        self._windows: deque = deque(maxlen=history)
        self.evaluations: deque = deque(maxlen=history)  # (predicted bound, predicted mean, actual) per window
        self.unfitted = 0  # observations since the last fit
        self.fit_seconds: deque = deque(maxlen=history)  # how long each fit took

    # Fitting ------------------------------------------------------------------------------------------------

    def observe_step(self, bucket: tuple, total_context: int, latency: float) -> None:
        self._steps[bucket].append((total_context, latency))
        self.unfitted += 1

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
        started = time.perf_counter()
        self.unfitted = 0
        preds, actual = [], []
        for bucket, samples in self._steps.items():
            ctx, lat = np.array(samples, float).T
            self.step_coef[bucket] = _fit_line(ctx, lat)
            a, b = self.step_coef[bucket]
            preds.extend(a + b * ctx)
            actual.extend(lat)
        if preds:
            self.step_margin = _margin(np.array(preds), np.array(actual), self.quantile)
        preds, actual = [], []
        for kind, samples in self._micro.items():
            lat = np.array(samples, float)
            self.micro_mean[kind] = float(np.median(lat))
            preds.extend([self.micro_mean[kind]] * len(lat))
            actual.extend(lat)
        if preds:
            self.micro_margin = _margin(np.array(preds), np.array(actual), self.quantile)
        with_micro = [w for w in self._windows if w[2]]
        if len(with_micro) >= 16:
            x = np.array([[self.step(b, c).mean, sum(self.micro(k).mean for k in m), len(m)]
                          for b, c, m, _ in with_micro])
            y = np.array([w[3] for w in with_micro])
            reg = LinearRegression(positive=True).fit(x, y)
            self.window_coef = (float(reg.intercept_), *map(float, reg.coef_))
            self.window_margin = _margin(reg.predict(x), y, self.quantile)
        self.fit_seconds.append(time.perf_counter() - started)

    # Closed-form evaluation (no scikit-learn on the hot path) ------------------------------------------------

    def step(self, bucket: tuple, total_context: int) -> Prediction:
        coef = self.step_coef.get(bucket)
        if coef is None:  # unseen bucket: the slowest known one, to stay on the safe side
            mean = max((a + b * total_context for a, b in self.step_coef.values()), default=math.inf)
        else:
            mean = coef[0] + coef[1] * total_context
        return Prediction(mean, mean * (1 + self.step_margin))

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

    def error_report(self) -> dict[str, float]:
        """MAPE and P99 absolute percentage error of the mean, and the share of windows over their bound."""
        if not self.evaluations:
            return {"windows": 0}
        bound, mean, actual = np.array(self.evaluations, float).T
        ape = np.abs(mean - actual) / np.maximum(actual, 1e-9)
        finite = np.isfinite(ape)
        return {"windows": int(len(actual)), "mape": float(np.mean(ape[finite])) if finite.any() else math.nan,
                "p99_ape": float(np.quantile(ape[finite], 0.99)) if finite.any() else math.nan,
                "under_prediction_rate": float(np.mean(actual > bound))}

    def to_json(self) -> dict:
        return {"quantile": self.quantile,
                "steps": {json.dumps(list(k)): list(v) for k, v in self._steps.items()},
                "micro": {json.dumps(list(k)): list(v) for k, v in self._micro.items()}}

    @classmethod
    def from_json(cls, data: dict) -> LatencyPredictor:
        p = cls(quantile=data["quantile"])
        for k, v in data["steps"].items():
            p._steps[tuple(json.loads(k))].extend(tuple(x) for x in v)
        for k, v in data["micro"].items():
            kind = json.loads(k)
            p._micro[(kind[0], kind[1])].extend(v)
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
