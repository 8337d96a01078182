"""EngineConfig by concern: flat keywords land in their groups, every field has one place and one default, and the
command lines read their defaults and help from the fields."""

import dataclasses

import pytest

from harli_jax import FinetuneJob
from harli_jax.cli import build_parser
from harli_jax.errors import ConfigError
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.options import given, help_of
from harli_jax.replay import run as replay
from harli_jax.runtime.config import (
    FLAT,
    GROUPS,
    CacheConfig,
    CoLocationConfig,
    EngineConfig,
    PredictorConfig,
    SchedulerConfig,
)


def test_flat_keywords_are_the_grouped_config():
    flat = EngineConfig(max_batch=8, page_tokens=4, tpot_slo_ms=50.0, predictor_quantile=0.9, batch_buckets=[2])
    grouped = EngineConfig(scheduler=SchedulerConfig(max_batch=8, batch_buckets=(2,)),
                           cache=CacheConfig(page_tokens=4), colocation=CoLocationConfig(tpot_slo_ms=50.0),
                           predictor=PredictorConfig(quantile=0.9))
    assert flat == grouped
    assert flat.scheduler.max_batch == 8 and flat.predictor.quantile == 0.9
    assert EngineConfig() == EngineConfig(**{group: cls() for group, cls in GROUPS.items()})


def test_every_field_has_one_place():
    names = [f.name for cls in GROUPS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert set(names) <= set(FLAT)
    assert all(f.metadata.get("help") for cls in GROUPS.values() for f in dataclasses.fields(cls))


def test_old_places_and_unknown_names_are_named_in_the_error():
    with pytest.raises(AttributeError, match=r"EngineConfig.max_batch is EngineConfig.scheduler.max_batch"):
        EngineConfig().max_batch  # noqa: B018
    with pytest.raises(AttributeError, match=r"predictor_quantile is EngineConfig.predictor.quantile"):
        EngineConfig().predictor_quantile  # noqa: B018
    with pytest.raises(ConfigError, match="no field 'max_batches'"):
        EngineConfig(max_batches=8)
    with pytest.raises(ConfigError, match=r"set both flat and in scheduler="):
        EngineConfig(max_batch=8, scheduler=SchedulerConfig())
    with pytest.raises(ConfigError, match="must be a SchedulerConfig"):
        EngineConfig(scheduler={"max_batch": 8})


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_batch=0), "SchedulerConfig.max_batch must be a positive integer"),
    (dict(batch_buckets=(64,)), r"batch_buckets must lie in \[1, max_batch=32\]"),
    (dict(num_pages=1), "CacheConfig.num_pages must be >= 2"),
    (dict(memory_fraction=1.5), "CacheConfig.memory_fraction"),
    (dict(dtype="int8"), "RunnerConfig.dtype 'int8'"),
    (dict(compile_threads=-1), "RunnerConfig.compile_threads"),
    (dict(policy="greedy"), "CoLocationConfig.policy must be one of"),
    (dict(tpot_slo_ms=0), "CoLocationConfig.tpot_slo_ms must be positive"),
    (dict(predictor_quantile=0.2), r"PredictorConfig.quantile must be in \[0.5, 1\)"),
])
def test_each_group_validates_its_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**kwargs)


def test_yaml_takes_sections_or_flat_fields(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("scheduler:\n  max_batch: 4\n  page_buckets: [2, 8]\ntpot_slo_ms: 30\n")
    config = EngineConfig.from_yaml(path, page_tokens=8)
    assert config == EngineConfig(max_batch=4, page_buckets=(2, 8), tpot_slo_ms=30, page_tokens=8)
    path.write_text("scheduler:\n  policy: static\n")
    with pytest.raises(ConfigError, match=r"unknown scheduler field\(s\) \['policy'\]"):
        EngineConfig.from_yaml(path)
    path.write_text("colocation: harli\n")
    with pytest.raises(ConfigError, match="section colocation must be a mapping"):
        EngineConfig.from_yaml(path)


def _subcommand(name):
    return build_parser()._subparsers._group_actions[0].choices[name]


def test_the_cli_takes_defaults_and_help_from_the_fields():
    finetune = _subcommand("finetune")
    helps = {a.option_strings[0]: a.help for a in finetune._actions if a.option_strings}
    assert helps["--lr"] == help_of(FinetuneJob, "learning_rate")
    assert "(default 0.003)" in helps["--lr"] and "(default 8)" in helps["--rank"]
    args = build_parser().parse_args(["finetune", "--model", "m", "--rank", "4", "--targets", "q_proj,v_proj"])
    assert given(args, LoRAConfig) == {"rank": 4, "targets": ("q_proj", "v_proj")}
    assert given(args, FinetuneJob) == {}  # unset flags leave the dataclass's defaults in place


def test_replay_defaults_come_from_the_fields_and_the_preset(tmp_path):
    options = replay.resolve_options(replay.build_parser().parse_args([]))
    assert options["lora_rank"] == LoRAConfig().rank
    assert options["model"] == "smollm2" and options["seq_len"] == 128  # configs/replay/default.yaml
    assert options["page_buckets"] == (16,) and options["calibration_runs"] == 2
    assert options["policy"] == f"{CoLocationConfig().policy},decode-only"  # and its comparison
    config = tmp_path / "replay.yaml"
    config.write_text("seq_len: 32\n")
    options = replay.resolve_options(replay.build_parser().parse_args(["--config", str(config), "--seed", "3"]))
    assert options["seq_len"] == 32 and options["seed"] == 3
    assert options["max_batch"] == SchedulerConfig().max_batch
    assert options["micro_batch_rows"] == FinetuneJob().micro_batch_rows
