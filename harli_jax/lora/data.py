"""Finetuning data: JSONL records -> token ids with loss flags -> packed fixed-shape micro-batches.

Records (one JSON object per line of a `.jsonl` file, or a list of dicts in memory)
---------------------------------------------------------------------------------------
Exactly one of three shapes; other keys (``"id"``, ``"meta"``, ...) are ignored.

* ``{"text": str}``: the loss is on every token (the text must not be blank).
* ``{"prompt": str, "completion": str}``: the loss is on the completion only (the prompt may be empty, the
  completion may not). Prompt and completion are encoded separately and concatenated, so the boundary is exact
  for any tokenizer.
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: the loss is on the
  assistant turns only; at least one assistant turn with non-empty content is required.

Every sample starts with the tokenizer's BOS id (when it has one) and the text, the completion and every
assistant turn end with the terminator ``EOS = eos_ids[0]`` (when the tokenizer has EOS ids). Text is encoded
with ``add_special_tokens=False``; the special ids are placed by this module only.

A tokenizer with a chat template (a checkpoint's ``tokenizer_config.json`` ``chat_template``) renders
``"messages"`` with it, as transformers' ``apply_chat_template`` does (the rendered text carries the special
tokens, so no BOS is added); the loss is on what the template adds for each assistant turn after its header
(``render(turns before, add_generation_prompt=True)``): the content and the template's end-of-turn text.

Plain chat format (a tokenizer without a chat template). Each turn is rendered as::

    <|{role}|>\\n{content}\\n          system and user turns (no loss)
    <|assistant|>\\n{content}<EOS>     assistant turns: loss on {content} and <EOS>, not on the header

where ``\\n`` is a newline and ``<EOS>`` is the EOS id. A tokenizer without EOS ids gets the newline ``\\n`` as
the assistant terminator instead (and it carries the loss), so its rendering is ``<|assistant|>\\n{content}\\n``
like the other turns. Turns follow each other with nothing in between. To generate a reply in this format,
feed `chat_prompt_ids` (the history followed by the ``<|assistant|>\\n`` header) and stop at EOS.

Loss flags: ``Sample.loss[t]`` says that token t is trained, i.e. predicting it from tokens ``< t`` of the same
sample counts in the loss. The first token of a sample is never trained (nothing precedes it).

Malformed records (invalid JSON or UTF-8, not an object, no or several shapes, wrong types, blank text or
completion, unknown role, no trained token) are problems named ``file:line: message``. By default they are
skipped, listed in one warning on the ``harli_jax`` logger and kept in ``Dataset.problems``; with
``strict=True`` the first one raises `DataError`. Blank lines are not records and are skipped silently. A
dataset without a usable sample, and a missing file, raise `DataError`.

Packing
-------
`DataLoader` packs samples into `MicroBatch`es of ``rows x seq_len`` tokens: greedy first-fit in the data
order, each sample going to the first row with room for it; the micro-batch closes at the first sample that
fits in no row (it opens the next micro-batch), so the data order is kept exactly. A sample longer than
``seq_len`` is handled by ``overflow``:

* ``"truncate"`` (default): only its first ``seq_len`` tokens are kept; the rest is never trained.
* ``"split"``: consecutive windows of ``seq_len`` tokens that overlap by one token (window w holds tokens
  ``[w*(seq_len-1), w*(seq_len-1) + seq_len)``), each its own segment with positions from 0. Every trained
  token of the sample is trained exactly once (a window's first token is only the context of its second), but
  a window does not see the tokens of the windows before it. Windows of one sample stay consecutive in the
  order; they may land in different micro-batches.

Windows (and truncated samples) without any trained token are dropped. `DataLoader.overflow_stats` counts all
of it; a warning reports truncations.

Order and cursor
----------------
Each epoch visits the samples in ``numpy.random.default_rng([seed, epoch]).permutation(n)`` (or in file order
with ``shuffle=False``); micro-batches run on across epoch boundaries. With a finite ``epochs``,
`DataLoader.next_batch` returns a last, partly filled micro-batch and then raises `StopIteration` (the loader
is also a Python iterator). `DataLoader.state` is a JSON-serializable cursor and `DataLoader.restore` resumes
it exactly. `DataLoader.push_back` returns an abandoned micro-batch's samples to the front of the queue.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from harli_jax.errors import HarliError
from harli_jax.lora.default_data import default_dataset
from harli_jax.model.tokenizer import Tokenizer

log = logging.getLogger("harli_jax")

__all__ = [
    "ROLES", "DataError", "DataProblem", "Sample", "Dataset", "MicroBatch", "DataLoader",
    "encode_record", "chat_prompt_ids", "from_records", "load_jsonl", "split", "default_dataset",
]

ROLES = ("system", "user", "assistant")
MEMORY = "<memory>"
STATE_VERSION = 1
_WARN_LIST = 10  # problems listed in the warning; all of them stay in Dataset.problems

Overflow = Literal["truncate", "split"]


class DataError(HarliError, ValueError):
    """A finetuning data file or record that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class DataProblem:
    """A skipped record: `source` is the file path (or ``<memory>``), `line` is 1-based (list index + 1)."""

    source: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}"


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One record's tokens (int32 ``[n]``) and loss flags (bool ``[n]``, ``loss[0]`` is always False)."""

    tokens: np.ndarray
    loss: np.ndarray
    source: str = MEMORY
    line: int = 0

    def __post_init__(self):
        tokens = np.asarray(self.tokens)
        loss = np.array(self.loss, bool)  # a copy: loss[0] is cleared below
        if tokens.ndim != 1 or loss.shape != tokens.shape or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{self.source}:{self.line}: a sample needs 1-D integer tokens and as many loss flags, "
                            f"got tokens {tokens.dtype}{tokens.shape} and loss {loss.shape}")
        if len(loss):
            loss[0] = False
        object.__setattr__(self, "tokens", tokens.astype(np.int32))
        object.__setattr__(self, "loss", loss)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss.sum())


