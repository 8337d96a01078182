"""GGUF files (llama.cpp's format) of Llama and Qwen2 models: the config from the file's metadata, each tensor
dequantized (any type the `gguf` package dequantizes) to the engine's dtype, read tensor by tensor from the
memory-mapped file, with llama.cpp's rotary permutation of the Llama q/k projection rows undone; and the
byte-level BPE tokenizer and chat template the file describes (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.errors import CheckpointError, ConfigError
from harli_jax.model.config import DTYPES, ModelConfig
from harli_jax.model.params import LayerParams, Params, layer_shapes
from harli_jax.model.sharding import param_shardings, place, tp_mesh
from harli_jax.model.tokenizer import ChatTemplate, RedecodeStream, TextStream

ARCHITECTURES = ("llama", "qwen2")
# Per-layer tensors: our field -> llama.cpp's name under `blk.{i}.`; projections are transposed.
GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight",
    "q_proj": "attn_q.weight",
    "k_proj": "attn_k.weight",
    "v_proj": "attn_v.weight",
    "o_proj": "attn_output.weight",
    "q_bias": "attn_q.bias",
    "k_bias": "attn_k.bias",
    "v_bias": "attn_v.bias",
    "o_bias": "attn_output.bias",
    "mlp_norm": "ffn_norm.weight",
    "gate_proj": "ffn_gate.weight",
    "up_proj": "ffn_up.weight",
    "down_proj": "ffn_down.weight",
}
TRANSPOSED = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
EMBED, FINAL_NORM, LM_HEAD = "token_embd.weight", "output_norm.weight", "output.weight"


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read GGUF file ({e})") from None


def metadata(reader, key: str, default: Any = None) -> Any:
    """A metadata value of the file (a number, a string or a list), or `default` if absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source: str, dtype: str | None = None) -> ModelConfig:
    """The model config of an open GGUF file: its architecture's hyperparameters and the special token ids."""
    arch = metadata(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    scaling = metadata(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConfigError(f"{source}: RoPE scaling {scaling!r} is not supported")

    def need(key: str) -> int:
        value = metadata(reader, f"{arch}.{key}")
        if value is None:
            raise ConfigError(f"{source}: missing GGUF metadata {arch}.{key}")
        return int(value)

    tensors = {t.name: t for t in reader.tensors}
    if EMBED not in tensors:
        raise CheckpointError(f"{source}: no {EMBED} tensor")
    hidden, heads = need("embedding_length"), need("attention.head_count")
    tokens = metadata(reader, "tokenizer.ggml.tokens")
    vocab = int(tensors[EMBED].shape[-1]) if tokens is None else max(len(tokens), int(tensors[EMBED].shape[-1]))
    eos = metadata(reader, "tokenizer.ggml.eos_token_id")
    bos = metadata(reader, "tokenizer.ggml.bos_token_id")
    target = dtype or "float32"
    if target not in DTYPES:
        raise ConfigError(f"unsupported dtype {target!r}; supported: {', '.join(DTYPES)}")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=heads,
        num_kv_heads=int(metadata(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(metadata(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(metadata(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings=LM_HEAD not in tensors,
        qkv_bias=f"blk.0.{GGUF_LAYER_NAMES['q_bias']}" in tensors,
        o_bias=f"blk.0.{GGUF_LAYER_NAMES['o_bias']}" in tensors,
        dtype=target,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        name=str(metadata(reader, "general.name", Path(source).stem)),
    )


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's reordering of each head's q/k rows (its converter pairs the two rotary halves)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def load_gguf(path: str | Path, dtype: str | None = None,
              tensor_parallel: int = 1) -> tuple[ModelConfig, Params, Any]:
    """Loads a GGUF file of a Llama or Qwen2 model; every tensor must be consumed. Returns (config, weights, the
    open reader, for the tokenizer). `dtype` (default float32) is the weights' dtype; with `tensor_parallel` > 1
    each tensor is placed on that mesh as it is read."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    reader = _reader(path)
    cfg = config_from_gguf(reader, str(path), dtype)
    tensors = {t.name: t for t in reader.tensors}
    expected = {EMBED: (cfg.vocab_size, cfg.hidden_size), FINAL_NORM: (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        expected[LM_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    for field, shape in layer_shapes(cfg).items():
        for i in range(cfg.num_layers):
            expected[f"blk.{i}.{GGUF_LAYER_NAMES[field]}"] = shape[::-1] if field in TRANSPOSED else shape
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - {"rope_freqs.weight"})
    if missing or unexpected:
        raise CheckpointError(f"{path} does not hold a {cfg.architecture} model of {cfg.num_layers} layers: "
                              + "; ".join(f"{what} tensors: {', '.join(names[:8])}"
                                          for what, names in (("missing", missing), ("unexpected", unexpected))
                                          if names))
    np_dtype = jnp.dtype(cfg.dtype)

    def read(name: str) -> np.ndarray:
        tensor = tensors[name]
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {name} has type {tensor.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize") from None
        array = np.asarray(array, np.float32).reshape(shape)
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, expected {list(expected[name])}")
        return array

    def layer_tensor(i: int, field: str) -> np.ndarray:
        array = read(f"blk.{i}.{GGUF_LAYER_NAMES[field]}")
        if cfg.architecture == "llama" and field in ("q_proj", "k_proj"):
            array = _unpermute(array, cfg.num_heads if field == "q_proj" else cfg.num_kv_heads)
        return (array.T if field in TRANSPOSED else array).astype(np_dtype)

    shardings = param_shardings(cfg, tp_mesh(cfg, tensor_parallel))

    def put(array: np.ndarray, where) -> jax.Array:
        array = array.astype(np_dtype, copy=False)
        return jnp.asarray(array) if shardings is None else place(array, where(shardings))

    params = Params(
        embed=put(read(EMBED), lambda s: s.embed),
        layers=tuple(LayerParams(**{field: put(layer_tensor(i, field),
                                               lambda s, i=i, field=field: getattr(s.layers[i], field))
                                    for field in layer_shapes(cfg)}) for i in range(cfg.num_layers)),
        final_norm=put(read(FINAL_NORM), lambda s: s.final_norm),
        lm_head=None if cfg.tie_word_embeddings else put(read(LM_HEAD).T, lambda s: s.lm_head),
    )
    return cfg, params, reader


# Pre-tokenizer splits by `tokenizer.ggml.pre` (the regexes the vocabularies' merges were learned on); any other
# value splits as GPT-2 does.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                        "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


class GGUFTokenizer:
    """The byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.model` "gpt2"): its tokens and merges,
    control tokens as special tokens, user-defined ones matched whole, BOS/EOS, and its chat template."""

    def __init__(self, reader, source: str):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        kind = metadata(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ConfigError(f"{source}: tokenizer {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
        tokens = list(metadata(reader, "tokenizer.ggml.tokens", []))
        merges = [tuple(m.split(" ", 1)) for m in metadata(reader, "tokenizer.ggml.merges", [])]
        types = list(metadata(reader, "tokenizer.ggml.token_type", [])) or [1] * len(tokens)
        self._tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
        split = PRE_TOKENIZER_SPLITS.get(metadata(reader, "tokenizer.ggml.pre"))
        if split is None:
            self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            self._tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._tok.decoder = decoders.ByteLevel()
        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                      for t, kind in zip(tokens, types, strict=True) if kind == CONTROL])
        self._tok.add_tokens([AddedToken(t, special=False, normalized=False)
                              for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        bos, eos = (metadata(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos"))
        self.bos_id = None if bos is None else int(bos)
        self.eos_ids = () if eos is None else (int(eos),)
        self._add_bos = bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)) and self.bos_id is not None
        template = metadata(reader, "tokenizer.chat_template")
        self.chat_template = None if template is None else ChatTemplate(
            str(template), "" if bos is None else tokens[int(bos)], "" if eos is None else tokens[int(eos)])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_special_tokens and self._add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self) -> TextStream:
        return RedecodeStream(self)
