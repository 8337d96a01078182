"""harli_jax: serve LLM decode under a TPOT SLO and train LoRA adapters in the slack, on one accelerator."""

from harli_jax.errors import CheckpointError, ConfigError, HarliError
from harli_jax.model import ModelConfig, load_model
from harli_jax.runtime import (
    Engine,
    EngineConfig,
    FinishedEvent,
    FinishReason,
    GenerationOutput,
    PrefilledKV,
    Request,
    RequestError,
    SamplingParams,
    TokenEvent,
)

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Engine", "EngineConfig", "FinishReason", "FinishedEvent",
           "GenerationOutput", "HarliError", "ModelConfig", "PrefilledKV", "Request", "RequestError",
           "SamplingParams", "TokenEvent", "load_model"]
