"""Soak: randomized traffic through `harli serve` for a long time (default 30 minutes), with a fine-tuning job
training all along, watching for what only shows over time: lost requests, leaked pages, a growing RSS, a stalled
job, and the TPOT attainment of the admitted requests during overload.

The run, against one `harli serve --state-dir` subprocess (`--port 0`, a `--max-waiting` bound):
1. job: uploads the embedded upper-casing task to `/v1/files`, creates a fine-tuning job of many epochs through
   `/v1/fine_tuning/jobs` and waits until it has trained some tokens; during the traffic, every `--new-job-every`
   seconds it cancels the job and creates a new one (another seed), under the traffic: a job's start (its
   preparation, compiles and setup) must not stall the streams;
2. calibrate: `max batch` closed-loop streaming clients for `--calibrate` seconds; the finished requests per
   second are the sustainable rate (with the job running);
3. traffic: `--duration` seconds of Poisson arrivals at `--base-load` x that rate, with bursts of `--burst-length`
   seconds (one at a random place in every `--burst-period`) at `--burst-load` (default 3) x the rate. A request is
   streamed and read to its end, streamed and closed by the client after a few chunks (aborted), sent plain and
   given up by the client before it can finish (disconnected), or sent plain and awaited;
4. idle: `--idle` seconds without requests (the job trains on); then the server must hold no KV page and run or
   queue no request; the job is cancelled and the server stopped (SIGTERM: it must exit 0).

Every `--sample-interval` seconds it samples the server's RSS (/proc/PID/status), `/metrics` (arena pages by owner:
kv, lease, free; running and waiting requests; the request counters), the job (status, trained tokens), the size of
the job's state file, the served models, and the TPOT attainment of the requests that finished in the interval.
TPOT is client-side: (last text chunk - first) / (tokens - 1), the token count from the usage chunk, against the
SLO the server printed (`harli serve: TPOT SLO X ms`). Gaps between tokens are held to the server's TBT cap (twice
the SLO) from both ends: the client's, the longest gap between two chunks of the streams whose every token came
with text (a byte-level vocabulary's token may carry part of a character: its text waits for the rest, which is no
stall), and the server's, the inter-token latencies over the cap in `harli:inter_token_latency_seconds` (counted
from its first bucket bound at or above the cap); `harli:engine_thread_compiles_total` must stay 0.
Every request is accounted for: finished (200 with a finish_reason of stop or length), aborted (by this client),
disconnected (by this client), refused (429) or error
(another 4xx); anything else (5xx, a connection error, a timeout this client did not choose, a stream ending
without a finish reason) is lost. The server's own counters (`harli:request_success` by reason plus
`harli:requests_refused`) must add up to the requests this client sent, less at most the disconnected ones (a
client that gives up within milliseconds may do so before the server took its request).

The summary checks the full run's targets: 0 lost requests, 0 KV pages owned when idle, RSS growth under 5% from
the warm-up sample (the first at `--warmup` of the traffic phase) to the last idle one, each job's trained tokens
never decreasing, >= 99% TPOT attainment of the admitted requests (all of them; those that arrived during bursts;
those that ran within a minute of a job's creation), the longest gap between two tokens within the TBT cap, and a
job's record (`job.json`) within JOB_FILE_MAX bytes.

Writes bench/results/soak-<device>.json (every sample, the summary, the lost or failed requests, with --records
every request; the machine) and
soak-<device>.png next to it (or into --out; a --quick run writes only with --out).

    python bench/soak.py                              # small.yaml, 30 minutes of traffic
    python bench/soak.py --quick --out /tmp/soak      # CI: tiny.yaml, 45 s of traffic
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import openai
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harli_jax.lora.data import default_dataset

REPO = Path(__file__).resolve().parents[1]
KINDS = ("stream", "abort", "disconnect", "plain")  # see the module docstring
OUTCOMES = ("finished", "aborted", "disconnected", "refused", "error", "lost")
TARGETS = {"lost_requests": 0, "kv_pages_idle": 0, "rss_growth_max": 0.05, "burst_attainment_min": 0.99,
           "attainment_min": 0.99}
JOB_FILE_MAX = 64 * 1024  # bytes a job's record may take, however long the job runs
JOB_START_S = 60.0  # how long after a job's creation a request counts as running while the job starts


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default configs/models/small.yaml (--quick: tiny.yaml)")
    p.add_argument("--duration", type=float, default=None, help="seconds of traffic (default 1800; --quick: 45)")
    p.add_argument("--calibrate", type=float, default=None, help="seconds of the saturation phase that measures "
                                                                "the sustainable rate (default 60; --quick: 8)")
    p.add_argument("--idle", type=float, default=None, help="seconds without requests after the traffic "
                                                           "(default 30; --quick: 6)")
    p.add_argument("--sample-interval", type=float, default=None, help="seconds between samples (default 5; "
                                                                      "--quick: 2)")
    p.add_argument("--burst-period", type=float, default=None, help="one burst in every this many seconds "
                                                                   "(default 120; --quick: 15)")
    p.add_argument("--burst-length", type=float, default=None, help="seconds of a burst (default 15; --quick: 5)")
    p.add_argument("--burst-load", type=float, default=3.0, help="arrival rate of a burst, x the sustainable rate "
                                                                 "(default 3)")
    p.add_argument("--base-load", type=float, default=0.8, help="arrival rate between bursts, x the sustainable "
                                                                "rate (default 0.8)")
    p.add_argument("--mix", default="0.7,0.1,0.1,0.1", help="shares of stream, abort, disconnect and plain "
                                                            "requests (default 0.7,0.1,0.1,0.1)")
    p.add_argument("--prompt-tokens", default="8,64", help="prompt length range, token ids (default 8,64)")
    p.add_argument("--max-tokens", default="8,48", help="max_tokens range, EOS ignored (default 8,48)")
    p.add_argument("--warmup", type=float, default=0.15, help="share of the traffic phase before the RSS reference "
                                                              "sample (default 0.15)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request this client does not "
                                                                        "give up on may take before it is lost")
    p.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch (default 8)")
    p.add_argument("--max-waiting", type=int, default=16, help="the server's --max-waiting (default 16)")
    p.add_argument("--max-seq-len", type=int, default=128, help="the server's --max-seq-len (default 128)")
    p.add_argument("--tpot-slo", default="4x", help="the server's --tpot-slo (default 4x)")
    p.add_argument("--batch-buckets", default="4,8", help="the engine's sequences-per-step program shapes "
                                                          "(default 4,8: few programs to compile on a CPU)")
    p.add_argument("--fused-tokens", default="8", help="harli's fused token chunks (default 8)")
    p.add_argument("--fused-layers", default="1", help="harli's fused backward slices (default 1)")
    p.add_argument("--checkpoint-steps", type=int, default=50, help="the server's --checkpoint-steps (default 50)")
    p.add_argument("--server-args", default="", help="more `harli serve` flags, one shell-quoted string "
                                                     "(e.g. '--queue-timeout 5')")
    p.add_argument("--new-job-every", type=float, default=None, help="seconds between the traffic's job "
                                                                      "changes: the job cancelled, a new one created "
                                                                      "(default 300; --quick: 30; 0: one job)")
    p.add_argument("--job-epochs", type=int, default=None, help="the fine-tuning job's n_epochs (default 100; "
                                                                   "--quick: 10): enough to train all along")
    p.add_argument("--seed", type=int, default=0, help="the traffic's and the job's seed (default 0)")
    p.add_argument("--records", action="store_true", help="write every request's record into the JSON (large on "
                                                          "a long run; without it only the lost and failed ones)")
    p.add_argument("--quick", action="store_true", help="CI run: tiny.yaml, 45 s of traffic")
    p.add_argument("--out", default=None, help="directory for the JSON and PNG (default bench/results; with "
                                               "--quick nothing is written unless --out is given)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"duration": (1800.0, 45.0), "calibrate": (60.0, 8.0), "idle": (30.0, 6.0),
                "sample_interval": (5.0, 2.0), "job_epochs": (100, 10), "burst_period": (120.0, 15.0),
                "burst_length": (15.0, 5.0), "new_job_every": (300.0, 30.0)}
    for name, (full, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    args.model = args.model or str(REPO / "configs" / "models" / ("tiny.yaml" if quick else "small.yaml"))
    args.mix = [float(x) for x in args.mix.split(",")]
    args.prompt_tokens = [int(x) for x in args.prompt_tokens.split(",")]
    args.max_tokens = [int(x) for x in args.max_tokens.split(",")]
    for name in ("batch_buckets", "fused_tokens", "fused_layers"):
        setattr(args, name, [int(x) for x in getattr(args, name).split(",")])
    if len(args.mix) != len(KINDS) or min(args.mix) < 0 or not sum(args.mix) > 0:
        p.error(f"--mix needs {len(KINDS)} non-negative shares ({', '.join(KINDS)})")
    if args.prompt_tokens[1] + args.max_tokens[1] > args.max_seq_len:
        p.error("--prompt-tokens + --max-tokens must fit in --max-seq-len")
    if not 0 < args.burst_length <= args.burst_period:
        p.error("--burst-length must be in (0, --burst-period]")
    return args


# The server --------------------------------------------------------------------------------------------------


class Server:
    """`harli serve` in a subprocess, its output drained by threads."""

    def __init__(self, args: argparse.Namespace, work: Path):
        engine = {"scheduler": {"batch_buckets": args.batch_buckets},
                  "colocation": {"fused_tokens": args.fused_tokens, "fused_layers": args.fused_layers}}
        (work / "engine.yaml").write_text(yaml.safe_dump(engine))
        self.argv = [sys.executable, "-m", "harli_jax.cli", "serve", "--model", args.model, "--port", "0",
                     "--engine-config", str(work / "engine.yaml"), "--state-dir", str(work / "state"),
                     "--max-batch", str(args.max_batch),
                     "--max-waiting", str(args.max_waiting), "--max-seq-len", str(args.max_seq_len),
                     "--prefill-chunk", "32", "--max-loras", "1", "--finetune-seq-len", "64",
                     "--tpot-slo", args.tpot_slo, "--checkpoint-steps", str(args.checkpoint_steps),
                     "--drain-timeout", "10", "--max-logprobs", "0", "--seed", str(args.seed),
                     *shlex.split(args.server_args)]
        self.process = subprocess.Popen(self.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.log_path = work / "server.log"
        for pipe, into in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._drain, args=(pipe, into), daemon=True).start()

    def _drain(self, pipe, into: list[str]) -> None:
        """Keeps the server's output lines, and writes them to server.log in the work directory as they come."""
        with self.log_path.open("a") as file:
            for line in pipe:
                into.append(line)
                file.write(line)
                file.flush()

    def wait_ready(self, timeout: float = 900.0) -> tuple[str, float]:
        """(URL, TPOT SLO in seconds) once the server listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            urls = [m.group(1) for line in self.stdout if (m := re.search(r"listening on (http://\S+)", line))]
            slos = [float(m.group(1)) for line in self.stderr if (m := re.search(r"TPOT SLO ([\d.]+) ms", line))]
            if urls and slos:
                return urls[0], slos[0] / 1e3
            time.sleep(0.1)
        self.process.kill()
        raise RuntimeError(f"harli serve did not start: {''.join(self.stderr)[-3000:]}")

    def rss_mb(self) -> float | None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(found.group(1)) / 1024 if found else None

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, then the exit status (None: killed after `timeout`)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def read_metrics(url: str) -> dict:
    """The /metrics figures the soak samples."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    values: dict = {"pages": {}, "success": {}, "itl_buckets": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "harli:inter_token_latency_seconds_bucket":
                values["itl_buckets"][s.labels["le"]] = int(s.value)
            elif s.name == "harli:arena_pages":
                values["pages"][s.labels["owner"]] = int(s.value)
            elif s.name == "harli:request_success_total":
                values["success"][s.labels["finished_reason"]] = int(s.value)
            elif s.name in ("harli:num_requests_running", "harli:num_requests_waiting",
                            "harli:finetune_trained_tokens", "harli:requests_refused_total",
                            "harli:slo_violations_total", "harli:step_duration_seconds_count",
                            "harli:engine_thread_compiles_total"):
                values[s.name.removeprefix("harli:")] = int(s.value)
    return values


