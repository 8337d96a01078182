"""harli_jax: serve LLM decode under a TPOT SLO and train LoRA adapters in the slack, on one accelerator."""

from harli_jax.errors import CheckpointError, ConfigError, HarliError
from harli_jax.lora import LoRAConfig, export_peft
from harli_jax.model import ModelConfig, load_model
from harli_jax.runtime import (
    Engine,
    EngineConfig,
    FinetuneJob,
    FinishedEvent,
    FinishReason,
    GenerationOutput,
    JobHandle,
    PrefilledKV,
    Request,
    RequestError,
    SamplingParams,
    TokenEvent,
)

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ConfigError", "Engine", "EngineConfig", "FinetuneJob", "FinishReason", "FinishedEvent",
    "GenerationOutput", "HarliError", "JobHandle", "LoRAConfig", "ModelConfig", "PrefilledKV", "Request",
    "RequestError", "SamplingParams", "TokenEvent", "export_peft", "load_model",
]
