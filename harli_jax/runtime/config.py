"""EngineConfig: arena size, shape buckets, batching limits, dtype, SLO."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from harli_jax.errors import ConfigError
from harli_jax.model.config import DTYPES, ModelConfig
from harli_jax.runtime.colocation import POLICIES


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Every field has a default that works on a CPU for models up to configs/models/small.yaml."""

    max_batch: int = 32  # sequences per step (decoding and prefilling together)
    prefill_chunk: int = 64  # prompt tokens per step, shared by the prefilling sequences
    page_tokens: int = 16
    max_seq_len: int | None = None  # prompt + output tokens per request; default min(model context, 2048)
    num_pages: int | None = None  # arena pages (page 0 is the null page); default from memory
    memory_fraction: float = 0.9  # of an accelerator's memory for weights + workspace + arena
    cpu_arena_mb: int = 512  # arena size on a CPU when num_pages is not set
    batch_buckets: tuple[int, ...] = ()  # default: powers of two up to max_batch
    page_buckets: tuple[int, ...] = ()  # pages-per-sequence buckets; default: x4 steps up to the maximum
    dtype: str | None = None  # weights and arena; default the model's
    attention_impl: str = "auto"  # harli_jax.kernels.paged_attention impl
    tpot_slo_ms: float | None = None
    compile_threads: int = 0  # parallel compilation at warm-up; 0 = one per CPU core
    # Co-location of a finetune job with serving (see harli_jax.runtime.colocation).
    policy: str = "harli"  # harli | decode-only | temporal-K | static
    slo_margin: float = 0.1  # safety margin, a fraction of the TPOT SLO
    bank_cap: float = 1.0  # banked slack usable in one window, in SLOs
    temporal_k: int = 2  # temporal-K: K inference steps, then K micro-steps
    temporal_chunk: int = 1  # temporal-K: layers per micro-step
    static_layers: int = 1  # static: layers of micro-steps after every inference step
    predictor_quantile: float = 0.99  # the predictor's bound covers this share of steps
    calibration_runs: int = 5  # timed runs per program in the calibration sweep
    calibration_dir: str | None = None  # predictor cache; default ~/.cache/harli_jax
    step_record_limit: int = 100_000  # newest step records kept (Engine.step_records)

    def __post_init__(self):
        for name in ("max_batch", "prefill_chunk", "page_tokens", "cpu_arena_mb", "step_record_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        if self.max_seq_len is not None and self.max_seq_len <= 0:
            raise ConfigError(f"EngineConfig.max_seq_len must be positive, got {self.max_seq_len}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(f"EngineConfig.num_pages must be >= 2 (page 0 is the null page), got {self.num_pages}")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"EngineConfig.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"EngineConfig.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.attention_impl not in ("auto", "pallas", "reference"):
            raise ConfigError(f"EngineConfig.attention_impl must be auto, pallas or reference, "
                              f"got {self.attention_impl!r}")
        if self.tpot_slo_ms is not None and self.tpot_slo_ms <= 0:
            raise ConfigError(f"EngineConfig.tpot_slo_ms must be positive, got {self.tpot_slo_ms}")
        if self.policy not in POLICIES:
            raise ConfigError(f"EngineConfig.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not 0 <= self.slo_margin < 1 or self.bank_cap < 0:
            raise ConfigError("EngineConfig.slo_margin must be in [0, 1) and bank_cap >= 0")
        if min(self.temporal_k, self.temporal_chunk) <= 0 or self.static_layers < 0:
            raise ConfigError("EngineConfig.temporal_k and temporal_chunk must be positive, static_layers >= 0")
        if not 0.5 <= self.predictor_quantile < 1:
            raise ConfigError(f"EngineConfig.predictor_quantile must be in [0.5, 1), got {self.predictor_quantile}")
        if any(b <= 0 or b > self.max_batch for b in self.batch_buckets):
            raise ConfigError(f"EngineConfig.batch_buckets must lie in [1, max_batch={self.max_batch}], "
                              f"got {self.batch_buckets}")
        if any(p <= 0 for p in self.page_buckets):
            raise ConfigError(f"EngineConfig.page_buckets must be positive, got {self.page_buckets}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> EngineConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"engine config file not found: {path}")
        data = {**(yaml.safe_load(path.read_text()) or {}), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown engine config field(s) {unknown}; known: {sorted(known)}")
        for name in ("batch_buckets", "page_buckets"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)

    def seq_len(self, model: ModelConfig) -> int:
        return min(self.max_seq_len or 2048, model.max_position_embeddings)

    def max_pages_per_seq(self, model: ModelConfig) -> int:
        return -(-self.seq_len(model) // self.page_tokens)

    def resolved_batch_buckets(self) -> tuple[int, ...]:
        if self.batch_buckets:
            return tuple(sorted({*self.batch_buckets, self.max_batch}))
        powers = [1 << i for i in range(self.max_batch.bit_length()) if 1 << i < self.max_batch]
        return (*powers, self.max_batch)

    def resolved_page_buckets(self, model: ModelConfig) -> tuple[int, ...]:
        top = self.max_pages_per_seq(model)
        if self.page_buckets:
            return tuple(sorted({min(p, top) for p in self.page_buckets} | {top}))
        buckets = [top]
        while buckets[-1] // 4 >= 4:
            buckets.append(buckets[-1] // 4)
        return tuple(sorted(buckets))
