"""Inference traces: arrivals with prompt and output lengths, read from public trace formats or generated.

Formats (`load_trace(path, fmt="auto")`):

- ``native``: CSV with the header ``arrival_s,prompt_tokens,output_tokens`` (seconds from the start); lines
  starting with ``#`` are comments (`Trace.comment`). `write_trace` writes it.
- ``azure``: the Azure LLM inference trace CSV, ``TIMESTAMP,ContextTokens,GeneratedTokens`` (TIMESTAMP a
  date-time such as ``2023-11-16 18:15:46.6805900``).
- ``burstgpt``: the BurstGPT CSV, ``Timestamp,Model,Request tokens,Response tokens,...`` (seconds).
- ``mooncake``: Mooncake JSONL, one ``{"timestamp": ms, "input_length": n, "output_length": m}`` per line.

Arrivals are shifted so the first is at 0 and sorted (simultaneous ones keep the file's order). Malformed rows
are skipped and reported with the file, the row (line) number and the column at fault, e.g. ``t.csv row 7:
prompt_tokens must be an integer, got 'abc'`` (`Trace.problems`); `strict=True` raises at the first. A trace with
no usable row is an error.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from harli_jax.errors import HarliError
from harli_jax.runtime.request import Request, SamplingParams

FORMATS = ("native", "azure", "burstgpt", "mooncake")
NATIVE_HEADER = ("arrival_s", "prompt_tokens", "output_tokens")


class TraceError(HarliError, ValueError):
    """A trace file or generator setting that cannot be used."""


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival: float  # seconds from the start of the trace
    prompt_tokens: int
    output_tokens: int


@dataclasses.dataclass(frozen=True)
class Trace:
    requests: tuple[TraceRequest, ...]
    source: str = "<generated>"
    problems: tuple[str, ...] = ()
    comment: str = ""  # the file's ``#`` lines (how the trace was made), one per line
    shrunk: int = 0  # requests `rescale` shrank to fit its `max_context`

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration(self) -> float:
        return self.requests[-1].arrival if self.requests else 0.0

    def rescale(self, *, rate_scale: float = 1.0, time_scale: float = 1.0, max_context: int | None = None,
                length_scale: float = 1.0, duration: float | None = None, max_requests: int | None = None) -> Trace:
        """Arrivals divided by `rate_scale` and multiplied by `time_scale`; lengths multiplied by `length_scale`
        and then shrunk so prompt + output fits `max_context` (keeping their ratio; counted in `shrunk`); cut at
        `duration` seconds and `max_requests` requests."""
        if rate_scale <= 0 or time_scale <= 0 or length_scale <= 0:
            raise TraceError("rate_scale, time_scale and length_scale must be > 0")
        if (duration is not None and duration <= 0) or (max_requests is not None and max_requests <= 0):
            raise TraceError(f"duration and max_requests must be > 0 when set, got {duration} and {max_requests}")
        out, shrunk = [], 0
        for r in self.requests:
            arrival = r.arrival * time_scale / rate_scale
            if duration is not None and arrival > duration:
                break
            prompt = max(1, round(r.prompt_tokens * length_scale))
            output = max(1, round(r.output_tokens * length_scale))
            if max_context is not None and prompt + output > max_context:
                shrink = max_context / (prompt + output)
                prompt = max(1, math.floor(prompt * shrink))
                output = max(1, min(math.floor(output * shrink), max_context - prompt))
                shrunk += 1
            out.append(TraceRequest(arrival, prompt, output))
            if max_requests is not None and len(out) >= max_requests:
                break
        return dataclasses.replace(self, requests=tuple(out), shrunk=self.shrunk + shrunk)

    def to_requests(self, vocab_size: int, seed: int = 0, low: int = 3) -> list[Request]:
        """Engine requests with random prompt ids (ids >= `low`, past the special ones) and exact output
        lengths (EOS ignored)."""
        rng = np.random.default_rng(seed)
        return [Request(rng.integers(low, vocab_size, r.prompt_tokens).tolist(),
                        SamplingParams(max_tokens=r.output_tokens, ignore_eos=True), arrival=r.arrival,
                        request_id=f"trace-{i}") for i, r in enumerate(self.requests)]


def _rows(path: Path, fmt: str) -> Iterator[tuple[int, dict]]:
    """(row number, record) pairs; row numbers count lines of the file from 1."""
    if fmt == "mooncake":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield line_no, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield line_no, {"__error__": f"invalid JSON ({e.msg})"}
        return
    with path.open(encoding="utf-8", newline="") as f:
        lines = (line for line in f if not line.startswith("#"))
        reader = csv.DictReader(lines)
        for row in reader:
            yield reader.line_num, row


def _comment(path: Path) -> str:
    with path.open(encoding="utf-8") as f:
        return "\n".join(line[1:].strip() for line in f if line.startswith("#"))


def _number(row: dict, column: str, kind: type) -> float | int:
    """`row[column]` as an int or a float; an error naming the column when it is missing or not a number."""
    if column not in row:
        raise KeyError(column)
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{column} is missing")
    try:
        return kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{column} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def _timestamp(row: dict, column: str) -> float:
    """An Azure date-time column (``2023-11-16 18:15:46.6805900``) in seconds since the epoch."""
    value = row.get(column)
    if value is None:
        raise KeyError(column)
    try:
        return datetime.datetime.fromisoformat(value.strip()[:26]).timestamp()
    except ValueError:
        raise ValueError(f"{column} must be a date-time such as 2023-11-16 18:15:46.6805900, got {value!r}") from None


def _parse(fmt: str, row: dict) -> tuple[float, int, int]:
    if "__error__" in row:
        raise ValueError(row["__error__"])
    if fmt == "native":
        return (_number(row, "arrival_s", float), _number(row, "prompt_tokens", int),
                _number(row, "output_tokens", int))
    if fmt == "azure":
        return (_timestamp(row, "TIMESTAMP"), _number(row, "ContextTokens", int),
                _number(row, "GeneratedTokens", int))
    if fmt == "burstgpt":
        return (_number(row, "Timestamp", float), _number(row, "Request tokens", int),
                _number(row, "Response tokens", int))
    return (_number(row, "timestamp", float) / 1e3, _number(row, "input_length", int),
            _number(row, "output_length", int))


def detect_format(path: Path) -> str:
    if path.suffix in (".jsonl", ".json"):
        return "mooncake"
    with path.open(encoding="utf-8") as f:
        header = next((line for line in f if not line.startswith("#")), "")
    columns = {c.strip() for c in header.split(",")}
    if set(NATIVE_HEADER) <= columns:
        return "native"
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= columns:
        return "azure"
    if {"Timestamp", "Request tokens", "Response tokens"} <= columns:
        return "burstgpt"
    raise TraceError(f"{path}: cannot tell the trace format from its header {header.strip()!r}; "
                     f"pass one of {', '.join(FORMATS)}")


def load_trace(path: str | Path, fmt: str = "auto", *, strict: bool = False) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; one of {', '.join(FORMATS)}")
    parsed, problems = [], []
    for row_no, row in _rows(path, fmt):
        try:
            arrival, prompt, output = _parse(fmt, row)
            if not math.isfinite(arrival) or (fmt in ("native", "burstgpt", "mooncake") and arrival < 0):
                raise ValueError(f"the time must be a finite number >= 0, got {arrival}")
            if prompt <= 0 or output <= 0:
                raise ValueError(f"token counts must be positive, got prompt {prompt}, output {output}")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            message = f"{path} row {row_no}: {e if not isinstance(e, KeyError) else f'missing column {e}'}"
            if strict:
                raise TraceError(message) from None
            problems.append(message)
            continue
        parsed.append((arrival, prompt, output))
    if not parsed:
        raise TraceError(f"{path}: no usable request" + (f" ({problems[0]})" if problems else ""))
    parsed.sort(key=lambda row: row[0])
    start = parsed[0][0]
    requests = tuple(TraceRequest(a - start, p, o) for a, p, o in parsed)
    return Trace(requests, str(path), tuple(problems), "" if fmt == "mooncake" else _comment(path))


def write_trace(trace: Trace, path: str | Path, comment: str = "") -> Path:
    """Writes the native CSV, with `comment` lines (say how the trace was made) at the top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        for line in comment.splitlines():
            f.write(f"# {line}\n")
        writer = csv.writer(f)
        writer.writerow(NATIVE_HEADER)
        for r in trace.requests:
            writer.writerow([f"{r.arrival:.6f}", r.prompt_tokens, r.output_tokens])
    return path


