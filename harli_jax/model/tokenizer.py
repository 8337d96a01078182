"""Tokenizers: HF `tokenizer.json` through `tokenizers`, and a byte-level one for models that ship none."""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizerModel

from harli_jax.errors import CheckpointError, ConfigError


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: ChatTemplate | None  # the checkpoint's, if it has one

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def stream(self) -> TextStream:
        """An incremental decoder for one sequence of ids."""
        ...


class TextStream(Protocol):
    def add(self, token_id: int) -> str:
        """The text that `token_id` completes (empty while a character's bytes are still to come)."""
        ...


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's Jinja chat template (`tokenizer_config.json`'s `chat_template`) and the special-token
    strings it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @functools.cached_property
    def _compiled(self):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source)

    def render(self, messages, add_generation_prompt: bool) -> str:
        """The conversation as text (`add_generation_prompt`: followed by the assistant's header), as
        transformers' `apply_chat_template(..., tokenize=False)` renders it; a ConfigError when it fails."""
        import jinja2

        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the chat template failed: {e}") from None


def _chat_template(directory: Path) -> ChatTemplate | None:
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: invalid JSON: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return None

    def token(name: str) -> str:
        value = config.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)

    return ChatTemplate(template, token("bos_token"), token("eos_token"))


class _Utf8Stream:
    """Byte ids through Python's incremental UTF-8 decoder: a character is given out once its last byte is in."""

    def __init__(self, offset: int, end: int):
        self.offset, self.end = offset, end
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if not self.offset <= token_id < self.end:
            return ""
        return self._decoder.decode(bytes((token_id - self.offset,)))


class RedecodeStream:
    """Any tokenizer, as vLLM detokenizes: the last few ids decoded with and without the new one, the
    difference given out. A trailing replacement character may be a character whose bytes are still to come:
    it waits for the next complete character (UTF-8 resynchronizes there)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.window: list[int] = []  # the ids not given out yet, after those decoded again for context
        self.context = 0  # window[:context] are decoded for context only

    def add(self, token_id: int) -> str:
        self.window.append(token_id)
        before = self.tokenizer.decode(self.window[:self.context])
        after = self.tokenizer.decode(self.window)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.window = self.window[self.context:]  # the ids just given out are the next one's context
        self.context = len(self.window)
        return after[len(before):]


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids: 0 pad, 1 bos, 2 eos."""

    PAD, BOS, EOS = 0, 1, 2
    OFFSET = 3
    vocab_size = 256 + OFFSET
    bos_id = BOS
    eos_ids = (EOS,)
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return [self.BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids past the byte range (a model's vocabulary may be larger) decode to nothing."""
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def stream(self) -> TextStream:
        return _Utf8Stream(self.OFFSET, self.vocab_size)


class HFTokenizer:
    """A `tokenizer.json` with EOS ids from `generation_config.json` (an int or a list), else `config.json`, and
    the chat template of `tokenizer_config.json` if it has one."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        file = directory / "tokenizer.json"
        try:
            self._tok = HFTokenizerModel.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{file}: cannot load tokenizer ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = _special_ids(directory)
        self.bos_id = ids.get("bos")
        self.eos_ids = ids.get("eos", ())
        self.chat_template = _chat_template(directory)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self) -> TextStream:
        return RedecodeStream(self)


def _special_ids(directory: Path) -> dict:
    out: dict = {}
    for name in ("config.json", "generation_config.json"):  # the latter wins
        file = directory / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: invalid JSON: {e}") from None
        if data.get("bos_token_id") is not None:
            out["bos"] = int(data["bos_token_id"])
        eos = data.get("eos_token_id")
        if eos is not None:
            out["eos"] = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    return out


def load_tokenizer(directory: str | Path | None, vocab_size: int) -> Tokenizer | None:
    """The checkpoint's `tokenizer.json` if it has one, else the byte tokenizer if the vocabulary holds it,
    else None (the model then takes token ids only)."""
    if directory is None or not (Path(directory) / "tokenizer.json").is_file():
        return ByteTokenizer() if vocab_size >= ByteTokenizer.vocab_size else None
    tok = HFTokenizer(directory)
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is only "
                          f"{vocab_size}")
    return tok