# Traffic -----------------------------------------------------------------------------------------------------


def bursts(rng: random.Random, args: argparse.Namespace) -> list[tuple[float, float]]:
    """One burst window at a random place in every burst period of the traffic phase."""
    windows = []
    for k in range(int(args.duration // args.burst_period)):
        start = k * args.burst_period + rng.uniform(0, args.burst_period - args.burst_length)
        windows.append((round(start, 3), round(start + args.burst_length, 3)))
    return windows


def in_window(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t < b for a, b in windows)


def request_spec(rng: random.Random, args: argparse.Namespace, kind: str, e2e_s: float) -> dict:
    """A random request of `kind`: prompt token ids, max_tokens, and when this client gives up on it."""
    prompt = [rng.randrange(1, 256) for _ in range(rng.randint(*args.prompt_tokens))]
    spec = {"kind": kind, "prompt": prompt, "max_tokens": rng.randint(*args.max_tokens)}
    if kind == "abort":
        spec["abort_after"] = rng.randint(1, max(1, spec["max_tokens"] // 2))  # text chunks read, then closed
    elif kind == "disconnect":
        spec["max_tokens"] = args.max_tokens[1]
        spec["timeout"] = round(rng.uniform(0.2, 0.6) * e2e_s, 3)  # well before a typical request ends
    return spec


def schedule(rng: random.Random, args: argparse.Namespace, rate: float, e2e_s: float,
             windows: list[tuple[float, float]]) -> list[dict]:
    """Poisson arrivals (by thinning) at `base_load` x `rate`, `burst_load` x `rate` inside the windows."""
    top = max(args.base_load, args.burst_load) * rate
    specs, t = [], 0.0
    while True:
        t += rng.expovariate(top)
        if t >= args.duration:
            return specs
        burst = in_window(t, windows)
        if rng.random() < (args.burst_load if burst else args.base_load) * rate / top:
            kind = rng.choices(KINDS, weights=args.mix)[0]
            specs.append({"at": round(t, 4), "burst": burst, **request_spec(rng, args, kind, e2e_s)})


class Traffic:
    """Sends requests and keeps one record per request, from the server's point of view and this client's."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, args: argparse.Namespace, start: float):
        self.client, self.model, self.args, self.start = client, model, args, start
        self.records: list[dict] = []
        self.in_flight = 0

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def send(self, spec: dict, phase: str) -> dict:
        record = {"phase": phase, **{k: v for k, v in spec.items() if k != "prompt"},
                  "prompt_tokens": len(spec["prompt"]), "sent": round(self.now(), 4)}
        self.records.append(record)
        self.in_flight += 1
        try:
            record.update(await self._send(spec, record["sent"]))
        except openai.RateLimitError:
            record.update(outcome="refused", http_status=429)
        except openai.APITimeoutError:
            record["outcome"] = "disconnected" if spec["kind"] == "disconnect" else "lost"
        except openai.APIStatusError as e:
            record.update(outcome="error" if 400 <= e.status_code < 500 else "lost", http_status=e.status_code,
                          detail=str(e)[:300])
        except openai.APIError as e:  # a connection error, a broken stream
            record.update(outcome="lost", detail=f"{type(e).__name__}: {e}"[:300])
        finally:
            self.in_flight -= 1
            record["end"] = round(self.now(), 4)
        return record

    async def _send(self, spec: dict, sent: float) -> dict:
        create = dict(model=self.model, prompt=spec["prompt"], max_tokens=spec["max_tokens"], temperature=0,
                      extra_body={"ignore_eos": True})
        if spec["kind"] in ("disconnect", "plain"):
            timeout = spec.get("timeout", self.args.request_timeout)
            out = await self.client.with_options(timeout=timeout).completions.create(**create)
            reason = out.choices[0].finish_reason
            return {"outcome": "finished" if reason in ("stop", "length") else "lost", "finish_reason": reason,
                    "tokens": out.usage.completion_tokens}
        stream = await self.client.completions.create(**create, stream=True, stream_options={"include_usage": True})
        chunks: list[float] = []
        reason, tokens = None, None
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices:
                if chunk.choices[0].text:
                    chunks.append(self.now())
                reason = chunk.choices[0].finish_reason or reason
            if spec["kind"] == "abort" and reason is None and len(chunks) >= spec["abort_after"]:
                await stream.close()
                return {"outcome": "aborted", "chunks": len(chunks)}
        result = {"outcome": "finished" if reason in ("stop", "length") else "lost", "finish_reason": reason,
                  "tokens": tokens, "chunks": len(chunks)}
        if chunks:
            result["ttft"] = round(chunks[0] - sent, 4)
            result["first_chunk"], result["last_chunk"] = round(chunks[0], 4), round(chunks[-1], 4)
        if tokens and tokens > 1 and len(chunks) > 1:
            result["tpot"] = round((chunks[-1] - chunks[0]) / (tokens - 1), 6)
            if len(chunks) == tokens:  # every token came with text: a gap between chunks is one between tokens
                result["max_gap"] = round(max(b - a for a, b in itertools.pairwise(chunks)), 6)
        return result

    async def calibrate(self, rng: random.Random, seconds: float, clients: int) -> dict:
        """Closed-loop streaming clients for `seconds`: finished requests per second, median end-to-end time."""
        begin = self.now()
        deadline = begin + seconds

        async def worker() -> None:
            while self.now() < deadline:
                await self.send(request_spec(rng, self.args, "stream", 0.0), "calibrate")

        await asyncio.gather(*(worker() for _ in range(clients)))
        done = [r for r in self.records if r["phase"] == "calibrate" and r["outcome"] == "finished"]
        wall = self.now() - begin
        if not done:
            raise RuntimeError("no request finished while calibrating: the server does not serve")
        return {"seconds": round(wall, 3), "clients": clients, "finished": len(done), "rate": len(done) / wall,
                "e2e_median_s": statistics.median(r["end"] - r["sent"] for r in done)}

    async def replay(self, specs: list[dict], offset: float) -> None:
        """Sends each request at `offset` + its arrival time."""

        async def at(spec: dict) -> None:
            await asyncio.sleep(max(0.0, offset + spec["at"] - self.now()))
            await self.send(spec, "traffic")

        await asyncio.gather(*(at(spec) for spec in specs))


# Sampling ----------------------------------------------------------------------------------------------------


class Sampler:
    """Samples the server, the job and the requests every `interval` seconds while `run` runs."""

    def __init__(self, server: Server, url: str, traffic: Traffic, job_id: str, state_dir: Path, slo_s: float,
                 windows: list[tuple[float, float]]):
        self.server, self.url, self.traffic, self.state_dir = server, url, traffic, state_dir
        self.job_id = job_id  # the job training now (`rotate_jobs` changes it)
        self.slo_s, self.windows = slo_s, windows
        self.phase, self.traffic_start = "calibrate", None
        self.samples: list[dict] = []
        self.errors: list[str] = []  # samples that failed (a /metrics or jobs call that timed out, say)
        self._last = 0.0

    async def sample(self) -> dict:
        t = self.traffic.now()
        metrics = await asyncio.to_thread(read_metrics, self.url)
        job = await self.traffic.client.fine_tuning.jobs.retrieve(self.job_id)
        job_file = self.state_dir / "jobs" / job.id / "job.json"
        served = await self.traffic.client.models.list()
        timed = [r["tpot"] for r in self.traffic.records if "tpot" in r and self._last < r["end"] <= t]
        counts = {o: 0 for o in OUTCOMES}
        for r in self.traffic.records:
            if "outcome" in r:
                counts[r["outcome"]] += 1
        relative = None if self.traffic_start is None else t - self.traffic_start
        sample = {"t": round(t, 3), "phase": self.phase, "traffic_t": None if relative is None else round(relative, 3),
                  "burst": relative is not None and any(a < relative and self._last - self.traffic_start < b
                                                        for a, b in self.windows),
                  "rss_mb": self.server.rss_mb(), "metrics": metrics,
                  "job": {"id": job.id, "status": job.status, "trained_tokens": job.trained_tokens or 0},
                  "job_file_bytes": job_file.stat().st_size if job_file.exists() else None,
                  "served_models": len(served.data), "in_flight": self.traffic.in_flight,
                  "sent": len(self.traffic.records), "outcomes": counts,
                  "interval": {"timed": len(timed),
                               "attainment": sum(x <= self.slo_s for x in timed) / len(timed) if timed else None}}
        self._last = t
        self.samples.append(sample)
        return sample

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                s = await self.sample()
            except (OSError, openai.APIError) as e:
                self.errors.append(f"t={self.traffic.now():.1f}s: {type(e).__name__}: {e}"[:300])
                log(f"a sample failed: {self.errors[-1]}")
                await asyncio.sleep(interval)
                continue
            m, a, rss = s["metrics"], s["interval"]["attainment"], s["rss_mb"]
            log(f"{s['phase']:<9} t={s['t']:7.1f}s rss {'-' if rss is None else f'{rss:.0f}'} MB  pages kv "
                f"{m['pages'].get('kv')} lease {m['pages'].get('lease')} free {m['pages'].get('free')}  running "
                f"{m.get('num_requests_running')} waiting {m.get('num_requests_waiting')}  in flight "
                f"{s['in_flight']}  job {s['job']['trained_tokens']} tokens  attainment "
                f"{'-' if a is None else f'{a:.0%}'}{' (burst)' if s['burst'] else ''}")
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass


# Summary -----------------------------------------------------------------------------------------------------


def attainment(records: list[dict], slo_s: float) -> dict:
    tpots = [r["tpot"] for r in records if "tpot" in r]
    return {"timed": len(tpots), "attainment": sum(x <= slo_s for x in tpots) / len(tpots) if tpots else None,
            "tpot_p50_ms": round(statistics.median(tpots) * 1e3, 3) if tpots else None}


def monotone(values: list[float]) -> bool:
    return all(b >= a for a, b in zip(values, values[1:], strict=False))


def met(value, bound: float, at_least: bool = True) -> bool:
    return value is not None and (value >= bound if at_least else value <= bound)


def summarize(records: list[dict], samples: list[dict], idle: dict, slo_s: float, warmup: float,
              duration: float, job_starts: list[dict] = ()) -> dict:
    """The run's figures and how they compare with the targets (TARGETS); `job_starts` are the jobs created
    during the traffic (`rotate_jobs`)."""
    outcomes = {o: sum(r.get("outcome") == o for r in records) for o in OUTCOMES}
    unanswered = sum("outcome" not in r for r in records)  # a request still pending at the end counts as lost
    outcomes["lost"] += unanswered
    by_kind = {k: {o: sum(r["kind"] == k and r.get("outcome") == o for r in records) for o in OUTCOMES}
               for k in KINDS}
    server = idle["metrics"]
    server_total = sum(server["success"].values()) + server.get("requests_refused_total", 0)
    traffic = [s for s in samples if s["phase"] in ("traffic", "idle")]
    reference = next((s for s in traffic if s["traffic_t"] is not None and s["traffic_t"] >= warmup * duration),
                     None)
    rss_ref = reference["rss_mb"] if reference else None
    rss_last = traffic[-1]["rss_mb"] if traffic else None
    rss_peak = max((s["rss_mb"] for s in traffic if reference and s["t"] >= reference["t"]), default=None)
    tokens = [s["job"]["trained_tokens"] for s in samples]
    by_job: dict[str | None, list[int]] = {}
    for s in samples:
        by_job.setdefault(s["job"].get("id"), []).append(s["job"]["trained_tokens"])
    capacity = max((s["metrics"]["pages"].get("free", 0) for s in samples), default=None)  # free when idle
    served = [r for r in records if r["phase"] == "traffic"]
    burst = attainment([r for r in served if r["burst"]], slo_s)
    starting = attainment([r for r in served if "end" in r and any(
        r["sent"] < j["created"] + JOB_START_S and r["end"] > j["created"] for j in job_starts)], slo_s)
    gaps = [r["max_gap"] for r in served if "max_gap" in r]
    buckets = {float(le): n for le, n in server.get("itl_buckets", {}).items()}
    bound = min((le for le in buckets if le >= 2 * slo_s), default=None)
    itl_over = buckets[math.inf] - buckets[bound] if bound is not None and math.inf in buckets else None
    job_files = [s["job_file_bytes"] for s in samples if s.get("job_file_bytes") is not None]
    summary = {
        "requests": {"sent": len(records), **outcomes, "unanswered": unanswered, "by_kind": by_kind,
                     "accounted_for": len(records) - outcomes["lost"] - outcomes["error"]},
        # A client that gives up early may do so before the server submitted its request: up to the disconnected
        # requests may be missing from the server's counts, and no request may be there more than once.
        "server_counted": {"success": server["success"], "refused": server.get("requests_refused_total", 0),
                           "total": server_total, "unseen": len(records) - server_total,
                           "consistent": 0 <= len(records) - server_total <= outcomes["disconnected"]},
        "idle": idle,
        "pages_after_cancel": {**idle["after_cancel"]["metrics"]["pages"], "capacity": capacity,
                               "all_free": idle["after_cancel"]["metrics"]["pages"].get("free") == capacity},
        "rss_mb": {"warmup_sample_t": reference["t"] if reference else None, "warmup": rss_ref, "last": rss_last,
                   "peak_after_warmup": rss_peak,
                   "growth": rss_last / rss_ref - 1 if rss_ref and rss_last else None,
                   "peak_growth": rss_peak / rss_ref - 1 if rss_ref and rss_peak else None},
        "job": {"trained_tokens_first": tokens[0] if tokens else None, "trained_tokens_last": tokens[-1] if tokens
                else None, "trained_tokens_max": max(tokens, default=None),
                "monotone": all(map(monotone, by_job.values())), "jobs": len(by_job),
                "created_during_traffic": len(job_starts), "record_bytes_max": max(job_files, default=None),
                "statuses": sorted({s["job"]["status"] for s in samples})},
        "attainment": {"traffic": attainment(served, slo_s), "burst": burst,
                       "outside_bursts": attainment([r for r in served if not r["burst"]], slo_s),
                       "job_starts": starting},
        "longest_gap_s": max(gaps, default=None),
        "whole_token_streams": len(gaps),
        "server_itl": {"over_s": bound, "over": itl_over, "total": buckets.get(math.inf)},
        "engine_thread_compiles": server.get("engine_thread_compiles_total"),
    }
    r = summary["rss_mb"]["growth"]
    summary["targets"] = {
        "lost_requests": {"value": outcomes["lost"], "target": "== 0", "met": outcomes["lost"] == 0},
        "kv_pages_idle": {"value": idle["metrics"]["pages"].get("kv"), "target": "== 0",
                          "met": idle["metrics"]["pages"].get("kv") == 0},
        "rss_growth": {"value": r, "target": f"< {TARGETS['rss_growth_max']}",
                       "met": r is not None and r < TARGETS["rss_growth_max"]},
        "job_progress_monotone": {"value": summary["job"]["monotone"], "target": "true",
                                  "met": summary["job"]["monotone"]},
        "burst_attainment": {"value": burst["attainment"], "target": f">= {TARGETS['burst_attainment_min']}",
                             "met": met(burst["attainment"], TARGETS["burst_attainment_min"])},
        "attainment": {"value": summary["attainment"]["traffic"]["attainment"],
                       "target": f">= {TARGETS['attainment_min']}",
                       "met": met(summary["attainment"]["traffic"]["attainment"], TARGETS["attainment_min"])},
        "longest_gap": {"value": summary["longest_gap_s"], "target": f"<= {2 * slo_s:g} s (the TBT cap)",
                        "met": met(summary["longest_gap_s"], 2 * slo_s, at_least=False)},
        "server_gaps_over_cap": {"value": itl_over, "target": f"== 0 over {bound} s", "met": itl_over == 0},
        "engine_thread_compiles": {"value": summary["engine_thread_compiles"], "target": "== 0",
                                   "met": summary["engine_thread_compiles"] == 0},
        "job_record_bytes": {"value": summary["job"]["record_bytes_max"], "target": f"<= {JOB_FILE_MAX}",
                             "met": met(summary["job"]["record_bytes_max"], JOB_FILE_MAX, at_least=False)},
    }
    if job_starts:
        summary["targets"]["job_start_attainment"] = {
            "value": starting["attainment"], "target": f">= {TARGETS['attainment_min']}",
            "met": met(starting["attainment"], TARGETS["attainment_min"])}
    return summary


def plot(samples: list[dict], windows: list[tuple[float, float]], traffic_start: float, slo_s: float,
         path: Path) -> Path | None:
    """RSS, pages by owner, requests in the server, attainment and job progress over time, bursts shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot")
        return None
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples])
    axes[0].set_ylabel("server RSS (MB)")
    for owner in ("kv", "lease", "free"):
        axes[1].plot(t, [s["metrics"]["pages"].get(owner) for s in samples], label=owner)
    axes[1].set_ylabel("arena pages")
    axes[1].legend(loc="upper right")
    for key in ("num_requests_running", "num_requests_waiting"):
        axes[2].plot(t, [s["metrics"].get(key) for s in samples], label=key.split("_")[-1])
    axes[2].plot(t, [s["in_flight"] for s in samples], label="client in flight", linestyle=":")
    axes[2].set_ylabel("requests")
    axes[2].legend(loc="upper right")
    axes[3].plot(t, [s["interval"]["attainment"] for s in samples], marker=".", label="TPOT attainment")
    axes[3].set_ylabel(f"attainment (SLO {slo_s * 1e3:.1f} ms)")
    axes[3].set_ylim(-0.05, 1.05)
    job = axes[3].twinx()
    job.plot(t, [s["job"]["trained_tokens"] for s in samples], color="tab:green", label="job trained tokens")
    job.set_ylabel("job trained tokens")
    axes[3].set_xlabel("seconds since the server listened")
    for ax in axes:
        for a, b in windows:
            ax.axvspan(traffic_start + a, traffic_start + b, color="tab:red", alpha=0.1)
    fig.suptitle("harli serve soak (bursts shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# The run -----------------------------------------------------------------------------------------------------


async def create_job(client: openai.AsyncOpenAI, model: str, seed: int, epochs: int) -> tuple[str, str]:
    """(job id, file id) of a fine-tuning job of `epochs` epochs over the embedded task, once it has trained some
    tokens."""
    data = "".join(json.dumps(r) + "\n" for r in default_dataset(seed=seed)).encode()
    upload = await client.files.create(file=("soak.jsonl", data), purpose="fine-tune")
    job = await client.fine_tuning.jobs.create(model=model, training_file=upload.id, seed=seed,
                                               hyperparameters={"n_epochs": epochs, "batch_size": 2})
    deadline = time.monotonic() + 900
    while (job := await client.fine_tuning.jobs.retrieve(job.id)).status != "running" or not job.trained_tokens:
        if job.status in ("failed", "cancelled", "succeeded") or time.monotonic() > deadline:
            raise RuntimeError(f"the fine-tuning job is {job.status} before the soak: {job.error}")
        await asyncio.sleep(0.5)
    return job.id, upload.id


async def rotate_jobs(client: openai.AsyncOpenAI, model: str, file_id: str, args: argparse.Namespace,
                      sampler: Sampler, stop: asyncio.Event) -> list[dict]:
    """Until `stop`: every `--new-job-every` seconds cancels the job and creates a new one (the next seed) under
    the traffic; returns when each was created (traffic time) and its id."""
    starts: list[dict] = []
    while args.new_job_every > 0:
        try:
            await asyncio.wait_for(stop.wait(), args.new_job_every)
            break
        except TimeoutError:
            pass
        try:
            await client.fine_tuning.jobs.cancel(sampler.job_id)
            created = sampler.traffic.now()
            job = await client.fine_tuning.jobs.create(model=model, training_file=file_id,
                                                       seed=args.seed + len(starts) + 1,
                                                       hyperparameters={"n_epochs": args.job_epochs, "batch_size": 2})
        except openai.APIError as e:
            sampler.errors.append(f"t={sampler.traffic.now():.1f}s: the job change failed: {e}"[:300])
            continue
        sampler.job_id = job.id
        starts.append({"created": round(created, 3), "job_id": job.id})
        log(f"t={created:.1f}s: cancelled the job, created {job.id}")
    return starts


async def settle(url: str, timeout: float = 60.0) -> dict:
    """/metrics once no request runs or waits (the gauges follow the engine's steps; the job keeps it stepping)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = await asyncio.to_thread(read_metrics, url)
        idle = not metrics.get("num_requests_running") and not metrics.get("num_requests_waiting")
        if idle or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.5)


async def soak(args: argparse.Namespace, server: Server, url: str, slo_s: float, state_dir: Path) -> dict:
    rng = random.Random(args.seed)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                timeout=args.request_timeout)
    model = (await client.models.list()).data[0].id
    traffic = Traffic(client, model, args, time.perf_counter())
    log("creating the fine-tuning job and waiting until it trains...")
    started = time.perf_counter()
    job_id, file_id = await create_job(client, model, args.seed, args.job_epochs)
    job_start_s = time.perf_counter() - started
    log(f"the job trains after {job_start_s:.1f} s")
    windows = bursts(rng, args)
    sampler = Sampler(server, url, traffic, job_id, state_dir, slo_s, windows)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler.run(args.sample_interval, stop))
    log(f"calibrating: {args.max_batch} closed-loop clients for {args.calibrate:.0f} s...")
    calibration = await traffic.calibrate(rng, args.calibrate, args.max_batch)
    rate = calibration["rate"]
    specs = schedule(rng, args, rate, calibration["e2e_median_s"], windows)
    log(f"sustainable rate {rate:.2f} requests/s (median e2e {calibration['e2e_median_s']:.2f} s); "
        f"{len(specs)} requests over {args.duration:.0f} s, bursts at {args.burst_load:g}x in {windows}")

    sampler.phase, sampler.traffic_start = "traffic", traffic.now()
    replayed = asyncio.Event()
    rotation = asyncio.create_task(rotate_jobs(client, model, file_id, args, sampler, replayed))
    await traffic.replay(specs, sampler.traffic_start)
    traffic_end = traffic.now()
    replayed.set()
    job_starts = await rotation
    sampler.phase = "idle"
    log(f"traffic done; idle for {args.idle:.0f} s...")
    await asyncio.sleep(args.idle)
    stop.set()
    await sampling
    metrics = await settle(url)
    idle = {"t": round(traffic.now(), 3), "metrics": metrics, "rss_mb": server.rss_mb()}
    job = await client.fine_tuning.jobs.cancel(sampler.job_id)
    await asyncio.sleep(2.0)
    idle["after_cancel"] = {"job_status": job.status, "metrics": await asyncio.to_thread(read_metrics, url)}
    await client.close()
    return {"job_start_s": round(job_start_s, 3), "calibration": calibration, "bursts": windows,
            "traffic_start": sampler.traffic_start, "traffic_end": traffic_end, "job_id": job_id, "idle": idle,
            "job_starts": job_starts,
            "samples": sampler.samples, "sample_errors": sampler.errors, "records": traffic.records}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = common.output_dir(args)
    work = Path(tempfile.mkdtemp(prefix="harli-soak-"))
    log(f"starting harli serve ({args.model})...")
    server = Server(args, work)
    try:
        url, slo_s = server.wait_ready()
        log(f"listening on {url}, TPOT SLO {slo_s * 1e3:.2f} ms; its log: {server.log_path}")
        run = asyncio.run(soak(args, server, url, slo_s, work / "state"))
    finally:
        exit_status = server.stop()
    stopped = any("harli serve: stopped" in line for line in server.stderr)
    summary = summarize(run["records"], run["samples"], run["idle"], slo_s, args.warmup, args.duration,
                        run["job_starts"])
    summary["server_exit"] = {"status": exit_status, "stopped_cleanly": exit_status == 0 and stopped}
    for name, target in summary["targets"].items():
        log(f"{name}: {target['value']} (target {target['target']}: {'met' if target['met'] else 'NOT MET'})")
    log(f"requests: {json.dumps({k: v for k, v in summary['requests'].items() if k != 'by_kind'})}")
    if out is None:
        log("--quick without --out: no result file written")
        return 0
    payload = {"config": vars(args), "server_argv": server.argv[2:], "tpot_slo_ms": slo_s * 1e3,
               "summary": summary, **{k: run[k] for k in ("job_start_s", "calibration", "bursts", "traffic_start",
                                                          "traffic_end", "job_id", "job_starts", "samples",
                                                          "sample_errors")},
               "records": run["records"] if args.records else None,
               "problem_records": [r for r in run["records"] if r.get("outcome", "lost") in ("lost", "error")],
               "server_stderr_tail": "".join(server.stderr)[-4000:]}
    path = common.write_result("soak", payload, out)  # jax.devices() only once the server is gone
    picture = plot(run["samples"], run["bursts"], run["traffic_start"], slo_s, path.with_suffix(".png"))
    log(f"wrote {path}" + (f" and {picture}" if picture else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
