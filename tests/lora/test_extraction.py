"""The generated JSON-extraction task: deterministic, distinct sentences, a held-out split that shares no sentence
with the training data, and answers that hold exactly the sentence's facts in the one JSON shape."""

import json
import re
from types import SimpleNamespace

import pytest

from harli_jax.lora import extraction
from harli_jax.lora.default_data import default_dataset
from harli_jax.lora.extraction import CITIES, INSTRUCTION, NAMES, extraction_dataset, held_out
from harli_jax.runtime.job import default_records


def test_the_dataset_is_deterministic_and_its_sentences_distinct():
    data = extraction_dataset(500, seed=3)
    assert data == extraction_dataset(500, seed=3) and data != extraction_dataset(500, seed=4)
    sentences = [r["messages"][0]["content"] for r in data]
    assert len(set(sentences)) == 500 and all(s.startswith(INSTRUCTION + "\n") for s in sentences)


def test_each_answer_holds_the_sentences_facts_in_one_shape():
    for record in extraction_dataset(300, seed=0):
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        sentence = user["content"].split("\n", 1)[1]
        fields = json.loads(assistant["content"])
        assert list(fields) == ["name", "age", "city"] and fields["name"] in NAMES and fields["city"] in CITIES
        assert re.search(rf"\b{fields['name']}\b", sentence) and re.search(rf"\b{fields['city']}\b", sentence)
        assert re.search(rf"\b{fields['age']}\b", sentence)
        assert assistant["content"] == json.dumps(fields)  # the exact text, key order and spacing


def test_held_out_sentences_never_appear_in_the_training_data():
    data = extraction_dataset(2000, seed=0)
    test = held_out(data, 200, seed=1000)
    assert len(test) == 200
    assert not {r["messages"][0]["content"] for r in test} & {r["messages"][0]["content"] for r in data}
    with pytest.raises(ValueError, match="num_samples must be in 1.."):
        extraction_dataset(0)


def test_held_out_is_disjoint_even_where_few_sentences_exist(monkeypatch):
    # 2 names x 1 city x 72 ages x 1 template: 144 sentences, so drawing 100 and then 40 more at random would
    # repeat some of the first 100 if nothing excluded them.
    monkeypatch.setattr(extraction, "NAMES", ("Ana", "Bo"))
    monkeypatch.setattr(extraction, "CITIES", ("Rome",))
    monkeypatch.setattr(extraction, "TEMPLATES", ("{name} is {age} and lives in {city}.",))
    data = extraction_dataset(100, seed=0)
    test = held_out(data, 40, seed=1)
    assert not {r["messages"][0]["content"] for r in test} & {r["messages"][0]["content"] for r in data}
    with pytest.raises(ValueError, match=r"num_samples must be in 1\.\.44"):
        held_out(data, 45)


def test_a_job_without_data_trains_the_extraction_task_on_a_chat_model_and_upper_casing_elsewhere():
    chat, plain = SimpleNamespace(chat_template=object()), SimpleNamespace(chat_template=None)
    assert default_records(chat, seed=3) == extraction_dataset(seed=3)
    assert default_records(plain, seed=3) == default_dataset(seed=3)