class Dataset(Sequence[Sample]):
    """Tokenized samples (ids are list indices) and the problems met while loading them."""

    def __init__(self, samples: Iterable[Sample], problems: Iterable[DataProblem] = (), source: str = MEMORY):
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.problems: tuple[DataProblem, ...] = tuple(problems)
        self.source = source
        self._fingerprint: int | None = None
        self._flat: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._warned: set[tuple[int, str]] = set()  # (seq_len, overflow) whose truncations were reported

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # type: ignore[override]
        return self.samples[i]

    def __repr__(self) -> str:
        return (f"Dataset({self.source!r}, {len(self)} samples, {self.num_tokens} tokens, "
                f"{self.num_loss_tokens} trained, {len(self.problems)} problems)")

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    @property
    def num_loss_tokens(self) -> int:
        return sum(s.num_loss_tokens for s in self.samples)

    def flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All tokens (int32) and loss flags (bool) concatenated, and each sample's start offset (int64)."""
        if self._flat is None:
            lengths = np.fromiter((len(s) for s in self.samples), np.int64, len(self.samples))
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            if self.samples:
                tokens = np.concatenate([s.tokens for s in self.samples]).astype(np.int32)
                loss = np.concatenate([s.loss for s in self.samples]).astype(bool)
            else:
                tokens, loss = np.zeros(0, np.int32), np.zeros(0, bool)
            self._flat = (tokens, loss, starts)
        return self._flat

    @property
    def fingerprint(self) -> int:
        """CRC32 over every sample's tokens and loss flags: a cursor restores only onto the same data."""
        if self._fingerprint is None:
            crc = zlib.crc32(len(self.samples).to_bytes(8, "little"))
            for s in self.samples:
                crc = zlib.crc32(len(s).to_bytes(8, "little"), crc)
                crc = zlib.crc32(np.ascontiguousarray(s.tokens, np.int32).tobytes(), crc)
                crc = zlib.crc32(np.packbits(s.loss).tobytes(), crc)
            self._fingerprint = crc
        return self._fingerprint


