"""The Llama family (Llama 2/3, Qwen2) as pure functions over pytrees, with HF checkpoint I/O."""

from harli_jax.model.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from harli_jax.model.config import ModelConfig, RopeScaling
from harli_jax.model.generate import greedy_generate
from harli_jax.model.loader import LoadedModel, load_model
from harli_jax.model.params import LayerParams, Params, init_params, param_shapes
from harli_jax.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from harli_jax.model.transformer import forward

__all__ = [
    "ByteTokenizer", "HFTokenizer", "LayerParams", "LoadedModel", "ModelConfig", "Params", "RopeScaling",
    "Tokenizer", "forward", "greedy_generate", "init_params", "load_hf_checkpoint", "load_model",
    "load_tokenizer", "param_shapes", "save_hf_checkpoint",
]
