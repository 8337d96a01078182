"""Arena, scheduler, engine loop, runner, co-location, predictor and finetune jobs."""

from harli_jax.runtime.config import EngineConfig
from harli_jax.runtime.engine import Engine, RequestError
from harli_jax.runtime.finetune import FinetuneJob, JobHandle, JobProgress, JobStatus
from harli_jax.runtime.request import (
    FinishedEvent,
    FinishReason,
    GenerationOutput,
    PrefilledKV,
    Request,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "Engine", "EngineConfig", "FinetuneJob", "FinishReason", "FinishedEvent", "GenerationOutput", "JobHandle",
    "JobProgress", "JobStatus", "PrefilledKV", "Request", "RequestError", "SamplingParams", "TokenEvent",
]
