"""`harli replay`: replay an inference trace against the engine with a finetune job running, under one or several
scheduling policies, and write a report (table, JSON, CSVs, plots; optionally a profiler session)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
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
from harli_jax.logs import StatusLine
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.loader import LoadedModel, load_model
from harli_jax.options import field_of, help_of
from harli_jax.replay.report import RunResult, format_table, plot, summarize, write_csvs
from harli_jax.replay.trace import Trace, load_trace, peak_concurrency
from harli_jax.runtime.colocation import POLICIES
from harli_jax.runtime.config import CacheConfig, CoLocationConfig, EngineConfig, SchedulerConfig
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.finetune import FinetuneJob
from harli_jax.runtime.request import FinishedEvent, TokenEvent

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "replay" / "default.yaml"  # the engine and job sizes a replay runs with by default
# Options of the replay itself; the engine's and the job's (FIELDS) take their defaults from their dataclasses.
OWN = {
    "model": (str(REPO / "configs" / "models" / "tiny.yaml"), "HF checkpoint directory or model YAML"),
    "trace": (str(REPO / "configs" / "traces" / "default.csv"),
              "trace file: native CSV, Azure CSV, BurstGPT CSV or Mooncake JSONL"),
    "dataset": (None, "finetune JSONL; unset: the embedded upper-casing task"),
    "tpot_slo": ("4x", "'50ms', or 'Nx' = N times the solo decode step at the trace's peak batch"),
    "ttft_slo": (None, "'500ms'; unset: none"),
    "rate_scale": (1.0, "multiply the arrival rate"),
    "time_scale": (1.0, "stretch the trace's time axis"),
    "duration": (None, "replay only the first N seconds of the trace"),
    "max_requests": (None, "replay only the first N requests"),
    "out": (None, "report directory; unset: runs/<timestamp>/"),
    "profile": (None, "record a JAX profiler session per policy into this directory"),
}
FIELDS = {"policy": (CoLocationConfig, "policy"), "lora_rank": (LoRAConfig, "rank"), "seed": (FinetuneJob, "seed"),
          "max_batch": (SchedulerConfig, "max_batch"), "max_seq_len": (CacheConfig, "max_seq_len"),
          "micro_batch_rows": (FinetuneJob, "micro_batch_rows"), "seq_len": (FinetuneJob, "seq_len")}
TYPES = {"rate_scale": float, "time_scale": float, "duration": float, "max_requests": int, "lora_rank": int,
         "seed": int, "max_batch": int, "max_seq_len": int, "micro_batch_rows": int, "seq_len": int}
log = logging.getLogger("harli_jax")


def _defaults() -> dict:
    own = {name: default for name, (default, _) in OWN.items()}
    return {**own, **{name: field_of(cls, field).default for name, (cls, field) in FIELDS.items()}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harli replay", description=__doc__)
    for name, (default, text) in OWN.items():
        if default is not None:
            text += f" (default {Path(default).relative_to(REPO) if name in ('model', 'trace') else default})"
        p.add_argument(f"--{name.replace('_', '-')}", type=TYPES.get(name, str), help=text)
    preset = _load_options(PRESET)
    for name, (cls, field) in FIELDS.items():
        text = help_of(cls, field, preset.get(name, dataclasses.MISSING))
        text += {"policy": "; comma-separated: one run each on the same trace",
                 "seed": "; also of the prompts and of a YAML model's weights"}.get(name, "")
        p.add_argument(f"--{name.replace('_', '-')}", type=TYPES.get(name, str), help=text)
    p.add_argument("--config", help=f"YAML file with any of these options (flags override it); unset: "
                                    f"{PRESET.relative_to(REPO)}, the sizes of a replay of the tiny model on a CPU")
    return p


def _load_options(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"replay config not found: {path}")
    loaded = {k.replace("-", "_"): v for k, v in (yaml.safe_load(path.read_text()) or {}).items()}
    known = set(OWN) | set(FIELDS)
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown replay option(s) {unknown}; known: {sorted(known)}")
    return loaded


def resolve_options(args: argparse.Namespace) -> dict:
    """The dataclasses' defaults, then the config file (the preset unless --config), then the flags."""
    options = _defaults()
    options.update(_load_options(Path(args.config) if args.config else PRESET))
    options.update({k: v for k, v in vars(args).items() if v is not None and k in options})
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
    max_batch = engine.config.scheduler.max_batch
    at_max = engine.time_decode_step(max_batch)
    peak = max(1, min(max_batch, peak_concurrency(trace, at_max)))
    return engine.time_decode_step(peak), peak


def _detail(decode_tokens: int, job) -> str:
    p = job.progress()
    loss = "-" if p.loss is None else f"{p.loss:.3f}"
    return f"decode tokens {decode_tokens}  finetune step {p.step}  loss {loss}  trained {p.tokens} tokens"


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
    engine.set_tpot_slo(slo_s * 1e3)
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
    progress = StatusLine(f"[{policy}] requests", len(requests), interval_s=5.0, always=True)
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
                progress.update(len(outputs), functools.partial(_detail, decode_tokens, handle))
    except KeyboardInterrupt:
        interrupted = True
    wall = time.perf_counter() - start
    progress.update(len(outputs), functools.partial(_detail, decode_tokens, handle), force=True)
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
        context = CacheConfig(max_seq_len=options["max_seq_len"]).seq_len(model.cfg)
        trace = load_trace(options["trace"]).rescale(
            rate_scale=options["rate_scale"], time_scale=options["time_scale"], max_context=context,
            duration=options["duration"], max_requests=options["max_requests"])
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
