"""EngineConfig, by concern: the arena and its KV cache, the scheduler, the model runner, the served adapters,
co-location and the latency predictor. Every field has its default and help once, here; defaults work on a CPU
for models up to configs/models/small.yaml."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from harli_jax.errors import ConfigError
from harli_jax.model.config import DTYPES, ModelConfig
from harli_jax.model.params import PROJECTIONS
from harli_jax.options import option
from harli_jax.runtime.colocation import POLICIES


def _positive_ints(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{type(config).__name__}.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The arena: its pages, their size, and the context a request may reach."""

    page_tokens: int = option(16, "tokens per arena page")
    max_seq_len: int | None = option(None, "prompt + output tokens per request; unset: min(model context, 2048)")
    num_pages: int | None = option(None, "arena pages (page 0 is the null page); unset: from the device's memory")
    memory_fraction: float = option(0.9, "share of an accelerator's memory for weights, workspace and arena")
    cpu_arena_mb: int = option(512, "arena size on a CPU when num_pages is unset")

    def __post_init__(self):
        _positive_ints(self, "page_tokens", "cpu_arena_mb")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ConfigError(f"CacheConfig.max_seq_len must be positive, got {self.max_seq_len}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(f"CacheConfig.num_pages must be >= 2 (page 0 is the null page), got {self.num_pages}")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"CacheConfig.memory_fraction must be in (0, 1], got {self.memory_fraction}")

    def seq_len(self, model: ModelConfig) -> int:
        return min(self.max_seq_len or 2048, model.max_position_embeddings)

    def max_pages_per_seq(self, model: ModelConfig) -> int:
        return -(-self.seq_len(model) // self.page_tokens)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """What one step may hold, and the program shapes its plans are padded to."""

    max_batch: int = option(32, "sequences per step, decoding and prefilling together")
    prefill_chunk: int = option(64, "prompt tokens per step, shared by the prefilling sequences")
    max_prefill_seqs: int = option(4, "sequences that may prefill in one step (the rows a mixed step's attention "
                                      "reads as chunks)")
    prefill_interval: int = option(1, "steps from one prefill chunk to the next while other sequences decode: "
                                      "a chunk every N steps paces prefill to prefill_chunk/N prompt tokens per "
                                      "step, so the decoding ones keep their TPOT")
    batch_buckets: tuple[int, ...] = option((), "sequences-per-step program shapes; unset: powers of two")
    page_buckets: tuple[int, ...] = option((), "pages-per-sequence program shapes besides the maximum (attention "
                                                "walks only the pages a step's contexts span, so one shape serves "
                                                "every context); unset: the maximum only")
    admission: bool = option(True, "under a TPOT SLO, admit a waiting request only when the predictor says the step "
                                   "with it ends before every decoding request's next-token deadline and the KV "
                                   "every admitted request may still need fits; otherwise it waits")
    queue_timeout_s: float | None = option(None, "seconds a request may wait to be admitted before it is refused "
                                                 "(429 over HTTP); unset: it waits as long as it takes")

    def __post_init__(self):
        _positive_ints(self, "max_batch", "prefill_chunk", "max_prefill_seqs", "prefill_interval")
        if self.queue_timeout_s is not None and not self.queue_timeout_s > 0:
            raise ConfigError(f"SchedulerConfig.queue_timeout_s must be positive, got {self.queue_timeout_s}")
        if any(b <= 0 or b > self.max_batch for b in self.batch_buckets):
            raise ConfigError(f"SchedulerConfig.batch_buckets must lie in [1, max_batch={self.max_batch}], "
                              f"got {self.batch_buckets}")
        if any(p <= 0 for p in self.page_buckets):
            raise ConfigError(f"SchedulerConfig.page_buckets must be positive, got {self.page_buckets}")

    def resolved_batch_buckets(self) -> tuple[int, ...]:
        if self.batch_buckets:
            return tuple(sorted({*self.batch_buckets, self.max_batch}))
        powers = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i < self.max_batch]
        return (*powers, self.max_batch)

    def resolved_page_buckets(self, max_pages_per_seq: int) -> tuple[int, ...]:
        top = max_pages_per_seq
        return tuple(sorted({min(p, top) for p in self.page_buckets} | {top}))


COMPILE_CACHE_HELP = ("JAX's persistent compilation cache directory, or 'off'; unset: ~/.cache/harli_jax/xla, so "
                      "that a second run compiles nothing (JAX's own directory, where set, wins)")


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """The model runner and the engine loop: dtype, attention, compilation, step records."""

    dtype: str | None = option(None, "weights and arena dtype; unset: the model's")
    attention_impl: str = option("auto", "paged attention: auto, pallas or reference")
    compile_threads: int = option(0, "parallel compilations at warm-up; 0: one per CPU core")
    compile_cache_dir: str | None = option(None, COMPILE_CACHE_HELP)
    step_record_limit: int = option(100_000, "newest step records kept (Engine.step_records)")
    max_logprobs: int | None = option(None, "every step also gives each new token's logprob and this many top "
                                            "logprobs (the most a request may ask for); unset: none")
    async_dispatch: bool | None = option(None, "dispatch each decode step before the previous one's tokens are read "
                                               "back (while no finetune job trains); unset: on an accelerator, not on "
                                               "a CPU, where the host's work would take the cores XLA computes on")

    def __post_init__(self):
        _positive_ints(self, "step_record_limit")
        if self.max_logprobs is not None and (isinstance(self.max_logprobs, bool) or
                                              not isinstance(self.max_logprobs, int) or self.max_logprobs < 0):
            raise ConfigError(f"RunnerConfig.max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"RunnerConfig.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.attention_impl not in ("auto", "pallas", "reference"):
            raise ConfigError(f"RunnerConfig.attention_impl must be auto, pallas or reference, "
                              f"got {self.attention_impl!r}")
        if isinstance(self.compile_threads, bool) or not isinstance(self.compile_threads, int) \
                or self.compile_threads < 0:
            raise ConfigError(f"RunnerConfig.compile_threads must be an integer >= 0, got {self.compile_threads!r}")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The LoRA adapters served at once: each resident one has a slot, and one step mixes tokens of any slots."""

    max_loras: int = option(0, "adapters resident at once (a step serves any mix of them and the base model; the "
                               "least recently used idle one makes room for another); 0: the base model only")
    max_cpu_loras: int | None = option(None, "adapters whose weights stay in host memory (least recently used out; "
                                             "one from a directory is read again when a request names it, a job's "
                                             "snapshot always stays); unset: max_loras")
    max_lora_rank: int = option(16, "rank of the resident slots: a served adapter's rank is at most this")
    lora_targets: tuple[str, ...] = option(PROJECTIONS, "projections the resident slots adapt")

    @property
    def adapters_in_memory(self) -> int:
        """How many adapters' weights host memory keeps (`max_cpu_loras`, by default `max_loras`)."""
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras

    def __post_init__(self):
        _positive_ints(self, "max_lora_rank")
        if isinstance(self.max_loras, bool) or not isinstance(self.max_loras, int) or self.max_loras < 0:
            raise ConfigError(f"AdapterConfig.max_loras must be an integer >= 0, got {self.max_loras!r}")
        if self.max_cpu_loras is not None and (isinstance(self.max_cpu_loras, bool)
                                               or not isinstance(self.max_cpu_loras, int)
                                               or self.max_cpu_loras < max(self.max_loras, 1)):
            raise ConfigError(f"AdapterConfig.max_cpu_loras must be an integer >= max_loras ({self.max_loras}) and "
                              f">= 1, or unset, got {self.max_cpu_loras!r}")
        unknown = [t for t in self.lora_targets if t not in PROJECTIONS]
        if unknown or not self.lora_targets:
            raise ConfigError(f"AdapterConfig.lora_targets must be a non-empty subset of {PROJECTIONS}, "
                              f"got {self.lora_targets}")


@dataclasses.dataclass(frozen=True)
class CoLocationConfig:
    """Training a finetune job in decode's slack (see harli_jax.runtime.colocation)."""

    policy: str = option("harli", f"co-location policy: {', '.join(POLICIES)}")
    tpot_slo_ms: float | None = option(None, "time-per-output-token SLO in ms; unset: none")
    tbt_slo_ms: float | None = option(None, "cap on any single gap between two tokens of a request, in ms; unset: "
                                            "twice the TPOT SLO")
    slo_margin: float = option(0.1, "safety margin, a share of the TPOT SLO")
    bank_cap: float = option(1.0, "banked slack usable in one window, in SLOs")
    temporal_k: int = option(2, "temporal-K: K inference steps, then K micro-steps")
    temporal_chunk: int = option(1, "temporal-K: layers per micro-step")
    static_layers: int = option(1, "static: layers of micro-steps after every inference step")
    cobatch_tokens: int = option(64, "cobatch: tokens per step, inference first, finetune tokens fill the rest")
    cobatch_layers: int = option(1, "cobatch: backward layers per step")
    fused_tokens: tuple[int, ...] = option((), "cobatch: positions per row of a token chunk fused into a decode "
                                               "step; unset: the job's seq_len halved as often as it divides, up "
                                               "to 3 times (an eighth)")
    fused_layers: tuple[int, ...] = option((1,), "layers of a backward slice (harli, cobatch) or a forward window "
                                                 "(harli) fused into a decode step")

    @property
    def tbt_cap_ms(self) -> float | None:
        """The cap on a single gap: `tbt_slo_ms`, or twice the TPOT SLO; None without an SLO."""
        if self.tbt_slo_ms is not None:
            return self.tbt_slo_ms
        return None if self.tpot_slo_ms is None else 2 * self.tpot_slo_ms

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"CoLocationConfig.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.tpot_slo_ms is not None and self.tpot_slo_ms <= 0:
            raise ConfigError(f"CoLocationConfig.tpot_slo_ms must be positive, got {self.tpot_slo_ms}")
        if self.tbt_slo_ms is not None and self.tbt_slo_ms <= 0:
            raise ConfigError(f"CoLocationConfig.tbt_slo_ms must be positive, got {self.tbt_slo_ms}")
        if not 0 <= self.slo_margin < 1 or self.bank_cap < 0:
            raise ConfigError("CoLocationConfig.slo_margin must be in [0, 1) and bank_cap >= 0")
        if min(self.temporal_k, self.temporal_chunk) <= 0 or self.static_layers < 0:
            raise ConfigError("CoLocationConfig.temporal_k and temporal_chunk must be positive, static_layers >= 0")
        _positive_ints(self, "cobatch_tokens", "cobatch_layers")
        for name in ("fused_tokens", "fused_layers"):
            sizes = getattr(self, name)
            if any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in sizes):
                raise ConfigError(f"CoLocationConfig.{name} must be positive integers, got {sizes!r}")


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    """The two-stage latency predictor and its calibration sweep."""

    quantile: float = option(0.99, "the share of steps the predicted bound covers")
    calibration_runs: int = option(5, "timed runs per program in the calibration sweep")
    calibration_dir: str | None = option(None, "calibration cache directory; unset: ~/.cache/harli_jax")

    def __post_init__(self):
        _positive_ints(self, "calibration_runs")
        if not 0.5 <= self.quantile < 1:
            raise ConfigError(f"PredictorConfig.quantile must be in [0.5, 1), got {self.quantile}")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """The devices one engine runs over."""

    tensor_parallel: int = option(1, "devices the weights, the arena and every step program are split over "
                                     "(Megatron-style tensor parallelism); it must divide the KV heads, the "
                                     "attention heads, the intermediate size and the device count")

    def __post_init__(self):
        _positive_ints(self, "tensor_parallel")


GROUPS: dict[str, type] = {"cache": CacheConfig, "scheduler": SchedulerConfig, "runner": RunnerConfig,
                           "adapters": AdapterConfig, "colocation": CoLocationConfig, "predictor": PredictorConfig,
                           "parallel": ParallelConfig}
RENAMED = {"predictor_quantile": "quantile"}  # flat names of the first EngineConfig whose group field differs


def _flat_places() -> dict[str, tuple[str, str]]:
    """Each flat (pre-grouping) keyword: (group, field)."""
    places = {f.name: (group, f.name) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
    places.update({old: (places[new][0], new) for old, new in RENAMED.items()})
    return places


FLAT = _flat_places()


@dataclasses.dataclass(frozen=True, init=False)
class EngineConfig:
    """The engine's settings, one group per concern. A flat keyword of a group's field also works
    (`EngineConfig(max_batch=8, tpot_slo_ms=50)` is `EngineConfig(scheduler=SchedulerConfig(max_batch=8),
    colocation=CoLocationConfig(tpot_slo_ms=50))`)."""

    cache: CacheConfig
    scheduler: SchedulerConfig
    runner: RunnerConfig
    adapters: AdapterConfig
    colocation: CoLocationConfig
    predictor: PredictorConfig
    parallel: ParallelConfig

    def __init__(self, **fields: Any):
        groups: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
        given: dict[str, Any] = {}
        for name, value in fields.items():
            if name in GROUPS:
                if not isinstance(value, GROUPS[name]):
                    raise ConfigError(f"EngineConfig.{name} must be a {GROUPS[name].__name__}, got {value!r}")
                given[name] = value
            elif name in FLAT:
                group, field = FLAT[name]
                groups[group][field] = value
            else:
                raise ConfigError(f"EngineConfig has no field {name!r}; groups: {', '.join(GROUPS)}; "
                                  f"fields: {', '.join(sorted(FLAT))}")
        for group, cls in GROUPS.items():
            if group in given and groups[group]:
                raise ConfigError(f"EngineConfig: {sorted(groups[group])} set both flat and in {group}=")
            value = given.get(group) or cls(**{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in groups[group].items()})
            object.__setattr__(self, group, value)

    def __getattr__(self, name: str):
        if name in FLAT:
            group, field = FLAT[name]
            raise AttributeError(f"EngineConfig.{name} is EngineConfig.{group}.{field}")
        raise AttributeError(f"EngineConfig has no attribute {name!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, defaults: Mapping[str, Any] | None = None, **overrides) -> EngineConfig:
        """A YAML mapping of group sections (`scheduler: {max_batch: 8}`) or flat fields (`max_batch: 8`), over
        `defaults` (flat fields) and under `overrides`."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"engine config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: an engine config is a mapping, got {type(data).__name__}")
        flat: dict[str, Any] = {}
        for name, value in data.items():
            if name in GROUPS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{path}: section {name} must be a mapping of {GROUPS[name].__name__} fields")
                known = {f.name for f in dataclasses.fields(GROUPS[name])}
                unknown = sorted(set(value) - known)
                if unknown:
                    raise ConfigError(f"{path}: unknown {name} field(s) {unknown}; known: {sorted(known)}")
                flat.update(value)
            elif name in FLAT:
                flat[name] = value
            else:
                raise ConfigError(f"{path}: unknown engine config field {name!r}; known: {sorted(FLAT)} "
                                  f"or the sections {sorted(GROUPS)}")
        return cls(**{**(defaults or {}), **flat, **overrides})

    def resolved_page_buckets(self, model: ModelConfig) -> tuple[int, ...]:
        return self.scheduler.resolved_page_buckets(self.cache.max_pages_per_seq(model))
