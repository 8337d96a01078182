"""Finetuning data: record shapes and loss flags, malformed input, packing, order, cursor, push-back, default task."""

import json
import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import train_bpe_tokenizer
from harli_jax.lora.data import (
    DataError,
    DataLoader,
    Dataset,
    Sample,
    chat_prompt_ids,
    default_dataset,
    encode_record,
    from_records,
    load_jsonl,
    split,
)
from harli_jax.model import ByteTokenizer, HFTokenizer

TOK = ByteTokenizer()
BOS, EOS = TOK.BOS, TOK.EOS


def b(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


class NoSpecialTokenizer(ByteTokenizer):
    bos_id = None
    eos_ids = ()


def synthetic(lengths, seed=0) -> Dataset:
    """Samples of given lengths with random ids (>= 3) and random loss flags (at least one trained token)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i, n in enumerate(lengths):
        loss = rng.random(n) < 0.6
        loss[0] = False
        loss[rng.integers(1, n)] = True
        samples.append(Sample(rng.integers(3, 259, n).astype(np.int32), loss, "<synthetic>", i + 1))
    return Dataset(samples, source="<synthetic>")


def drain(loader, limit=10_000):
    out = []
    for _ in range(limit):
        try:
            out.append(loader.next_batch())
        except StopIteration:
            return out
    raise AssertionError("the loader did not stop")


def same_batch(x, y) -> bool:
    return (x.pieces == y.pieces and x.sample_ids == y.sample_ids and x.num_loss_tokens == y.num_loss_tokens
            and all(np.array_equal(x.arrays()[k], y.arrays()[k]) for k in x.arrays()))


# ---------------------------------------------------------------------------------------------- record shapes


def test_text_record_trains_every_token():
    s = encode_record({"text": "hi"}, TOK)
    assert s.tokens.dtype == np.int32 and s.tokens.tolist() == [BOS, *b("hi"), EOS]
    assert s.loss.tolist() == [False, True, True, True]
    assert s.num_loss_tokens == 3


def test_prompt_completion_trains_completion_and_eos_only():
    s = encode_record({"prompt": "ab>", "completion": "AB", "id": 7}, TOK)  # extra keys are ignored
    assert s.tokens.tolist() == [BOS, *b("ab>"), *b("AB"), EOS]
    assert s.loss.tolist() == [False] * 4 + [True] * 3
    empty_prompt = encode_record({"prompt": "", "completion": "x"}, TOK)
    assert empty_prompt.tokens.tolist() == [BOS, *b("x"), EOS] and empty_prompt.loss.tolist() == [False, True, True]


def test_messages_plain_chat_format_trains_assistant_turns():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "ok"}]
    s = encode_record({"messages": messages}, TOK)
    expected, loss = [BOS], [False]
    for text, trained in [("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n", False), ("yo", True),
                          (None, True), ("<|user|>\nok?\n<|assistant|>\n", False), ("ok", True), (None, True)]:
        ids = [EOS] if text is None else b(text)
        expected += ids
        loss += [trained] * len(ids)
    assert s.tokens.tolist() == expected and s.loss.tolist() == loss
    # The generation prompt is the training rendering up to the last assistant header.
    prompt = chat_prompt_ids(messages[:4], TOK)
    assert prompt == expected[:len(prompt)] and TOK.decode(prompt).endswith("ok?\n<|assistant|>\n")
    assert expected[len(prompt):] == [*b("ok"), EOS]


def test_tokenizer_without_bos_or_eos():
    tok = NoSpecialTokenizer()
    assert encode_record({"text": "ab"}, tok).loss.tolist() == [False, True]  # nothing predicts the first token
    assert encode_record({"prompt": "a", "completion": "b"}, tok).tokens.tolist() == b("ab")
    s = encode_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, tok)
    assert s.tokens.tolist() == b("<|user|>\nq\n<|assistant|>\na\n")  # the newline terminates the assistant turn
    assert s.loss.tolist() == [False] * len(b("<|user|>\nq\n<|assistant|>\n")) + [True, True]


def test_hf_tokenizer_places_special_ids_once(tmp_path):
    train_bpe_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = HFTokenizer(tmp_path)
    s = encode_record({"prompt": "the quick ", "completion": "brown fox"}, tok)
    ids = s.tokens.tolist()
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1 and ids.count(2) == 1
    trained = [t for t, f in zip(ids, s.loss.tolist(), strict=True) if f]
    assert trained[-1] == 2 and tok.decode(trained[:-1]) == "brown fox"
    assert tok.decode([t for t, f in zip(ids, s.loss.tolist(), strict=True) if not f][1:]) == "the quick "


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<eot>{{ m['role'] }} {{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<eot>assistant {% endif %}")
CONVERSATION = [{"role": "system", "content": "the lazy dog"}, {"role": "user", "content": "quick"},
                {"role": "assistant", "content": "brown fox"}, {"role": "user", "content": "jumps"},
                {"role": "assistant", "content": "over the dog"}]


def test_a_chat_template_renders_chat_as_transformers_does_and_masks_the_assistant_turns(tmp_path):
    from transformers import PreTrainedTokenizerFast

    train_bpe_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = HFTokenizer(tmp_path)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    history = CONVERSATION[:4]
    want = hf.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    assert tok.chat_template.render(history, add_generation_prompt=True) == want
    assert chat_prompt_ids(history, tok) == hf(want, add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids(history, tok)[0] == 1  # the template's BOS, once

    sample = encode_record({"messages": CONVERSATION}, tok)
    ids, loss = sample.tokens.tolist(), sample.loss.tolist()
    full = hf.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False).replace(" ", "") == full.replace(" ", "")
    trained = "".join(tok.decode([t], skip_special_tokens=False) if f else "|" for t, f in zip(ids, loss, strict=True))
    assert [part for part in trained.split("|") if part] == ["brown fox</s>", "over the dog</s>"], trained
    assert ids.count(1) == 1

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | length }}"}))
    with pytest.raises(DataError, match="does not render each turn as an extension"):
        encode_record({"messages": CONVERSATION}, HFTokenizer(tmp_path))


# ---------------------------------------------------------------------------------------------- malformed input

BAD_LINES = [
    (2, "not json", "invalid JSON"),
    (4, "[1, 2]", "must be a JSON object"),
    (5, '{"text": 3}', '"text" must be a string'),
    (6, '{"text": "  "}', 'empty "text"'),
    (7, '{"prompt": "a"}', '"completion" is missing'),
    (8, '{"prompt": "a", "completion": "b", "text": "c"}', "several record shapes"),
    (9, '{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    (10, '{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    (11, '{"txt": "x"}', "keys: txt"),
    (12, '{"prompt": "a", "completion": ""}', 'empty "completion"'),
    (13, '{"messages": [{"role": "assistant", "content": 5}]}', '"content" must be a string'),
]


@pytest.fixture
def messy_file(tmp_path):
    lines = {1: '{"text": "good one"}', 3: "", 14: '{"prompt": "p", "completion": "c"}'}
    lines.update({n: text for n, text, _ in BAD_LINES})
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines[i].encode() for i in range(1, 15)) + b"\n\xff\xfe\n")  # line 15: bad UTF-8
    return path


def test_malformed_lines_are_skipped_and_reported(messy_file, caplog):
    with caplog.at_level(logging.WARNING, logger="harli_jax"):
        ds = load_jsonl(messy_file, TOK)
    assert [(s.line, TOK.decode(s.tokens.tolist())) for s in ds] == [(1, "good one"), (14, "pc")]
    assert [p.line for p in ds.problems] == [n for n, _, _ in BAD_LINES] + [15]
    for p, (_, _, message) in zip(ds.problems, BAD_LINES, strict=False):
        assert message in p.message and p.source == str(messy_file)
    assert "invalid UTF-8" in ds.problems[-1].message
    assert str(ds.problems[0]).startswith(f"{messy_file}:2: invalid JSON")
    warning = caplog.text
    assert "skipped 12 malformed record(s)" in warning and f"{messy_file}:2:" in warning
    assert f"{messy_file}:11:" in warning and "and 2 more" in warning  # the first 10 are listed


def test_strict_raises_on_the_first_problem(messy_file):
    with pytest.raises(DataError, match=rf"^{messy_file}:2: invalid JSON"):
        load_jsonl(messy_file, TOK, strict=True)


def test_in_memory_records_are_validated_the_same_way():
    ds = from_records([{"text": "a"}, {"text": ""}, {"prompt": "x", "completion": "y"}], TOK)
    assert len(ds) == 2 and [s.line for s in ds] == [1, 3]
    assert [str(p) for p in ds.problems] == ['<memory>:2: empty "text"']
    with pytest.raises(DataError, match=r"^<memory>:2: empty \"text\""):
        from_records([{"text": "a"}, {"text": ""}], TOK, strict=True)


def test_empty_and_missing_inputs(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such data file"):
        load_jsonl(tmp_path / "nope.jsonl", TOK)
    with pytest.raises(DataError, match="not a file"):
        load_jsonl(tmp_path, TOK)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{empty}: no usable sample"):
        load_jsonl(empty, TOK)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match=rf"{bad}: no usable sample .*1 malformed.*{bad}:1: empty \"text\""):
        load_jsonl(bad, TOK)
    with pytest.raises(DataError, match="<memory>: no usable sample"):
        from_records([], TOK)
    with pytest.raises(DataError, match="the dataset is empty"):
        DataLoader(Dataset([]), rows=1, seq_len=8)


# ---------------------------------------------------------------------------------------------- packing


def test_packed_batch_by_hand():
    ds = from_records([{"text": "ab"}, {"prompt": "x", "completion": "y"}, {"text": "abcd"}], TOK)
    batch = DataLoader(ds, rows=2, seq_len=8, shuffle=False).next_batch()
    a, bb, c, d, x, y = (b(ch)[0] for ch in "abcdxy")
    assert batch.tokens.tolist() == [[BOS, a, bb, EOS, BOS, x, y, EOS], [BOS, a, bb, c, d, EOS, 0, 0]]
    assert batch.targets.tolist() == [[a, bb, EOS, 0, x, y, EOS, 0], [a, bb, c, d, EOS, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[1, 1, 1, 0, 0, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 0]]
    assert batch.num_loss_tokens == 10 and batch.num_tokens == 14
    assert batch.sample_ids == (0, 1, 2) and batch.pieces == ((0, 0), (1, 0), (2, 0))
    assert batch.slots == ((0, 1), (0, 2), (1, 1))
    assert {k: v.dtype for k, v in batch.arrays().items()} == {
        "tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
        "positions": np.int32}


def test_first_fit_keeps_the_data_order():
    # Lengths 6, 5, 4, 2 into 2 rows of 8: 6 -> row 0, 5 -> row 1, 4 fits nowhere and closes the micro-batch
    # (the 2 that would fit is not taken out of order); then 4 and 2 share a row.
    ds = synthetic([6, 5, 4, 2])
    loader = DataLoader(ds, rows=2, seq_len=8, shuffle=False, epochs=1)
    first, second = drain(loader)
    assert first.sample_ids == (0, 1) and first.segment_ids.tolist() == [[1] * 6 + [0] * 2, [1] * 5 + [0] * 3]
    assert second.sample_ids == (2, 3) and second.segment_ids.tolist() == [[1] * 4 + [2] * 2 + [0] * 2, [0] * 8]


def test_truncate_and_split_overflow(caplog):
    ds = from_records([{"prompt": "", "completion": "abcdefghij"},  # 12 tokens, 11 trained
                       {"prompt": "abcdefghijkl", "completion": "x"},  # trained tokens only past 8: dropped
                       {"text": "ab"}], TOK)
    trunc = DataLoader(ds, rows=4, seq_len=8, shuffle=False, epochs=1)
    assert trunc.overflow_stats == {"overflow": "truncate", "seq_len": 8, "long_samples": 2, "truncated_samples": 2,
                                    "split_samples": 0, "windows": 2, "dropped_samples": 1,
                                    "dropped_loss_tokens": 4 + 2, "usable_samples": 2}
    (batch,) = drain(trunc)
    assert caplog.text.count("2 of 3 samples are longer than seq_len=8 and were truncated (6 trained tokens") == 1
    DataLoader(ds, rows=1, seq_len=8)  # reported once per dataset and seq_len
    assert caplog.text.count("were truncated") == 1
    assert batch.sample_ids == (0, 2) and batch.tokens[0].tolist() == [BOS, *b("abcdefg")]
    assert batch.num_loss_tokens == 7 + 3

    splits = DataLoader(ds, rows=4, seq_len=8, shuffle=False, epochs=1, overflow="split")
    st = splits.overflow_stats
    assert (st["split_samples"], st["truncated_samples"], st["windows"], st["dropped_loss_tokens"]) == (2, 0, 4, 0)
    batches = drain(splits)
    assert sum(x.num_loss_tokens for x in batches) == ds.num_loss_tokens == 11 + 2 + 3
    first = batches[0]
    # Windows of 8 overlapping by one token: [0, 8) and [7, 12) of sample 0; sample 1 (15 tokens) has windows
    # [0, 8), without a trained token and dropped, and [7, 15).
    assert first.pieces == ((0, 0), (0, 1), (1, 0), (2, 0))
    ids0 = ds[0].tokens.tolist()
    assert first.tokens[0].tolist() == ids0[:8] and first.tokens[1, :5].tolist() == ids0[7:]
    assert first.loss_mask[1, :5].tolist() == [1, 1, 1, 1, 0] and first.positions[1, :5].tolist() == [0, 1, 2, 3, 4]
    assert first.tokens[2].tolist() == ds[1].tokens[7:].tolist()
    assert first.loss_mask[2].sum() == 2  # "x" and EOS


def test_split_windows_can_span_micro_batches():
    ds = synthetic([20, 3])
    loader = DataLoader(ds, rows=1, seq_len=8, shuffle=False, epochs=1, overflow="split")
    first = loader.next_batch()
    assert loader.samples_seen == 0 and loader.state()["pending"] == [[0, 1], [0, 2]]  # counted with its last window
    batches = [first, *drain(loader)]
    assert [x.pieces for x in batches[:3]] == [((0, 0),), ((0, 1),), ((0, 2),)]
    assert [x.sample_ids for x in batches] == [(0,), (0,), (0,), (1,)]
    assert loader.samples_seen == 2
    assert sum(x.num_loss_tokens for x in batches) == ds.num_loss_tokens


def test_bad_loader_settings():
    ds = synthetic([4])
    for kwargs, match in [(dict(rows=0, seq_len=8), "rows >= 1"), (dict(rows=1, seq_len=1), "seq_len >= 2"),
                          (dict(rows=1, seq_len=8, overflow="wrap"), "overflow must be"),
                          (dict(rows=1, seq_len=8, epochs=0), "epochs must be")]:
        with pytest.raises(DataError, match=match):
            DataLoader(ds, **kwargs)
    with pytest.raises(DataError, match=r"<synthetic>:1: token id \d+ is outside the model's vocabulary of 10"):
        DataLoader(ds, rows=1, seq_len=8, vocab_size=10)
    with pytest.raises(DataError, match="1-D integer tokens and as many loss flags"):
        Sample(np.arange(3), np.ones(2, bool))
    assert Sample(np.arange(3), np.ones(3, bool)).loss.tolist() == [False, True, True]  # nothing predicts token 0
    prompt_only = Dataset([Sample(np.arange(3, 13, dtype=np.int32), np.arange(10) >= 8)])
    with pytest.raises(DataError, match="no sample has a trained token within its first 4 tokens"):
        DataLoader(prompt_only, rows=1, seq_len=4)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(lengths=st.lists(st.integers(2, 30), min_size=1, max_size=25), rows=st.integers(1, 3),
       seq_len=st.integers(2, 16), overflow=st.sampled_from(["truncate", "split"]), seed=st.integers(0, 3))
def test_packing_never_loses_or_duplicates_and_targets_stay_in_the_sample(lengths, rows, seq_len, overflow, seed):
    ds = synthetic(lengths, seed)
    try:
        loader = DataLoader(ds, rows=rows, seq_len=seq_len, seed=seed, epochs=1, overflow=overflow)
    except DataError as e:  # only when truncation leaves no sample with a trained token
        assert "no sample has a trained token" in str(e) and overflow == "truncate"
        assert not any(s.loss[:seq_len].any() for s in ds)
        return
    expected = {(sid, w) for sid in range(len(ds)) for w in range(len(loader._windows[sid]))}
    seen = []
    trained = {}
    for batch in drain(loader):
        assert batch.tokens.shape == (rows, seq_len) and batch.pieces
        seen += batch.pieces
        where = dict(zip(batch.slots, batch.pieces, strict=True))
        assert len(where) == len(batch.pieces)
        for r in range(rows):
            seg = batch.segment_ids[r]
            used = int((seg > 0).sum())
            assert (seg[used:] == 0).all() and (batch.loss_mask[r, used:] == 0).all()
            for k in range(1, int(seg.max(initial=0)) + 1):
                sid, w = where[(r, k)]
                a, end = loader._windows[sid][w]
                cols = np.flatnonzero(seg == k)
                assert cols.tolist() == list(range(cols[0], cols[0] + end - a))  # contiguous
                sample = ds[sid]
                assert batch.tokens[r, cols].tolist() == sample.tokens[a:end].tolist()
                assert batch.positions[r, cols].tolist() == list(range(end - a))
                # Every loss token's target is the next token of its own sample, and carries its loss flag.
                for j, c in enumerate(cols):
                    if batch.loss_mask[r, c]:
                        assert j + 1 < len(cols) and batch.targets[r, c] == sample.tokens[a + j + 1]
                        assert sample.loss[a + j + 1]
                        assert (sid, a + j + 1) not in trained
                        trained[(sid, a + j + 1)] = True
                    elif j + 1 < len(cols):
                        assert not sample.loss[a + j + 1]
                assert batch.targets[r, cols[-1]] == 0
        assert batch.num_loss_tokens == int(batch.loss_mask.sum())
    assert sorted(seen) == sorted(expected) and len(seen) == len(expected)
    if overflow == "split":
        assert len(trained) == ds.num_loss_tokens  # nothing trained twice, nothing lost
    else:
        assert len(trained) == ds.num_loss_tokens - loader.overflow_stats["dropped_loss_tokens"]


# ---------------------------------------------------------------------------------------------- order and cursor


def order_of(loader, n_batches):
    return [sid for _ in range(n_batches) for sid in loader.next_batch().sample_ids]


def test_order_is_deterministic_per_seed_and_epoch():
    ds = synthetic([5] * 40)
    a = order_of(DataLoader(ds, rows=2, seq_len=10, seed=1), 40)
    assert a == order_of(DataLoader(ds, rows=2, seq_len=10, seed=1), 40)
    assert a != order_of(DataLoader(ds, rows=2, seq_len=10, seed=2), 40)
    assert sorted(a[:40]) == list(range(40)) and sorted(a[40:80]) == list(range(40))
    assert a[:40] != a[40:80]  # a new permutation each epoch
    assert a[:40] == np.random.default_rng([1, 0]).permutation(40).tolist()
    assert order_of(DataLoader(ds, rows=2, seq_len=10, shuffle=False), 10) == list(range(40))


def test_finite_epochs_end_with_stop_iteration():
    ds = synthetic([3, 4, 5, 6, 7])
    loader = DataLoader(ds, rows=1, seq_len=12, seed=0, epochs=2)
    batches = list(loader)
    assert sorted(sid for x in batches for sid in x.sample_ids) == sorted(list(range(5)) * 2)
    assert loader.samples_seen == 10 and loader.epoch == 1 and loader.exhausted
    with pytest.raises(StopIteration):
        loader.next_batch()
    # Micro-batches run on across the epoch boundary: 2 x 25 tokens fill ceil(50 / 12) rows at best.
    assert len(batches) < 10


@pytest.mark.parametrize("overflow", ["truncate", "split"])
@pytest.mark.parametrize("cut", [0, 1, 7, 23])
def test_state_restore_resumes_exactly(overflow, cut):
    ds = synthetic(np.random.default_rng(5).integers(2, 30, 30).tolist())
    original = DataLoader(ds, rows=2, seq_len=12, seed=3, overflow=overflow)
    for _ in range(cut):
        original.next_batch()
    state = json.loads(json.dumps(original.state()))
    resumed = DataLoader(ds, rows=2, seq_len=12, seed=3, overflow=overflow)
    resumed.restore(state)
    assert (resumed.epoch, resumed.samples_seen) == (original.epoch, original.samples_seen)
    for _ in range(40):  # past several epoch boundaries
        assert same_batch(original.next_batch(), resumed.next_batch())
    assert resumed.state() == original.state()


def test_restore_at_the_end_of_a_finite_run():
    ds = synthetic([4, 5, 6])
    loader = DataLoader(ds, rows=1, seq_len=8, epochs=1)
    drain(loader)
    again = DataLoader(ds, rows=1, seq_len=8, epochs=1)
    again.restore(loader.state())
    with pytest.raises(StopIteration):
        again.next_batch()


def test_push_back_returns_samples_first_and_survives_restore():
    ds = synthetic(np.random.default_rng(1).integers(2, 12, 40).tolist())
    reference = DataLoader(ds, rows=2, seq_len=16, seed=0)
    expected = [reference.next_batch() for _ in range(6)]

    loader = DataLoader(ds, rows=2, seq_len=16, seed=0)
    loader.next_batch()
    abandoned = loader.next_batch()
    seen = loader.samples_seen
    loader.push_back(abandoned)
    assert loader.samples_seen == seen - len(abandoned.sample_ids)
    assert loader.state()["pending"][:len(abandoned.pieces)] == [list(p) for p in abandoned.pieces]
    # Through a checkpoint: the pushed-back samples come next, then the run goes on as if never started.
    resumed = DataLoader(ds, rows=2, seq_len=16, seed=0)
    resumed.restore(json.loads(json.dumps(loader.state())))
    for x in expected[1:]:
        assert same_batch(resumed.next_batch(), x)
        assert same_batch(loader.next_batch(), x)


def test_push_back_of_several_batches_and_after_the_end():
    ds = synthetic([4] * 6)
    loader = DataLoader(ds, rows=1, seq_len=8, shuffle=False, epochs=1)
    x, y, z = drain(loader)
    loader.push_back(z)
    loader.push_back(y)  # newest first restores the original order
    assert [b.pieces for b in drain(loader)] == [y.pieces, z.pieces]
    assert loader.samples_seen == 6


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(ops=st.lists(st.sampled_from(["next", "next", "next", "push_back", "checkpoint"]), max_size=60),
       overflow=st.sampled_from(["truncate", "split"]), seed=st.integers(0, 3))
def test_any_mix_of_batches_push_backs_and_restores_matches_an_uninterrupted_loader(ops, overflow, seed):
    ds = synthetic(np.random.default_rng(seed).integers(2, 14, 9).tolist(), seed)

    def make():
        return DataLoader(ds, rows=2, seq_len=8, seed=seed, epochs=2, overflow=overflow)

    straight, restarted = make(), make()
    delivered: list[tuple[int, int]] = []
    last = None
    for op in ops + ["next"] * 100:
        if op == "checkpoint":
            restarted = make()
            restarted.restore(json.loads(json.dumps(straight.state())))
        elif op == "push_back" and last is not None:
            straight.push_back(last)
            restarted.push_back(last)
            del delivered[len(delivered) - len(last.pieces):]
            last = None
        elif op == "next":
            try:
                last = straight.next_batch()
            except StopIteration:
                with pytest.raises(StopIteration):
                    restarted.next_batch()
                last = None
                continue
            assert same_batch(last, restarted.next_batch())
            delivered += last.pieces
        assert straight.samples_seen == restarted.samples_seen
    # Pushed-back samples are seen again, nothing is lost: every piece of every sample, once per epoch.
    expected = [(sid, w) for sid in range(len(ds)) for w in range(len(straight._windows[sid]))]
    assert sorted(delivered) == sorted(expected * 2)
    assert straight.samples_seen == 2 * sum(1 for w in straight._windows if w)


def test_restore_rejects_a_foreign_or_malformed_cursor():
    ds = synthetic([4, 5, 6])
    state = DataLoader(ds, rows=1, seq_len=8, seed=0).state()
    with pytest.raises(DataError, match="seed: cursor 0, loader 1"):
        DataLoader(ds, rows=1, seq_len=8, seed=1).restore(state)
    with pytest.raises(DataError, match="fingerprint"):
        DataLoader(synthetic([4, 5, 6], seed=9), rows=1, seq_len=8, seed=0).restore(state)
    with pytest.raises(DataError, match="malformed data cursor"):
        DataLoader(ds, rows=1, seq_len=8).restore({k: v for k, v in state.items() if k != "pending"})
    with pytest.raises(DataError, match="outside the dataset"):
        DataLoader(ds, rows=1, seq_len=8).restore({**state, "pending": [[7, 0]]})
    # rows may change: the cursor is a position in the sample order, not in micro-batches.
    DataLoader(ds, rows=3, seq_len=8, seed=0).restore(state)


# ---------------------------------------------------------------------------------------------- split, default task


def test_split_is_deterministic_and_disjoint():
    ds = from_records(default_dataset(100, seed=0), TOK)
    train, evals = split(ds, 0.1, seed=4)
    assert (len(train), len(evals)) == (90, 10) and isinstance(train, Dataset)
    assert sorted([s.line for s in train] + [s.line for s in evals]) == list(range(1, 101))
    assert [s.line for s in evals] == [s.line for s in split(ds, 0.1, seed=4)[1]]
    assert [s.line for s in evals] != [s.line for s in split(ds, 0.1, seed=5)[1]]
    assert [s.line for s in train] == sorted(s.line for s in train)  # original order kept
    records = list(range(10))
    assert split(records, 0.25, seed=0) == split(records, 0.25, seed=0) and len(split(records, 0.25)[1]) == 2
    assert split(records, 0.0) == (records, []) and len(split(records, 0.01)[1]) == 1
    for bad in (-0.1, 1.0):
        with pytest.raises(DataError, match="eval_fraction"):
            split(records, bad)
    with pytest.raises(DataError, match="keep some for training"):
        split([1], 0.5)


def test_default_dataset_is_deterministic_and_well_formed():
    records = default_dataset(500, seed=0)
    assert records == default_dataset(500, seed=0) and records != default_dataset(500, seed=1)
    assert default_dataset(100, seed=0) == records[:100]
    words = [r["prompt"][:-1] for r in records]
    assert len(set(words)) == 500
    for r, w in zip(records, words, strict=True):
        assert set(r) == {"prompt", "completion"} and r["prompt"] == w + ">" and r["completion"] == w.upper()
        assert 3 <= len(w) <= 5 and set(w) <= set("abcdefgh")
    ds = from_records(records, TOK, strict=True)
    assert max(len(s) for s in ds) == 13 and not ds.problems
    with pytest.raises(ValueError, match="num_samples"):
        default_dataset(10**6)
