"""GGUF files, written here with the `gguf` package's writer as llama.cpp's converter writes them (Llama q/k rows
permuted for its rotary layout, 1-D tensors in F32), load into the same logits as transformers' load of the
same file, for every type the writer quantizes, Llama and Qwen2; bad files fail naming the problem."""

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

from harli_jax.errors import CheckpointError, ConfigError
from harli_jax.model import forward, load_model
from harli_jax.model.gguf import load_gguf

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 128, 4, 2, 2, 96
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's reordering of a Llama q/k projection's rows."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_gguf(path, arch="llama", qtype="F32", seed=0, tied=True, extra=None, drop=(), tokenizer=None, hidden=HIDDEN,
               ffn=FFN):
    """A tiny random model of `arch` as a GGUF file, its 2-D tensors in `qtype` (a K-quant: raw blocks of random
    bytes with finite scales, as the writer cannot quantize those); `extra` tensors added, the names in `drop`
    left out; `tokenizer`: (tokens, token types, merges, pre, chat template) instead of a placeholder
    vocabulary."""
    rng = np.random.default_rng(seed)
    tokens, types, merges, pre, template = tokenizer or ([f"t{i}" for i in range(VOCAB)], [1] * VOCAB, [], None, None)
    vocab = len(tokens)
    head_dim = hidden // HEADS
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (HEADS * head_dim, hidden),
                   f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, hidden),
                   f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, hidden),
                   f"blk.{i}.attn_output.weight": (hidden, HEADS * head_dim), f"blk.{i}.ffn_norm.weight": (hidden,),
                   f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                   f"blk.{i}.ffn_down.weight": (hidden, ffn)}
        if arch == "qwen2":
            shapes |= {f"blk.{i}.attn_q.bias": (HEADS * head_dim,), f"blk.{i}.attn_k.bias": (KV_HEADS * head_dim,),
                       f"blk.{i}.attn_v.bias": (KV_HEADS * head_dim,)}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-gguf")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else 1e6)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if template is not None:
        writer.add_chat_template(template)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    quant = gguf.GGMLQuantizationType[qtype]
    for name, shape in {**shapes, **(extra or {})}.items():
        if name in drop:
            continue
        scale = 1.0 if name.endswith("norm.weight") else 0.3
        data = (rng.standard_normal(shape) * scale + (1.0 if name.endswith("norm.weight") else 0.0)).astype(
            np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            data = _permute(data, HEADS if ".attn_q." in name else KV_HEADS)
        if len(shape) == 1 or qtype == "F32":
            writer.add_tensor(name, data)
        elif qtype in K_QUANT_SCALES:
            writer.add_tensor(name, _k_quant_blocks(rng, quant, shape), raw_dtype=quant)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Byte offsets of each K-quant block's float16 scales (llama.cpp's block layouts).
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _k_quant_blocks(rng, quant, shape):
    """Raw K-quant blocks for a `shape` tensor: random bytes, each float16 scale set to a small finite value."""
    block, size = gguf.GGML_QUANT_SIZES[quant]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[quant.name]:
        scales = (rng.uniform(0.002, 0.01, (rows, cols // block)) * rng.choice([-1, 1], (rows, cols // block)))
        raw[..., offset:offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def _logits(cfg, params, ids):
    return np.asarray(forward(params, cfg, ids))


@pytest.mark.parametrize("arch,qtype,tied", [*((("llama", t, True)) for t in TYPES), ("llama", "Q8_0", False),
                                             ("qwen2", "F32", True), ("qwen2", "Q4_1", False)])
def test_a_gguf_loads_as_transformers_loads_it(tmp_path, arch, qtype, tied):
    path = write_gguf(tmp_path / "model.gguf", arch, qtype, tied=tied)
    cfg, params, _ = load_gguf(path)
    assert (cfg.architecture, cfg.num_layers, cfg.num_kv_heads, cfg.tie_word_embeddings) == (arch, LAYERS, KV_HEADS,
                                                                                              tied)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.qkv_bias) == (1, (2,), arch == "qwen2")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 24)).astype(np.int32)
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    ours = _logits(cfg, params, ids)
    assert np.abs(want).max() > 1.0, "logits too small for the comparison to mean anything"
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", sorted(K_QUANT_SCALES))
def test_k_quant_tensors_load_as_transformers_loads_them(tmp_path, qtype):
    path = write_gguf(tmp_path / "model.gguf", "llama", qtype, tied=False, hidden=256, ffn=512)
    cfg, params, _ = load_gguf(path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 16)).astype(np.int32)
    with torch.no_grad():
        want = reference(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    assert np.isfinite(want).all() and np.abs(want).max() > 0.1
    np.testing.assert_allclose(_logits(cfg, params, ids), want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)


def test_a_gguf_loads_in_the_engines_dtype(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", qtype="Q8_0")
    cfg, params, _ = load_gguf(path, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and params.layers[0].q_proj.dtype == np.dtype("bfloat16")
    with pytest.raises(ConfigError, match="unsupported dtype 'int8'"):
        load_gguf(path, dtype="int8")


def test_bad_gguf_files_fail_naming_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        load_gguf(tmp_path / "none.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="junk.gguf: cannot read GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    missing = write_gguf(tmp_path / "missing.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensors: blk\.1\.ffn_up\.weight"):
        load_gguf(missing)
    unexpected = write_gguf(tmp_path / "unexpected.gguf", extra={"blk.0.attn_gate.weight": (HIDDEN, HIDDEN)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: blk\.0\.attn_gate\.weight"):
        load_gguf(unexpected)
    phi = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(phi), "phi3")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'phi3'"):
        load_gguf(phi)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXT = ("Hello, world! The year 2026 has 365 days; naïve café, Ünïcödé, 東京 and emoji 🚀🤖.\n"
        "def add(a, b):\n    return a + b  # code\n\t<|im_start|>user\nHi<|im_end|> trailing   spaces  ")
CORPUS = [TEXT, "the quick brown fox jumps over the lazy dog " * 20, "print(f'{x:>8}') 1234567890 " * 10]


def _trained_tokenizer():
    """(tokens, types, merges) of a byte-level BPE trained here on a small corpus, the special tokens first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = tok.to_str()
    import json
    model = json.loads(state)["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    return tokens, types, merges


@pytest.mark.parametrize("pre", [None, "qwen2", "llama-bpe"])
def test_the_gguf_tokenizer_encodes_decodes_and_chats_as_transformers_does(tmp_path, pre):
    tokens, types, merges = _trained_tokenizer()
    path = write_gguf(tmp_path / "model.gguf", tokenizer=(tokens, types, merges, pre, CHATML))
    ours = load_model(path).tokenizer
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in (TEXT, "12345 678", " leading", "<|endoftext|>x<|im_end|>"):
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_ids) == (1, (2,))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    assert ours.chat_template.render(messages, add_generation_prompt=True) == reference.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)


def test_a_gguf_with_a_sentencepiece_tokenizer_is_refused_naming_it(tmp_path):
    path = write_gguf(tmp_path / "model.gguf")
    reader = gguf.GGUFReader(str(path))
    from harli_jax.model.gguf import GGUFTokenizer

    tokenizer = reader.fields["tokenizer.ggml.model"]
    assert tokenizer.contents() == "gpt2"
    sp = tmp_path / "sp.gguf"
    sp.write_bytes(path.read_bytes().replace(b"gpt2", b"llam", 1))
    with pytest.raises(ConfigError, match="tokenizer 'llam' is not supported"):
        GGUFTokenizer(gguf.GGUFReader(str(sp)), str(sp))