# Synthetic traces ---------------------------------------------------------------------------------------------


def _lengths(rng: np.random.Generator, n: int, prompt_mean: float, output_mean: float,
             sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Lognormal lengths with the given means (chat-like: long-tailed, prompts longer than outputs)."""
    def draw(mean):
        return np.maximum(1, np.round(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n))).astype(int)
    return draw(prompt_mean), draw(output_mean)


def synthesize(kind: str, *, num_requests: int, rate: float, seed: int = 0, cv: float = 2.0,
               burst_rate: float | None = None, period: float = 10.0, duty: float = 0.2, amplitude: float = 0.8,
               prompt_mean: float = 100.0, output_mean: float = 40.0, sigma: float = 0.6) -> Trace:
    """A synthetic trace: `poisson` (rate per second), `gamma` (inter-arrival coefficient of variation `cv`:
    bursty above 1), `bursts` (`rate`, and `burst_rate` during the first `duty` of every `period` seconds),
    `diurnal` (rate varying as 1 + amplitude * sin over `period` seconds)."""
    if num_requests <= 0 or rate <= 0:
        raise TraceError("num_requests and rate must be positive")
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        gaps = rng.exponential(1 / rate, num_requests)
    elif kind == "gamma":
        if cv <= 0:
            raise TraceError(f"cv must be > 0, got {cv}")
        shape = 1 / cv**2
        gaps = rng.gamma(shape, 1 / (rate * shape), num_requests)
    elif kind in ("bursts", "diurnal"):
        gaps = _thinned(rng, kind, num_requests, rate, burst_rate or 5 * rate, period, duty, amplitude)
    else:
        raise TraceError(f"unknown synthetic trace kind {kind!r}; one of poisson, gamma, bursts, diurnal")
    arrivals = np.cumsum(gaps) - gaps[0]
    prompts, outputs = _lengths(rng, num_requests, prompt_mean, output_mean, sigma)
    return Trace(tuple(TraceRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs,
                                                                                  strict=True)))


def _thinned(rng, kind, n, rate, burst_rate, period, duty, amplitude) -> np.ndarray:
    """Inter-arrival gaps of a non-homogeneous Poisson process, by thinning."""
    def rate_at(t):
        if kind == "bursts":
            return burst_rate if (t % period) < duty * period else rate
        return rate * (1 + amplitude * math.sin(2 * math.pi * t / period))

    peak = burst_rate if kind == "bursts" else rate * (1 + abs(amplitude))
    times, t = [], 0.0
    while len(times) < n:
        t += rng.exponential(1 / peak)
        if rng.random() * peak <= rate_at(t):
            times.append(t)
    return np.diff(np.array([0.0, *times]))


def peak_concurrency(trace: Trace, seconds_per_token: float) -> int:
    """Requests in flight at the busiest moment if each takes output_tokens * seconds_per_token."""
    events = sorted([(r.arrival, 1) for r in trace.requests]
                    + [(r.arrival + r.output_tokens * seconds_per_token, -1) for r in trace.requests])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


__all__: Sequence[str] = ["FORMATS", "Trace", "TraceError", "TraceRequest", "detect_format", "load_trace",
                          "peak_concurrency", "synthesize", "write_trace"]
