"""HF safetensors checkpoints (single file or sharded with an index) to and from `Params`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from harli_jax.errors import CheckpointError, ConfigError
from harli_jax.model.config import DTYPES, ModelConfig
from harli_jax.model.params import LayerParams, Params, layer_shapes
from harli_jax.model.sharding import param_shardings, place, tp_mesh

INDEX_FILE = "model.safetensors.index.json"
# Per-layer tensors: our field -> HF name under `model.layers.{i}.`; projections are transposed.
HF_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight",
    "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate_proj": "mlp.gate_proj.weight",
    "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight",
}
TRANSPOSED = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def _ignorable(name: str) -> bool:
    """Buffers older checkpoints carry that the model recomputes."""
    return name.endswith("rotary_emb.inv_freq")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name this config needs, with its HF-side shape."""
    out = {EMBED: (cfg.vocab_size, cfg.hidden_size), FINAL_NORM: (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    for field, shape in layer_shapes(cfg).items():
        hf_shape = shape[::-1] if field in TRANSPOSED else shape
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{HF_LAYER_NAMES[field]}"] = hf_shape
    return out


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard file(s) that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None


def _summarize(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_hf_checkpoint(path: str | Path, dtype: str | None = None,
                       tensor_parallel: int = 1) -> tuple[ModelConfig, Params]:
    """Loads an HF Llama/Qwen2 checkpoint directory; every tensor must be consumed.

    `dtype` (float32, bfloat16, float16) overrides the checkpoint's dtype for the returned weights. With
    `tensor_parallel` > 1 each tensor is placed on the tensor-parallel mesh as it is read (each device gets only
    its part, `sharding.param_shardings`).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg = ModelConfig.from_hf(path)
    target = dtype or cfg.dtype
    if target not in DTYPES:
        raise ConfigError(f"unsupported dtype {target!r}; supported: {', '.join(DTYPES)}")
    cfg = cfg.replace(dtype=target)

    handles = {file: _open(file) for file in _shard_files(path)}
    location: dict[str, Path] = {}
    for file, handle in handles.items():
        for name in handle.keys():
            if name in location:
                raise CheckpointError(f"tensor {name} appears in both {location[name].name} and {file.name}")
            location[name] = file

    expected = expected_tensors(cfg)
    present = {n for n in location if not _ignorable(n)}
    if cfg.tie_word_embeddings:
        present.discard(LM_HEAD)  # some exporters write the tied head anyway
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_summarize(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_summarize(unexpected)}")
        raise CheckpointError(f"{path} does not match its config.json ({cfg.hf_class_name}, "
                              f"{cfg.num_layers} layers): " + "; ".join(parts))
    for name, shape in expected.items():
        actual = tuple(handles[location[name]].get_slice(name).get_shape())
        if actual != shape:
            raise CheckpointError(f"tensor {name} in {location[name].name} has shape {list(actual)}, "
                                  f"expected {list(shape)} from config.json")

    np_dtype = jnp.dtype(target)

    def read(name: str, transpose: bool = False) -> np.ndarray:
        try:
            array = handles[location[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{location[name]}: cannot read tensor {name} ({e})") from None
        array = array.astype(np_dtype, copy=False)
        return array.T if transpose else array

    shardings = param_shardings(cfg, tp_mesh(cfg, tensor_parallel))

    def put(array: np.ndarray, where) -> jax.Array:
        return jnp.asarray(array) if shardings is None else place(array, where(shardings))

    def layer(i: int) -> LayerParams:
        return LayerParams(**{field: put(read(f"model.layers.{i}.{HF_LAYER_NAMES[field]}", field in TRANSPOSED),
                                         lambda s, field=field: getattr(s.layers[i], field))
                              for field in layer_shapes(cfg)})

    params = Params(
        embed=put(read(EMBED), lambda s: s.embed),
        layers=tuple(layer(i) for i in range(cfg.num_layers)),
        final_norm=put(read(FINAL_NORM), lambda s: s.final_norm),
        lm_head=None if cfg.tie_word_embeddings else put(read(LM_HEAD, transpose=True), lambda s: s.lm_head),
    )
    return cfg, params


def save_hf_checkpoint(path: str | Path, cfg: ModelConfig, params: Params, *,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes `config.json`, `generation_config.json` and safetensors shards that HF `from_pretrained` loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {EMBED: np.asarray(params.embed), FINAL_NORM: np.asarray(params.final_norm)}
    if params.lm_head is not None:
        tensors[LM_HEAD] = np.asarray(params.lm_head).T
    if len(params.layers) != cfg.num_layers:
        raise CheckpointError(f"params have {len(params.layers)} layers, the config {cfg.num_layers}")
    for i, lp in enumerate(params.layers):
        for field in layer_shapes(cfg):
            array = np.asarray(getattr(lp, field))
            tensors[f"model.layers.{i}.{HF_LAYER_NAMES[field]}"] = array.T if field in TRANSPOSED else array
    expected = expected_tensors(cfg)
    wrong = [n for n, s in expected.items() if n not in tensors or tensors[n].shape != s]
    wrong += sorted(set(tensors) - set(expected))
    if wrong:
        raise CheckpointError(f"params do not match the config, wrong tensors: {_summarize(wrong)}")

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += array.nbytes
    files: dict[str, dict[str, np.ndarray]] = (
        {"model.safetensors": shards[0]} if len(shards) == 1 else
        {f"model-{i:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards, start=1)})
    for file, shard in files.items():
        _write_atomic(path / file, lambda tmp, shard=shard: safetensors.numpy.save_file(
            shard, str(tmp), metadata={"format": "pt"}))
    if len(files) > 1:
        weight_map = {name: file for file, shard in files.items() for name in shard}
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
        _write_atomic(path / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    for stale in [*path.glob("*.safetensors"), path / INDEX_FILE]:
        if stale.name not in files and not (stale.name == INDEX_FILE and len(files) > 1):
            stale.unlink(missing_ok=True)
    hf = cfg.to_hf()
    generation = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    _write_atomic(path / "config.json", lambda tmp: tmp.write_text(json.dumps(hf, indent=2)))
    _write_atomic(path / "generation_config.json", lambda tmp: tmp.write_text(json.dumps(generation, indent=2)))


def _write_atomic(target: Path, write) -> None:
    """Writes through a temporary file and renames it, so a failed save never leaves a half-written file."""
    tmp = target.with_name(target.name + ".partial")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