# ---------------------------------------------------------------------------------------------------- records


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


class _Builder:
    def __init__(self, tokenizer: Tokenizer, bos: bool = True):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.loss: list[bool] = []
        if bos and tokenizer.bos_id is not None:
            self.add_ids([tokenizer.bos_id], False)

    def add_ids(self, ids: Sequence[int], loss: bool) -> None:
        self.tokens.extend(ids)
        self.loss.extend([loss] * len(ids))

    def add(self, text: str, loss: bool) -> None:
        self.add_ids(_encode(self.tokenizer, text), loss)

    def terminate(self, fallback: str | None = None, loss: bool = True) -> None:
        """The terminator: the EOS id, else the `fallback` text (if any)."""
        if self.tokenizer.eos_ids:
            self.add_ids([self.tokenizer.eos_ids[0]], loss)
        elif fallback:
            self.add(fallback, loss)

    def sample(self, source: str, line: int) -> Sample:
        sample = Sample(np.asarray(self.tokens, np.int32), np.asarray(self.loss, bool), source, line)
        if not sample.loss.any():
            raise DataError("no token carries the loss")
        return sample


def _render_turns(b: _Builder, messages: Sequence[Mapping[str, Any]], *, train: bool) -> None:
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "assistant":
            b.add("<|assistant|>\n", False)
            b.add(content, train)
            b.terminate("\n", train)
        else:
            b.add(f"<|{role}|>\n{content}\n", False)


def _templated(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, train: bool) -> _Builder:
    """The conversation rendered by the tokenizer's chat template (its text holds the special tokens, so no BOS
    is added), the loss on each assistant turn: what the template adds from the assistant header to the end of
    that turn. Each turn's rendering must extend the one before it, or the turns cannot be told apart."""
    template = tokenizer.chat_template
    b, done = _Builder(tokenizer, bos=False), ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        header = template.render(messages[:i], add_generation_prompt=True)
        turn = template.render(messages[: i + 1], add_generation_prompt=False)
        if not header.startswith(done) or not turn.startswith(header):
            raise DataError("the tokenizer's chat template does not render each turn as an extension of the ones "
                            "before it, so the assistant turns cannot be masked")
        b.add(header[len(done):], False)
        b.add(turn[len(header):], train)
        done = turn
    full = template.render(messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise DataError("the tokenizer's chat template renders the whole conversation differently from its turns")
    b.add(full[len(done):], False)
    return b


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list of {"role", "content"} objects')
    assistant = False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where} must be an object with \"role\" and \"content\", got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise DataError(f'{where} must have "role" and "content"')
        if m["role"] not in ROLES:
            raise DataError(f"{where}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f'{where}: "content" must be a string, got {type(m["content"]).__name__}')
        if m["role"] == "assistant":
            if not m["content"]:
                raise DataError(f"{where}: empty assistant content")
            assistant = True
    if not assistant:
        raise DataError("no assistant turn (the loss is on assistant turns only)")


def encode_record(record: Any, tokenizer: Tokenizer, *, source: str = MEMORY, line: int = 0) -> Sample:
    """One record -> `Sample`; raises `DataError` (without the location) when it is malformed."""
    if not isinstance(record, dict):
        raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
    shapes = [k for k, keys in (("text", ("text",)), ("prompt/completion", ("prompt", "completion")),
                                 ("messages", ("messages",))) if any(key in record for key in keys)]
    if len(shapes) != 1:
        found = ", ".join(sorted(record)) or "none"
        raise DataError(('several record shapes in one record (' + " + ".join(shapes) + ")") if shapes else
                        f'expected "text", "prompt"+"completion" or "messages"; keys: {found}')
    b = _Builder(tokenizer)
    if shapes[0] == "text":
        text = record["text"]
        if not isinstance(text, str):
            raise DataError(f'"text" must be a string, got {type(text).__name__}')
        if not text.strip():
            raise DataError('empty "text"')
        b.add(text, True)
        b.terminate()
    elif shapes[0] == "prompt/completion":
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f'"{key}" is missing (a prompt record needs "prompt" and "completion")')
            if not isinstance(record[key], str):
                raise DataError(f'"{key}" must be a string, got {type(record[key]).__name__}')
        if not record["completion"]:
            raise DataError('empty "completion"')
        b.add(record["prompt"], False)
        b.add(record["completion"], True)
        b.terminate()
    else:
        _check_messages(record["messages"])
        if tokenizer.chat_template is not None:
            b = _templated(tokenizer, record["messages"], train=True)
        else:
            _render_turns(b, record["messages"], train=True)
    return b.sample(source, line)


