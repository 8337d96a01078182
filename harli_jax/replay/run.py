"""`harli replay`: replay an inference trace against the engine with a finetune job running, under one or several
scheduling policies, and write a report (table, JSON, CSVs, plots; optionally a profiler session)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import yaml

from harli_jax.errors import ConfigError, HarliError
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.loader import LoadedModel, load_model
from harli_jax.replay.report import RunResult, format_table, plot, summarize, write_csvs
from harli_jax.replay.trace import Trace, load_trace, peak_concurrency
from harli_jax.runtime.colocation import POLICIES
from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.finetune import FinetuneJob
from harli_jax.runtime.request import FinishedEvent, TokenEvent

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "model": str(REPO / "configs" / "models" / "tiny.yaml"),
    "trace": str(REPO / "configs" / "traces" / "default.csv"),
    "dataset": None,
    "policy": "harli",
    "tpot_slo": "4x",
    "ttft_slo": None,
    "rate_scale": 1.0,
    "time_scale": 1.0,
    "duration": None,
    "max_requests": None,
    "lora_rank": 8,
    "seed": 0,
    "out": None,
    "profile": None,
    "max_batch": 8,
    "max_seq_len": 256,
    "micro_batch_rows": 4,
    "seq_len": 64,
}
log = logging.getLogger("harli_jax")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harli replay", description=__doc__)
    p.add_argument("--model", help="HF checkpoint directory or model YAML (default: configs/models/tiny.yaml)")
    p.add_argument("--trace", help="trace file: native CSV, Azure CSV, BurstGPT CSV or Mooncake JSONL "
                                   "(default: configs/traces/default.csv)")
    p.add_argument("--dataset", help="finetune JSONL (default: the embedded upper-casing task)")
    p.add_argument("--policy", help=f"comma-separated, one run each on the same trace: {', '.join(POLICIES)}")
    p.add_argument("--tpot-slo", help="'50ms', or 'Nx' = N times the solo decode step at the trace's peak batch "
                                      "(default 4x)")
    p.add_argument("--ttft-slo", help="'500ms' (default: none)")
    p.add_argument("--rate-scale", type=float, help="multiply the arrival rate (default 1)")
    p.add_argument("--time-scale", type=float, help="stretch the trace's time axis (default 1)")
    p.add_argument("--duration", type=float, help="replay only the first N seconds of the trace")
    p.add_argument("--max-requests", type=int, help="replay only the first N requests")
    p.add_argument("--lora-rank", type=int, help="LoRA rank of the finetune job (default 8)")
    p.add_argument("--seed", type=int, help="seed of the prompts, the random weights of a YAML model and the job")
    p.add_argument("--out", help="report directory (default runs/<timestamp>/)")
    p.add_argument("--profile", help="record a JAX profiler session per policy into this directory")
    p.add_argument("--config", help="YAML file with any of these options (flags override it), plus max_batch, "
                                    "max_seq_len, micro_batch_rows, seq_len")
    return p


def resolve_options(args: argparse.Namespace) -> dict:
    options = dict(DEFAULTS)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"replay config not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise ConfigError(f"{path}: unknown replay option(s) {unknown}; known: {sorted(DEFAULTS)}")
        options.update({k.replace("-", "_"): v for k, v in loaded.items()})
    options.update({k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS})
    policies = [p.strip() for p in str(options["policy"]).split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise ConfigError(f"unknown policy {bad or options['policy']}; choose from {', '.join(POLICIES)}")
    options["policies"] = policies
    return options


def parse_slo(text: str | None, what: str) -> tuple[str, float] | None:
    """('ms', value) or ('x', multiple)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|x)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--{what} must look like '50ms', '0.05s' or '3x', got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return ("x", value) if unit == "x" else ("ms", value * (1e3 if unit == "s" else 1.0))


def _solo_step(engine: Engine, trace: Trace) -> tuple[float, int]:
    """Median solo decode-step latency at the trace's peak batch (and that batch)."""
    at_max = engine.time_decode_step(engine.config.max_batch)
    peak = max(1, min(engine.config.max_batch, peak_concurrency(trace, at_max)))
    return engine.time_decode_step(peak), peak


