"""The embedded default finetuning task: upper-case a short word over a small alphabet.

Records are ``{"prompt": "cab>", "completion": "CAB"}``: a word of 3 to 5 letters drawn from ``abcdefgh``,
then ``>``; the completion is the word in capitals. Words are distinct within a dataset (8^3 + 8^4 + 8^5 =
37376 exist), so a held-out split holds words the model never saw. With the byte tokenizer a sample is at most
13 tokens (BOS, 5 letters, ``>``, 5 capitals, EOS), so a micro-batch packs many of them.

The task is learnable by the random-init tiny model (``configs/models/tiny.yaml``) through LoRA alone: each
completion letter is the capital of the prompt letter at the same index, which attention can find and which
generalizes to unseen words. ``held_out`` draws words that a dataset does not contain, to measure that;
``bench/finetune_accuracy.py`` records the exact-match accuracy of the default finetune on such words. The
loss cannot go much lower than about 5 on a random-init model: its frozen LM head (std 0.02, after an RMS
norm of unit weight) bounds the logits to about +-1.3 over 512 tokens; accuracy is the clearer signal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ALPHABET = "abcdefgh"
MIN_LEN, MAX_LEN = 3, 5
SEPARATOR = ">"


def _num_words(alphabet: str, min_len: int, max_len: int) -> int:
    return sum(len(alphabet) ** n for n in range(min_len, max_len + 1))


def default_dataset(num_samples: int = 2000, seed: int = 0, *, alphabet: str = ALPHABET, min_len: int = MIN_LEN,
                    max_len: int = MAX_LEN) -> list[dict[str, str]]:
    """``num_samples`` distinct ``{"prompt": word + ">", "completion": word.upper()}`` records, the same for
    the same arguments (``numpy.random.default_rng(seed)``)."""
    if not alphabet or len(set(alphabet)) != len(alphabet) or not alphabet.isalpha() or not alphabet.islower():
        raise ValueError(f"alphabet must be distinct lower-case letters, got {alphabet!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    capacity = _num_words(alphabet, min_len, max_len)
    if not 0 < num_samples <= capacity:
        raise ValueError(f"num_samples must be in 1..{capacity} (distinct words of {min_len}-{max_len} letters "
                         f"over {alphabet!r}), got {num_samples}")
    rng = np.random.default_rng(seed)
    letters = np.array(list(alphabet))
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    while len(out) < num_samples:
        word = "".join(letters[rng.integers(0, len(letters), rng.integers(min_len, max_len + 1))])
        if word in seen:
            continue
        seen.add(word)
        out.append({"prompt": word + SEPARATOR, "completion": word.upper()})
    return out


def held_out(exclude: Sequence[dict[str, str]], num_samples: int, seed: int = 1, *, alphabet: str = ALPHABET,
             min_len: int = MIN_LEN, max_len: int = MAX_LEN) -> list[dict[str, str]]:
    """``num_samples`` records of the task whose words appear in none of ``exclude`` (e.g. a job's whole
    dataset): an accuracy measured on them is on words the model never trained on."""
    taken = {r["prompt"] for r in exclude}
    pool = min(_num_words(alphabet, min_len, max_len), num_samples + len(taken))
    fresh = [r for r in default_dataset(pool, seed, alphabet=alphabet, min_len=min_len, max_len=max_len)
             if r["prompt"] not in taken]
    if len(fresh) < num_samples:
        raise ValueError(f"only {len(fresh)} words of {min_len}-{max_len} letters over {alphabet!r} are not "
                         f"excluded; asked for {num_samples}")
    return fresh[:num_samples]