def chat_prompt_ids(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> list[int]:
    """Token ids of a conversation followed by the assistant's header, rendered by the tokenizer's chat template
    (as transformers' `apply_chat_template(..., add_generation_prompt=True)`), else in the plain chat format
    with the ``<|assistant|>\\n`` header: the prompt from which a model finetuned on ``"messages"`` records
    generates the next assistant turn."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
    if tokenizer.chat_template is not None:
        return _encode(tokenizer, tokenizer.chat_template.render(messages, add_generation_prompt=True))
    b = _Builder(tokenizer)
    _render_turns(b, messages, train=False)
    b.add("<|assistant|>\n", False)
    return b.tokens


def _collect(items: Iterable[tuple[int, Any]], tokenizer: Tokenizer, source: str, strict: bool,
             what: str) -> Dataset:
    samples: list[Sample] = []
    problems: list[DataProblem] = []
    for line, record in items:
        try:
            if isinstance(record, DataError):
                raise record
            samples.append(encode_record(record, tokenizer, source=source, line=line))
        except DataError as e:
            problem = DataProblem(source, line, str(e))
            if strict:
                raise DataError(str(problem)) from None
            problems.append(problem)
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:_WARN_LIST])
        more = f"\n  ... and {len(problems) - _WARN_LIST} more" if len(problems) > _WARN_LIST else ""
        log.warning("%s: skipped %d malformed record(s) of %d:\n  %s%s", source, len(problems),
                    len(problems) + len(samples), listed, more)
    if not samples:
        detail = f"; first problem: {problems[0]}" if problems else ""
        raise DataError(f"{source}: no usable sample ({what} {len(problems)} malformed record(s)){detail}")
    return Dataset(samples, problems, source)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, DataError(f"invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as e:
                yield i, DataError(f"invalid JSON: {e.msg} (column {e.colno})")


def load_jsonl(path: str | Path, tokenizer: Tokenizer, *, strict: bool = False) -> Dataset:
    """Reads a JSONL file of records (see the module docstring); problems are reported as ``path:line``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        return _collect(_jsonl_lines(path), tokenizer, str(path), strict, "the file has")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def from_records(records: Iterable[Any], tokenizer: Tokenizer, *, strict: bool = False,
                 source: str = MEMORY) -> Dataset:
    """In-memory records, validated like a file's lines; record i is reported as ``<memory>:{i + 1}``."""
    return _collect(enumerate(records, start=1), tokenizer, source, strict, "the records hold")


T = TypeVar("T")


def split(data: Dataset | Sequence[T], eval_fraction: float, seed: int = 0):
    """Deterministic train/eval split -> ``(train, eval)``, each keeping the original order.

    ``round(n * eval_fraction)`` items (at least 1 when ``eval_fraction > 0``) drawn with
    ``numpy.random.default_rng(seed)`` go to eval; train keeps at least one. A `Dataset` splits into
    `Dataset`s (ids are renumbered, problems stay with train), any other sequence into lists.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(data)
    k = 0 if eval_fraction == 0 else max(1, round(n * eval_fraction))
    if k and k >= n:
        raise DataError(f"cannot hold out {k} of {n} samples for eval and keep some for training")
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:k]] = True
    train = [data[i] for i in range(n) if not held[i]]
    evals = [data[i] for i in range(n) if held[i]]
    if isinstance(data, Dataset):
        return Dataset(train, data.problems, data.source), Dataset(evals, (), data.source)
    return train, evals


# ---------------------------------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True, eq=False)
class MicroBatch:
    """A packed micro-batch; every array is ``[rows, seq_len]``.

    tokens       int32   input ids (``pad_id`` on padding)
    targets      int32   the next token of the same segment, 0 where there is none (segment end, padding)
    loss_mask    float32 1 where ``targets[r, t]`` is a trained token of the same segment, else 0
    segment_ids  int32   1, 2, ... for the segments (samples or windows) of a row in order; 0 on padding
    positions    int32   position within the segment, from 0; 0 on padding
    num_loss_tokens      ``loss_mask.sum()``
    sample_ids           dataset ids of the samples it holds, in packing order, one per occurrence (the windows
                         of a split sample count once; a sample may recur once an epoch boundary is crossed)
    pieces               ``(sample_id, window)`` of every segment in packing order (window: index among the
                         sample's kept windows, 0 unless split); `DataLoader.push_back` returns exactly these
    slots                ``(row, segment_id)`` where each of `pieces` lies (first-fit interleaves the rows)
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    num_loss_tokens: int
    sample_ids: tuple[int, ...]
    pieces: tuple[tuple[int, int], ...]
    slots: tuple[tuple[int, int], ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    @property
    def num_tokens(self) -> int:
        """Tokens that are not padding."""
        return int((self.segment_ids > 0).sum())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}


def _pack(rows: int, seq_len: int, placed: Sequence[tuple[int, int, int, int, int]], dataset: Dataset,
          pad_id: int, pieces: Sequence[tuple[int, int]]) -> MicroBatch:
    """`placed`: (row, offset, segment_id, start, end) of each piece's token range, in packing order."""
    flat_tokens, flat_loss, starts = dataset.flat()
    p = np.asarray(placed, np.int64).reshape(-1, 5)
    row, off, segment, a, b = p.T
    sid = np.asarray([s for s, _ in pieces], np.int64)
    m = b - a
    piece = np.repeat(np.arange(len(p)), m)
    within = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
    src = (starts[sid] + a)[piece] + within
    dst = (row * seq_len + off)[piece] + within
    inner = within < m[piece] - 1  # tokens with a next token in the same segment
    tokens = np.full(rows * seq_len, pad_id, np.int32)
    targets = np.zeros(rows * seq_len, np.int32)
    mask = np.zeros(rows * seq_len, np.float32)
    seg = np.zeros(rows * seq_len, np.int32)
    pos = np.zeros(rows * seq_len, np.int32)
    tokens[dst] = flat_tokens[src]
    targets[dst[inner]] = flat_tokens[src[inner] + 1]
    mask[dst[inner]] = flat_loss[src[inner] + 1]
    seg[dst] = segment[piece]
    pos[dst] = within
    shape = (rows, seq_len)
    sample_ids = tuple(s for i, (s, w) in enumerate(pieces)
                       if i == 0 or pieces[i - 1][0] != s or pieces[i - 1][1] >= w)
    return MicroBatch(tokens.reshape(shape), targets.reshape(shape), mask.reshape(shape), seg.reshape(shape),
                      pos.reshape(shape), int(mask.sum()), sample_ids, tuple(pieces),
                      tuple((int(r), int(k)) for r, k in zip(row, segment, strict=True)))


class DataLoader:
    """Packs a `Dataset` into ``rows x seq_len`` micro-batches in a seeded order, with a resumable cursor.

    ``epochs=None`` repeats forever. `next_batch` raises `StopIteration` once a finite number of epochs is
    exhausted (after a last, partly filled micro-batch). See the module docstring for packing and overflow.
    ``pad_id`` fills the padding of `MicroBatch.tokens`; with ``vocab_size`` every token id is checked against
    the model's vocabulary up front.
    """

    def __init__(self, dataset: Dataset, rows: int, seq_len: int, *, seed: int = 0, epochs: int | None = None,
                 shuffle: bool = True, overflow: Overflow = "truncate", pad_id: int = 0,
                 vocab_size: int | None = None):
        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a harli_jax.lora.data.Dataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise DataError(f"{dataset.source}: the dataset is empty")
        if rows < 1 or seq_len < 2:
            raise DataError(f"a micro-batch needs rows >= 1 and seq_len >= 2, got rows={rows}, seq_len={seq_len}")
        if overflow not in ("truncate", "split"):
            raise DataError(f"overflow must be 'truncate' or 'split', got {overflow!r}")
        if epochs is not None and epochs < 1:
            raise DataError(f"epochs must be >= 1 or None (forever), got {epochs}")
        if vocab_size is not None:
            bad = next((s for s in dataset.samples if len(s) and (s.tokens.min() < 0 or s.tokens.max() >= vocab_size)),
                       None)
            if bad is not None:
                tid = int(bad.tokens.min() if bad.tokens.min() < 0 else bad.tokens.max())
                raise DataError(f"{bad.source}:{bad.line}: token id {tid} is outside the model's vocabulary of "
                                f"{vocab_size} (a tokenizer for another model?)")
        self.dataset, self.rows, self.seq_len = dataset, int(rows), int(seq_len)
        self.seed, self.epochs, self.shuffle, self.overflow, self.pad_id = int(seed), epochs, shuffle, overflow, pad_id
        self._windows = [self._plan(s) for s in dataset.samples]  # per sample: token ranges (start, end)
        self.overflow_stats = self._stats()
        if self.overflow_stats["usable_samples"] == 0:
            raise DataError(f"{dataset.source}: no sample has a trained token within its first {seq_len} tokens")
        st = self.overflow_stats
        if st["truncated_samples"] and (seq_len, overflow) not in dataset._warned:  # once per dataset and length
            dataset._warned.add((seq_len, overflow))
            log.warning("%s: %d of %d samples are longer than seq_len=%d and were truncated (%d trained tokens "
                        "dropped, %d samples left without any)", dataset.source, st["truncated_samples"],
                        len(dataset), seq_len, st["dropped_loss_tokens"], st["dropped_samples"])
        self._reset()

    # -- planning

    def _plan(self, s: Sample) -> tuple[tuple[int, int], ...]:
        n, L = len(s), self.seq_len
        if n <= L:
            spans = [(0, n)]
        elif self.overflow == "truncate":
            spans = [(0, L)]
        else:
            spans = [(a, min(a + L, n)) for a in range(0, n - 1, L - 1)]
        return tuple((a, b) for a, b in spans if s.loss[a + 1:b].any())

    def _stats(self) -> dict[str, Any]:
        long = [i for i, s in enumerate(self.dataset.samples) if len(s) > self.seq_len]
        kept = sum(int(self.dataset.samples[i].loss[a + 1:b].sum()) for i, w in enumerate(self._windows)
                   for a, b in w)
        return {
            "overflow": self.overflow,
            "seq_len": self.seq_len,
            "long_samples": len(long),
            "truncated_samples": len(long) if self.overflow == "truncate" else 0,
            "split_samples": len(long) if self.overflow == "split" else 0,
            "windows": sum(len(w) for w in self._windows),
            "dropped_samples": sum(1 for w in self._windows if not w),
            "dropped_loss_tokens": self.dataset.num_loss_tokens - kept,
            "usable_samples": sum(1 for w in self._windows if w),
        }

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _reset(self) -> None:
        self._epoch = 0
        self._position = 0
        self._pending: deque[tuple[int, int]] = deque()
        self._samples_seen = 0
        self._order_cache = (0, self._order(0))

    # -- cursor

    @property
    def epoch(self) -> int:
        """The epoch whose order the cursor is in (0-based); it moves on when the next sample is drawn."""
        return self._epoch

    @property
    def samples_seen(self) -> int:
        """Samples handed out in micro-batches (a split sample counts with its last window), minus pushed back."""
        return self._samples_seen

    @property
    def exhausted(self) -> bool:
        return self._peek() is None

    def _current_order(self) -> np.ndarray:
        if self._order_cache[0] != self._epoch:
            self._order_cache = (self._epoch, self._order(self._epoch))
        return self._order_cache[1]

    def _peek(self) -> tuple[int, int] | None:
        """The next (sample, window), drawing samples from the order into the pending queue as needed."""
        n = len(self.dataset)
        while not self._pending:
            if self._position >= n:
                if self.epochs is not None and self._epoch + 1 >= self.epochs:
                    return None
                self._epoch += 1
                self._position = 0
            sid = int(self._current_order()[self._position])
            self._position += 1
            self._pending.extend((sid, w) for w in range(len(self._windows[sid])))
        return self._pending[0]

    def next_batch(self) -> MicroBatch:
        placed: list[tuple[int, int, int, int, int]] = []
        ids: list[tuple[int, int]] = []
        free = [self.seq_len] * self.rows
        count = [0] * self.rows
        first_open = 0  # rows before it have no room for any piece (pieces have >= 2 tokens)
        while (piece := self._peek()) is not None:
            sid, w = piece
            windows = self._windows[sid]
            a, b = windows[w]
            n = b - a
            row = next((r for r in range(first_open, self.rows) if free[r] >= n), None)
            if row is None:
                break
            count[row] += 1
            placed.append((row, self.seq_len - free[row], count[row], a, b))
            ids.append(piece)
            free[row] -= n
            while first_open < self.rows and free[first_open] < 2:
                first_open += 1
            self._pending.popleft()
            if w == len(windows) - 1:
                self._samples_seen += 1
        if not placed:
            raise StopIteration
        return _pack(self.rows, self.seq_len, placed, self.dataset, self.pad_id, ids)

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> MicroBatch:
        return self.next_batch()

    def push_back(self, batch: MicroBatch) -> None:
        """Returns an abandoned micro-batch's samples to the front of the queue, in their order: they are the
        first ones of the next micro-batch. Push several back newest first to restore the original order."""
        for sid, w in batch.pieces:
            if not (0 <= sid < len(self.dataset) and 0 <= w < len(self._windows[sid])):
                raise DataError(f"micro-batch piece {(sid, w)} does not belong to this loader's dataset")
        self._pending.extendleft((int(s), int(w)) for s, w in reversed(batch.pieces))
        self._samples_seen -= sum(1 for sid, w in batch.pieces if w == len(self._windows[sid]) - 1)

    def state(self) -> dict[str, Any]:
        """A JSON-serializable cursor: `restore` on a loader over the same data and settings resumes exactly."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "pending": [[s, w] for s, w in self._pending],
            "samples_seen": self._samples_seen,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "overflow": self.overflow,
            "num_samples": len(self.dataset),
            "fingerprint": self.dataset.fingerprint,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        try:
            if state["version"] != STATE_VERSION:
                raise DataError(f"data cursor version {state['version']} is not {STATE_VERSION}")
            expect = {"seed": self.seed, "shuffle": self.shuffle, "seq_len": self.seq_len,
                      "overflow": self.overflow, "num_samples": len(self.dataset),
                      "fingerprint": self.dataset.fingerprint}
            diff = [f"{k}: cursor {state[k]!r}, loader {v!r}" for k, v in expect.items() if state[k] != v]
            if diff:
                raise DataError("the data cursor belongs to other data or settings (" + "; ".join(diff) + ")")
            epoch, position = int(state["epoch"]), int(state["position"])
            pending = [(int(s), int(w)) for s, w in state["pending"]]
            samples_seen = int(state["samples_seen"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"malformed data cursor ({type(e).__name__}: {e})") from None
        if not 0 <= position <= len(self.dataset) or epoch < 0:
            raise DataError(f"data cursor out of range: epoch {epoch}, position {position}")
        if any(not (0 <= s < len(self.dataset) and 0 <= w < len(self._windows[s])) for s, w in pending):
            raise DataError("data cursor holds pieces outside the dataset")
        self._epoch, self._position, self._samples_seen = epoch, position, samples_seen
        self._pending = deque(pending)
