"""The options of `harli replay`: their defaults and help, the config file, and their validation.

Every option is checked here, before a model is loaded or a program compiles (`resolve_options`): a wrong value
is a `ConfigError` that names the option. The replay's own options are in `OWN`; the engine's and the finetune
job's (`FIELDS`) take their defaults and help from their dataclasses; `configs/replay/default.yaml` (the
preset, unless `--config` names another file) overrides the defaults, and flags override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

import harli_jax.configs
from harli_jax.errors import ConfigError, HarliError
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.loader import NAMED_MODELS
from harli_jax.options import field_of, help_of
from harli_jax.runtime.colocation import POLICIES
from harli_jax.runtime.colocator import token_options
from harli_jax.runtime.config import (
    COMPILE_CACHE_HELP,
    CacheConfig,
    CoLocationConfig,
    EngineConfig,
    ParallelConfig,
    PredictorConfig,
    SchedulerConfig,
)
from harli_jax.runtime.finetune import FinetuneJob

CONFIGS = Path(harli_jax.configs.__file__).parent  # configs/, installed with the package
PRESET = CONFIGS / "replay" / "default.yaml"  # the engine and job sizes a replay runs with by default
ROLES = ("decode", "colocated")
# Options of the replay itself; the engine's and the job's (FIELDS) take their defaults from their dataclasses.
OWN = {
    "model": (str(CONFIGS / "models" / "tiny.yaml"), "HF checkpoint directory, GGUF file or model YAML"),
    "trace": (str(CONFIGS / "traces" / "default.csv"),
              "trace file: native CSV, Azure CSV, BurstGPT CSV or Mooncake JSONL"),
    "dataset": (None, "finetune JSONL; unset: the embedded upper-casing task"),
    "role": ("decode", "decode: the decode instance of a prefill/decode-disaggregated deployment (each request "
                       "arrives with its prompt's K/V, computed before the replay by a separate prefill engine, so "
                       "only decode runs under the SLO); colocated: prompts are prefilled on the decoding engine"),
    "policy": ("harli,decode-only", f"co-location policies, comma-separated, one run each on the same trace, "
                                    f"requests and SLO; of {', '.join(POLICIES)}"),
    "tpot_slo": ("4x", "'50ms', or 'Nx' = N times the engine's solo decode step (wall time, host work included) at "
                       "the trace's peak batch, measured once before any policy runs"),
    "tbt_slo": (None, "cap on any single gap between two tokens: '100ms', or 'Nx' of the solo decode step; unset: "
                      "twice the TPOT SLO"),
    "ttft_slo": (None, "'500ms'; unset: none"),
    "prefill_interval": (None, "colocated role: steps from one prefill chunk to the next while others decode; "
                               "unset: the fewest that keep a decoding request's mean gap within the TPOT SLO, from "
                               "a mixed step measured before any policy runs (harli_jax.replay.run."
                               "prefill_interval_for)"),
    "rate_scale": (1.0, "multiply the arrival rate"),
    "time_scale": (1.0, "stretch the trace's time axis"),
    "duration": (None, "replay only the first N seconds of the trace"),
    "max_requests": (None, "replay only the first N requests"),
    "finetune_steps": (None, "optimizer steps of the finetune job (warmup, then cosine decay); unset: what the job "
                             "alone would train over the replay (see harli_jax.replay.run.finetune_steps)"),
    "sweep_requests": (24, "requests from the trace's start that each candidate of an offline-chosen policy knob "
                           "(static: its layers; cobatch: its token budget) replays in the sweep before the "
                           "comparison; 0: no sweep, the knob's default"),
    "out": (None, "report directory; unset: runs/<timestamp>/"),
    "profile": (None, "record a JAX profiler session per policy into this directory"),
    "compilation_cache": (None, f"{COMPILE_CACHE_HELP}; the predictor's calibrations are kept in it too, else in "
                                "the report directory"),
    "export_adapter": (None, "write each policy's trained adapter (HF PEFT: harli generate --adapter, "
                             "Engine.add_adapter, peft) into DIR/<policy>"),
}
FIELDS = {"lora_rank": (LoRAConfig, "rank"), "seed": (FinetuneJob, "seed"),
          "max_batch": (SchedulerConfig, "max_batch"), "prefill_chunk": (SchedulerConfig, "prefill_chunk"),
          "max_seq_len": (CacheConfig, "max_seq_len"),
          "micro_batch_rows": (FinetuneJob, "micro_batch_rows"), "seq_len": (FinetuneJob, "seq_len"),
          "fused_tokens": (CoLocationConfig, "fused_tokens"), "fused_layers": (CoLocationConfig, "fused_layers"),
          "slo_margin": (CoLocationConfig, "slo_margin"),
          "batch_buckets": (SchedulerConfig, "batch_buckets"), "page_buckets": (SchedulerConfig, "page_buckets"),
          "calibration_runs": (PredictorConfig, "calibration_runs"), "tp": (ParallelConfig, "tensor_parallel")}
# Options that are lists of positive integers: comma-separated on the command line, a list (or that text) in YAML.
LISTS = ("fused_tokens", "fused_layers", "batch_buckets", "page_buckets")
# Numeric options: their type and the least value they may take (positive: > 0).
NUMBERS: dict[str, tuple[type, str]] = {
    "rate_scale": (float, "positive"), "time_scale": (float, "positive"), "duration": (float, "positive"),
    "max_requests": (int, "positive"), "finetune_steps": (int, "positive"), "prefill_interval": (int, "positive"),
    "prefill_chunk": (int, "positive"), "slo_margin": (float, "non-negative"), "sweep_requests": (int, "non-negative"),
    "lora_rank": (int, "positive"), "seed": (int, "non-negative"), "max_batch": (int, "positive"),
    "max_seq_len": (int, "positive"), "micro_batch_rows": (int, "positive"), "seq_len": (int, "positive"),
    "calibration_runs": (int, "positive"), "tp": (int, "positive")}
SLO_OPTIONS = ("tpot_slo", "tbt_slo", "ttft_slo")


@dataclasses.dataclass(frozen=True)
class SloSpec:
    """An SLO as given: a time in ms, or a multiple of the measured solo decode step."""

    value: float
    unit: str  # "ms" or "x"

    def seconds(self, solo_step_s: float) -> float:
        return self.value * solo_step_s if self.unit == "x" else self.value / 1e3

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


def defaults() -> dict[str, Any]:
    """Every option's default: the replay's own, then the dataclasses' (before the config file)."""
    own = {name: default for name, (default, _) in OWN.items()}
    return {**own, **{name: field_of(cls, field).default for name, (cls, field) in FIELDS.items()}}


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every option as a flag; values are parsed as text and checked by `resolve_options`."""
    p = argparse.ArgumentParser(prog="harli replay", description=description)
    for name, (default, text) in OWN.items():
        if default is not None:
            text += f" (default {_shown(Path(default)) if name in ('model', 'trace') else default})"
        p.add_argument(f"--{name.replace('_', '-')}", help=text)
    preset = load_config(PRESET)
    for name, (cls, field) in FIELDS.items():
        default = preset.get(name, dataclasses.MISSING)
        if name in LISTS:  # shown as the flag takes it, comma-separated; unset: the help says what applies
            default = field_of(cls, field).default if default is dataclasses.MISSING else default
            default = ",".join(str(n) for n in int_list(name, default)) or None
        text = help_of(cls, field, default)
        if name == "seed":
            text += "; also of the prompts and of a YAML model's weights"
        if name in LISTS:
            text += "; comma-separated, every policy's engine"
        p.add_argument(f"--{name.replace('_', '-')}", help=text)
    p.add_argument("--config", help=f"YAML file with any of these options (flags override it); unset: "
                                    f"{_shown(PRESET)}, the sizes of a replay of the tiny model on a CPU")
    return p


def _shown(path: Path) -> Path:
    """A bundled file as a user would type it here: relative to the working directory if it is under it."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def load_config(path: Path) -> dict[str, Any]:
    """A replay config file: a mapping of option names (dashes or underscores) to values."""
    if not path.is_file():
        raise ConfigError(f"replay config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a replay config is a mapping of options, got {type(data).__name__}")
    loaded = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = set(OWN) | set(FIELDS)
    unknown = sorted(set(loaded) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown replay option(s) {unknown}; known: {sorted(known)}")
    return loaded


def parse_slo(text: Any, what: str) -> SloSpec | None:
    """'50ms', '0.05s' or '3x' (None stays None); `what` names the option in the error."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|x)\s*", str(text))
    if not m:
        raise ConfigError(f"--{what} must look like '50ms', '0.05s' or '3x', got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0:
        raise ConfigError(f"--{what} must be positive, got {text!r}")
    return SloSpec(value, "x") if unit == "x" else SloSpec(value * (1e3 if unit == "s" else 1.0), "ms")


def _number(name: str, value: Any) -> int | float | None:
    """An option's value as its type, checked against its least value (None stays None)."""
    if value is None:
        return None
    kind, least = NUMBERS[name]
    flag = f"--{name.replace('_', '-')}"
    text = str(value).strip()
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ValueError
        number = kind(text)
    except ValueError:
        raise ConfigError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if (least == "positive" and not number > 0) or (least == "non-negative" and not number >= 0):
        raise ConfigError(f"{flag} must be {least}, got {value!r}")
    return number


def int_list(name: str, value: Any) -> tuple[int, ...]:
    """A list option's value: '8,16' (or a YAML list, or one integer) as a tuple of positive integers; None and
    '' are the empty tuple (the engine's default)."""
    flag = f"--{name.replace('_', '-')}"
    if value is None:
        return ()
    if isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    else:
        items = [x for x in str(value).split(",") if x.strip()]
    out = []
    for item in items:
        try:
            if isinstance(item, bool | float):
                raise ValueError
            number = int(str(item).strip())
        except ValueError:
            raise ConfigError(f"{flag} must be positive integers, comma-separated, got {value!r}") from None
        if number <= 0:
            raise ConfigError(f"{flag} must be positive integers, comma-separated, got {value!r}")
        out.append(number)
    return tuple(out)


def policies_of(text: Any) -> list[str]:
    """The comma-separated policy names, each one of `POLICIES` and named once."""
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    bad = [p for p in names if p not in POLICIES]
    if bad or not names:
        raise ConfigError(f"unknown policy {', '.join(bad) or repr(text)}; choose from {', '.join(POLICIES)}")
    twice = sorted({p for p in names if names.count(p) > 1})
    if twice:
        raise ConfigError(f"policy {', '.join(twice)} named more than once in --policy {text!r}")
    return names


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options, typed and checked (a ConfigError names the first wrong one), with `policies` (the list)
    and `slo` (the parsed `SloSpec`s by option name) added. Nothing is loaded or compiled."""
    checked = dict(options)
    for name in NUMBERS:
        checked[name] = _number(name, options.get(name))
    for name in LISTS:
        checked[name] = int_list(name, options.get(name))
    checked["policies"] = policies_of(options["policy"])
    if options["role"] not in ROLES:
        raise ConfigError(f"--role must be one of {', '.join(ROLES)}, got {options['role']!r}")
    slo = {name: parse_slo(options.get(name), name.replace("_", "-")) for name in SLO_OPTIONS}
    if slo["tpot_slo"] is None:
        raise ConfigError("--tpot-slo is required ('50ms' or '4x')")
    if slo["ttft_slo"] is not None and slo["ttft_slo"].unit == "x":
        raise ConfigError(f"--ttft-slo takes a time ('500ms'), not a multiple, got {options['ttft_slo']!r}")
    checked["slo"] = slo
    if checked["prefill_interval"] is not None and options["role"] != "colocated":
        raise ConfigError("--prefill-interval paces prefill on the decoding engine: it applies to --role colocated")
    for name in ("model", "trace", "dataset"):
        named = name == "model" and options.get(name) in NAMED_MODELS
        if options.get(name) is not None and not named and not Path(options[name]).exists():
            raise ConfigError(f"--{name} not found: {options[name]}")
    for name in ("out", "profile", "export_adapter"):
        if options.get(name) is not None and Path(options[name]).is_file():
            raise ConfigError(f"--{name} {options[name]} is a file, not a directory")
    try:  # the dataclasses' own checks, before anything is built from them
        EngineConfig(max_batch=checked["max_batch"], max_seq_len=checked["max_seq_len"],
                     prefill_chunk=checked["prefill_chunk"], slo_margin=checked["slo_margin"],
                     batch_buckets=checked["batch_buckets"], page_buckets=checked["page_buckets"],
                     calibration_runs=checked["calibration_runs"], fused_tokens=checked["fused_tokens"],
                     fused_layers=checked["fused_layers"])
        token_options(checked["seq_len"], checked["fused_tokens"])  # each a halving of the job's seq_len
        FinetuneJob(lora=LoRAConfig(rank=checked["lora_rank"], alpha=2.0 * checked["lora_rank"]),
                    micro_batch_rows=checked["micro_batch_rows"], seq_len=checked["seq_len"], seed=checked["seed"])
    except HarliError as e:
        raise ConfigError(f"{e} (from the replay's options)") from None
    return checked


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """The defaults, then the config file (the preset unless --config), then the flags; checked
    (`check_options`)."""
    options = defaults()
    options.update(load_config(Path(args.config) if args.config else PRESET))
    options.update({k: v for k, v in vars(args).items() if v is not None and k in options})
    return check_options(options)