class Progress:
    """One status line, rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, total: int, policy: str):
        self.total, self.policy = total, policy
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, done: int, tokens: int, job, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < (0.5 if self.tty else 5.0):
            return
        self.last = now
        p = job.progress()
        loss = "-" if p.loss is None else f"{p.loss:.3f}"
        line = (f"[{self.policy}] requests {done}/{self.total}  decode tokens {tokens}  finetune step {p.step}  "
                f"loss {loss}  trained {p.tokens} tokens")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def run_policy(model: LoadedModel, trace: Trace, policy: str, options: dict, out: Path,
               standalone: float | None) -> tuple[RunResult, float | None]:
    config = EngineConfig(max_batch=options["max_batch"], max_seq_len=options["max_seq_len"], policy=policy,
                          calibration_dir=str(out / "calibration"))
    print(f"[{policy}] compiling the step programs...", file=sys.stderr)
    engine = Engine(model, config)
    slo = parse_slo(options["tpot_slo"], "tpot-slo")
    solo, peak = _solo_step(engine, trace)
    slo_s = slo[1] * solo if slo[0] == "x" else slo[1] / 1e3
    ttft = parse_slo(options["ttft_slo"], "ttft-slo")
    if ttft is not None and ttft[0] == "x":
        raise ConfigError("--ttft-slo takes a time ('500ms'), not a multiple")
    engine.config = dataclasses.replace(engine.config, tpot_slo_ms=slo_s * 1e3)
    print(f"[{policy}] solo decode step at the peak batch {peak}: {solo * 1e3:.2f} ms -> TPOT SLO "
          f"{slo_s * 1e3:.2f} ms", file=sys.stderr)
    job = FinetuneJob(dataset=options["dataset"], lora=LoRAConfig(rank=options["lora_rank"],
                                                                 alpha=2.0 * options["lora_rank"]),
                      micro_batch_rows=options["micro_batch_rows"], seq_len=options["seq_len"], total_steps=10**9,
                      eval_interval=0, eval_fraction=0.0, seed=options["seed"],
                      checkpoint_dir=str(out / f"checkpoint-{policy}"), checkpoint_interval=10**9, name=policy)
    if standalone is None:
        print(f"[{policy}] measuring standalone finetune throughput...", file=sys.stderr)
        probe = engine.finetune(dataclasses.replace(job, checkpoint_dir=None, name="standalone"))
        probe.wait(max_steps=3)
        started, tokens = time.perf_counter(), probe.progress().tokens
        probe.wait(max_steps=20)
        standalone = (probe.progress().tokens - tokens) / (time.perf_counter() - started)
        probe.stop()
        print(f"[{policy}] standalone finetune: {standalone:,.0f} trained tokens/s", file=sys.stderr)
    print(f"[{policy}] calibrating the latency predictor...", file=sys.stderr)
    handle = engine.finetune(job)
    requests = trace.to_requests(model.cfg.vocab_size, seed=options["seed"])
    progress = Progress(len(requests), policy)
    outputs, decode_tokens, interrupted = [], 0, False
    tokens_before, wall_start = handle.progress().tokens, time.time()
    start = time.perf_counter()
    profile = engine.profile(Path(options["profile"]) / policy) if options["profile"] else _NoProfile()
    try:
        with profile:
            for event in engine.serve(requests):
                if isinstance(event, TokenEvent):
                    decode_tokens += 1
                elif isinstance(event, FinishedEvent):
                    outputs.append(event.output)
                progress.update(len(outputs), decode_tokens, handle)
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - start
    progress.update(len(outputs), decode_tokens, handle, force=True)
    progress.close()
    handle.stop()  # a final checkpoint
    if interrupted:
        print(f"\n[{policy}] interrupted: the finetune checkpoint is in {out / f'checkpoint-{policy}'}",
              file=sys.stderr)
    history = [{**h, "time_s": h["time"] - wall_start} for h in handle.history if h["time"] >= wall_start]
    result = RunResult(policy=policy, tpot_slo=slo_s, ttft_slo=None if ttft is None else ttft[1] / 1e3,
                       outputs=outputs, steps=list(engine.step_records), wall_s=wall, start=start,
                       finetune_tokens=handle.progress().tokens - tokens_before, loss_history=history,
                       standalone_tokens_per_s=standalone, predictor=engine.predictor.error_report(),
                       reclaims=engine.arena.table.reclaims, abandoned=handle.progress().abandoned_microbatches,
                       interrupted=interrupted)
    return result, standalone


class _NoProfile:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def write_report(results: list[RunResult], options: dict, trace: Trace, out: Path) -> dict:
    summaries = [summarize(r) for r in results]
    for r in results:
        write_csvs(r, out)
    plots = plot(results, out)
    report = {
        "summary": summaries,
        "options": {k: v for k, v in options.items() if k != "policies"},
        "trace": {"source": trace.source, "requests": len(trace), "duration_s": trace.duration,
                  "problems": list(trace.problems)},
        "environment": {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
                        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
        "plots": [p.name for p in plots],
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("harli_jax").setLevel(logging.WARNING)  # the replay prints its own progress
    try:
        options = resolve_options(args)
        out = Path(options["out"] or Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        out.mkdir(parents=True, exist_ok=True)
        parse_slo(options["tpot_slo"], "tpot-slo")
        model = load_model(options["model"], seed=options["seed"])
        trace = load_trace(options["trace"]).rescale(
            rate_scale=options["rate_scale"], time_scale=options["time_scale"],
            max_context=options["max_seq_len"], duration=options["duration"], max_requests=options["max_requests"])
        for problem in trace.problems[:5]:
            print(f"skipped {problem}", file=sys.stderr)
        print(f"replaying {len(trace)} requests over {trace.duration:.1f}s from {trace.source} on {model.cfg.name} "
              f"with {', '.join(options['policies'])}; report in {out}", file=sys.stderr)
        results, standalone = [], None
        for policy in options["policies"]:
            result, standalone = run_policy(model, trace, policy, options, out, standalone)
            results.append(result)
            if result.interrupted:
                break
    except HarliError as e:
        print(f"harli replay: error: {e}", file=sys.stderr)
        return 2
    report = write_report(results, options, trace, out)
    print(format_table(report["summary"]))
    print(f"\nreport: {out / 'summary.json'}, plots: {', '.join(report['plots'])}, CSVs per policy in {out}",
          file=sys.stderr)
    if options["profile"]:
        print(f"profiler sessions: {options['profile']}/<policy> (open the perfetto_trace.json.gz at "
              "ui.perfetto.dev, or the directory with TensorBoard's profile plugin)", file=sys.stderr)
    return 130 if any(r.interrupted for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
