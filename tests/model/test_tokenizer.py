"""Byte-level and HF tokenizers, EOS ids from generation_config.json."""

import json

import pytest

from conftest import train_bpe_tokenizer
from harli_jax.errors import ConfigError
from harli_jax.model import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo, wörld — 你好"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and all(tok.OFFSET <= i < tok.vocab_size for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.decode([tok.EOS, 500, *tok.encode("ok", add_special_tokens=False)]) == "ok"


@pytest.fixture
def hf_tokenizer_dir(tmp_path):
    train_bpe_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    return tmp_path


def test_hf_tokenizer_and_eos_list(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir, vocab_size=200)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_ids == (2, 3) and tok.bos_id == 1
    ids = tok.encode("the lazy fox")
    assert len(ids) < len("the lazy fox")  # merges were learned
    assert tok.decode(ids) == "the lazy fox"


def test_tokenizer_larger_than_model_vocabulary(hf_tokenizer_dir):
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but the model's vocabulary is only 20"):
        load_tokenizer(hf_tokenizer_dir, vocab_size=20)


def test_corrupt_tokenizer_json(hf_tokenizer_dir):
    (hf_tokenizer_dir / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot load tokenizer"):
        load_tokenizer(hf_tokenizer_dir, vocab_size=200)


def test_directory_without_tokenizer_uses_bytes_when_they_fit(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=512), ByteTokenizer)
    assert load_tokenizer(tmp_path, vocab_size=200) is None


@pytest.mark.parametrize("kind", ["bytes", "hf"])
def test_a_text_stream_gives_out_the_decoded_text_once_each_character_is_complete(kind, hf_tokenizer_dir):
    tok = ByteTokenizer() if kind == "bytes" else HFTokenizer(hf_tokenizer_dir)
    text = "héllo, wörld — 你好 ok"
    ids = tok.encode(text, add_special_tokens=False)
    stream = tok.stream()
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    if kind == "bytes":  # a multi-byte character comes out with its last byte, not before
        assert pieces[1:3] == ["", "é"] and pieces[-6:-3] == ["", "", "好"]
        assert tok.stream().add(tok.EOS) == ""  # special ids add no text
