"""Shared helpers of the benchmark scripts: the machine's load over a measured region, waiting for a quiet
machine, the interleaved comparison every timed figure goes through, and the result file.

The rules these implement ("benchmarks that cannot flatter"):
- every timed attempt records the CPU share other processes took while it ran (and the steal);
- the sides of a comparison run in interleaved rounds, in a seeded random order per round (recorded);
- an attempt over the load threshold is repeated up to `max_retries` times, after waiting for quiet, and
  otherwise marked `valid: false`; every attempt, valid or not, is returned (and written);
- a side's figure is the median over its valid attempts, a ratio is computed only from valid figures.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def say(message: str) -> None:
    print(message, flush=True)


# Machine load ----------------------------------------------------------------------------------------------


def _cpu_seconds() -> tuple[float, float, int] | None:
    """(busy seconds, steal seconds, CPUs) of the whole machine so far, from /proc/stat; None where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        fields = [int(x) for x in lines[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    cpus = sum(1 for line in lines if re.match(r"cpu\d+ ", line)) or os.cpu_count() or 1
    return (user + nice + system + irq + softirq) / tick, steal / tick, cpus


def _own_cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of the processes it started: those it has waited for
    (getrusage) and those still running (/proc), so that a benchmark's own subprocesses are not other load."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total + _live_descendants_cpu_seconds()


def _live_descendants_cpu_seconds() -> float:
    """CPU seconds so far of this process's running descendants, from /proc/<pid>/stat (0 where unreadable)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
            pid = int(stat.parent.name)
            parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    mine, grown = {os.getpid()}, True
    while grown:
        new = {pid for pid, ppid in parent.items() if ppid in mine and pid not in mine}
        mine |= new
        grown = bool(new)
    return sum(cpu[pid] for pid in mine if pid != os.getpid() and pid in cpu)


class LoadMeter:
    """`with LoadMeter() as m: ...` then `m.record`: over the block, the share of all CPUs that other processes
    used (machine busy time from /proc/stat minus the CPU time of this process and the ones it started, over wall
    time x CPUs), the steal share (time the hypervisor gave the CPUs to someone else), the cores this process and
    its children used, and the load average
    before and after. /proc/stat counts in clock ticks (10 ms per CPU): shares over very short blocks are coarse."""

    def __enter__(self) -> LoadMeter:
        self._start = (time.perf_counter(), _cpu_seconds(), _own_cpu_seconds())
        self._loadavg = round(os.getloadavg()[0], 2)
        self.record: dict[str, Any] = {}
        return self

    def __exit__(self, *exc) -> bool:
        t1, machine1, own1 = time.perf_counter(), _cpu_seconds(), _own_cpu_seconds()
        t0, machine0, own0 = self._start
        wall = max(t1 - t0, 1e-9)
        self.record = {"wall_s": round(wall, 4), "other_processes_cpu_share": None, "steal_share": None,
                       "own_cores_used": round((own1 - own0) / wall, 3),
                       "loadavg_1min_before": self._loadavg, "loadavg_1min_after": round(os.getloadavg()[0], 2)}
        if machine0 and machine1:
            cpus = machine1[2]
            other = (machine1[0] - machine0[0]) - (own1 - own0)
            self.record.update(cpus=cpus, other_processes_cpu_share=round(min(max(other, 0.0) / (wall * cpus), 1.0), 4),
                               steal_share=round((machine1[1] - machine0[1]) / (wall * cpus), 4),
                               share_resolution=round(1 / (os.sysconf("SC_CLK_TCK") * wall * cpus), 4))
        return False


def load_now() -> dict:
    return {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}


def other_cpu_share(seconds: float) -> float | None:
    """The share of all CPUs other processes use over `seconds` while this one sleeps."""
    with LoadMeter() as meter:
        time.sleep(seconds)
    return meter.record["other_processes_cpu_share"]


def wait_for_quiet(max_share: float, timeout: float, sample: float = 5.0, log: Callable = say) -> dict:
    """Waits (up to `timeout` s) until other processes use at most `max_share` of all CPUs over two consecutive
    `sample`-second windows; returns what it saw. With `timeout` <= 0 it only takes one sample."""
    start = time.perf_counter()
    shares: list[float | None] = []
    while True:
        shares.append(other_cpu_share(sample))
        waited = time.perf_counter() - start
        recent = shares[-2:] if timeout > 0 else shares[-1:]
        quiet = len(recent) == (2 if timeout > 0 else 1) and all(s is not None and s <= max_share for s in recent)
        if quiet or waited >= timeout or shares[-1] is None:
            return {"max_share": max_share, "timeout_s": timeout, "sample_s": sample, "waited_s": round(waited, 2),
                    "quiet": quiet, "shares": shares}
        if len(shares) % 6 == 0:
            log(f"  waiting for a quiet machine: other processes use {shares[-1]:.0%} of the CPUs "
                f"({waited:.0f} s so far)")


# Interleaved comparisons -----------------------------------------------------------------------------------


def interleave(sides: dict[str, Callable[[], Any]], rounds: int, *, seed: int, max_share: float, max_retries: int,
               quiet_timeout: float = 0.0, quiet_sample: float = 5.0, quiet_before_each: bool = False,
               meter: Callable = LoadMeter, log: Callable = say,
               describe: Callable[[Any], str] = lambda result: "") -> dict:
    """Runs every side once per round, in a random order per round (from `seed`), each call under `meter`.

    An attempt whose other-processes share is above `max_share` (or unknown) is repeated, after
    `wait_for_quiet(max_share, quiet_timeout)` when `quiet_timeout` > 0 (before every attempt with
    `quiet_before_each`: for long attempts, cheaper than a wasted one), up to `max_retries` times; every
    attempt is kept with `valid` set. Returns {"seed", "rounds", "max_other_share", "max_retries", "order":
    [[side, ...] per round], "attempts": [{"side", "round", "try", "valid", "load", "result", "quiet_wait"?}]},
    where `result` is what the side's function returned. Each attempt is logged with `describe(result)`."""
    rng = random.Random(seed)
    order: list[list[str]] = []
    attempts: list[dict] = []
    for round_index in range(rounds):
        names = list(sides)
        rng.shuffle(names)
        order.append(names)
        for name in names:
            for attempt in range(max_retries + 1):
                quiet = None
                if (attempt or quiet_before_each) and quiet_timeout > 0:
                    quiet = wait_for_quiet(max_share, quiet_timeout, quiet_sample, log)
                with meter() as m:
                    result = sides[name]()
                share = m.record.get("other_processes_cpu_share")
                valid = share is not None and share <= max_share
                entry = {"side": name, "round": round_index, "try": attempt, "valid": valid, "load": m.record,
                         "result": result}
                if quiet is not None:
                    entry["quiet_wait"] = quiet
                attempts.append(entry)
                verdict = "valid" if valid else "over the threshold, " + (
                    "repeating" if attempt < max_retries else "marked invalid")
                log(f"  round {round_index + 1}/{rounds} {name:<18} {describe(result)}  (other processes "
                    f"{'?' if share is None else f'{share:.1%}'} of the CPUs: {verdict})")
                if valid:
                    break
    return {"seed": seed, "rounds": rounds, "max_other_share": max_share, "max_retries": max_retries,
            "order": order, "attempts": attempts}


def valid_results(comparison: dict, side: str) -> list:
    return [a["result"] for a in comparison["attempts"] if a["side"] == side and a["valid"]]


def figure(comparison: dict, side: str, key: str | Callable[[Any], float | None]) -> dict:
    """A side's figure: the median of `key` (a result key, or a function of the result) over its valid attempts
    (None without one), with the number of valid and of all attempts."""
    get = key if callable(key) else (lambda r: r[key])
    valid = valid_results(comparison, side)
    values = [v for v in map(get, valid) if v is not None]
    return {"median": statistics.median(values) if values else None, "valid_attempts": len(valid),
            "attempts": sum(1 for a in comparison["attempts"] if a["side"] == side)}


def ratio(numerator: float | None, denominator: float | None) -> dict:
    """numerator / denominator where both are valid figures; otherwise {"value": None, "valid": False}."""
    if numerator is None or not denominator:
        return {"value": None, "valid": False}
    return {"value": numerator / denominator, "valid": True}


# Probes ----------------------------------------------------------------------------------------------------


def host_copy_bandwidth(mib: int, repeats: int) -> dict:
    """Bytes per second of a large NumPy copy into a preallocated buffer (read + write bytes), best of `repeats`:
    the bandwidth a memory floor divides the weight bytes by."""
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.zeros_like(src)  # touched, so the copies below take no page faults
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        seconds.append(time.perf_counter() - start)
    moved = 2 * src.nbytes
    return {"mib": mib, "bytes": moved, "seconds_best": min(seconds), "seconds_median": statistics.median(seconds),
            "bytes_per_s": moved / min(seconds)}


_DEVICE_COPY = None  # jax.jit(jnp.copy), made on first use


def device_copy_bandwidth(mib: int, repeats: int, iters: int = 10) -> dict:
    """Bytes per second of a large copy on the default device (read + write bytes), best of `repeats`: the
    bandwidth a memory floor divides the bytes a step must read by. On a CPU backend this is
    `host_copy_bandwidth` (a NumPy copy); elsewhere a jitted on-device copy of a `mib` MiB float32 buffer into a
    new one, `iters` copies back to back per repeat (after a warm-up), the time per copy. The same keys as
    `host_copy_bandwidth`, plus "probe" and, on a device, "iters" and "distinct_output" (False would mean the
    copy was elided: the figure is then meaningless)."""
    if jax.default_backend() == "cpu":
        return {**host_copy_bandwidth(mib, repeats), "probe": "numpy copyto (host)"}
    global _DEVICE_COPY
    if _DEVICE_COPY is None:
        _DEVICE_COPY = jax.jit(jnp.copy)
    src = jax.block_until_ready(jnp.ones((mib * 2**20 // 4,), jnp.float32))
    out = jax.block_until_ready(_DEVICE_COPY(src))  # compile, warm up
    distinct = out.unsafe_buffer_pointer() != src.unsafe_buffer_pointer()
    del out
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = _DEVICE_COPY(src)
        jax.block_until_ready(out)
        seconds.append((time.perf_counter() - start) / iters)
        del out
    moved = 2 * src.nbytes
    return {"mib": mib, "bytes": moved, "seconds_best": min(seconds), "seconds_median": statistics.median(seconds),
            "bytes_per_s": moved / min(seconds), "probe": f"jax.jit(jnp.copy) on {jax.devices()[0].device_kind}",
            "iters": iters, "distinct_output": distinct}


# Results ---------------------------------------------------------------------------------------------------


_RUN_START = load_now()  # the process's start (the scripts import this module first)
_RUN_METER = LoadMeter().__enter__()  # the whole run's load, closed by write_result


def device_name() -> str:
    """The first device's kind as a file-name-safe slug, e.g. "nvidia-h100-80gb-hbm3" or "cpu"."""
    return re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower()).strip("-")


def git_commit() -> dict:
    """The commit the benchmark ran at, and whether the work tree differed from it (None outside a git clone)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=RESULTS_DIR.parent.parent, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def write_result(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    """Writes `payload` with the command line, git commit, machine, JAX version, date and the load at the start and
    end to <out_dir or bench/results>/<name>-<device>.json."""
    _RUN_METER.__exit__(None, None, None)
    record = {
        "benchmark": name,
        "command": {"argv": list(sys.argv), "shell": shlex.join(["python", *sys.argv]), "cwd": os.getcwd()},
        "git": git_commit(),
        "machine": {
            "node": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "device_kind": jax.devices()[0].device_kind,
            "device_count": jax.device_count(),
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
        },
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine_load": {"start": _RUN_START, "end": load_now(), "whole_run": _RUN_METER.record},
        **payload,
    }
    directory = Path(out_dir) if out_dir is not None else RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-{device_name()}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def write_result_on_sigterm(name: str, partial_payload: Callable[[], dict], out_dir: str | Path | None) -> None:
    """Installs a SIGTERM handler (`timeout` sends SIGTERM) that writes `partial_payload()` with
    "incomplete" set through `write_result(name, ..., out_dir)`, then ends the process at once (exit status
    143): a part of a run cut short by its time limit still leaves what it measured. The handler runs between
    Python bytecodes, so a long XLA compile delays it; `timeout -k` should allow for that."""

    def handler(signum, _frame):
        try:
            payload = dict(partial_payload())
            payload["incomplete"] = f"stopped by signal {signum} before the run finished"
            say(f"signal {signum}: wrote the partial result {write_result(name, payload, out_dir)}")
        except BaseException as error:  # noqa: BLE001 - the process ends either way
            say(f"signal {signum}: could not write the partial result: {type(error).__name__}: {error}")
        finally:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# Command line ----------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The flags every benchmark shares: the load threshold, retries, waiting for quiet, the output directory."""
    parser.add_argument("--max-other-share", type=float, default=0.10,
                        help="an attempt during which other processes used more than this share of all CPUs is "
                             "repeated, then marked invalid (default 0.10)")
    parser.add_argument("--max-retries", type=int, default=None,
                        help="repeats of an attempt over the threshold (default 2; 0 with --quick)")
    parser.add_argument("--quiet-timeout", type=float, default=None,
                        help="longest wait for a quiet machine before the run and before a repeat, seconds "
                             "(default 300; 0 with --quick: one sample, no waiting)")
    parser.add_argument("--quiet-sample", type=float, default=None,
                        help="length of one load sample while waiting, seconds (default 5; 0.2 with --quick)")
    parser.add_argument("--out", default=None,
                        help="directory for the JSON result (default bench/results; with --quick nothing is written "
                             "unless --out is given)")


def comparison_settings(args) -> dict:
    """`interleave`'s load keywords from the flags of `add_arguments` (quick defaults where not given)."""
    timeout = args.quiet_timeout if args.quiet_timeout is not None else (0.0 if args.quick else 300.0)
    sample = args.quiet_sample if args.quiet_sample is not None else (0.2 if args.quick else 5.0)
    retries = args.max_retries if args.max_retries is not None else (0 if args.quick else 2)
    return {"max_share": args.max_other_share, "max_retries": retries, "quiet_timeout": timeout,
            "quiet_sample": sample}


def output_dir(args) -> Path | None:
    """Where the result goes: --out, else bench/results for a full run, else nowhere (a --quick run)."""
    if args.out:
        return Path(args.out)
    return None if args.quick else RESULTS_DIR


def save(name: str, payload: dict, args) -> None:
    """`write_result` into `output_dir(args)`, saying where, or that a --quick run without --out writes nothing."""
    out = output_dir(args)
    if out is None:
        say("--quick without --out: no result file written")
        return
    say(f"wrote {write_result(name, payload, out)}")
