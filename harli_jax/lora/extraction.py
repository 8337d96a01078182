"""A generated finetuning task for an instruct model: pull a person's name, age and city out of a sentence into
one fixed JSON shape.

A record is a chat: the user asks `INSTRUCTION` about a sentence made from one of `TEMPLATES` (the fields in
varying order and wording), the assistant answers `{"name": "Maria", "age": 34, "city": "Lisbon"}` exactly (keys
in that order, `json.dumps`'s spacing). A base instruct model gets the facts but rarely this exact shape; a LoRA
adapter learns it, and exact match on sentences it never trained on scores that (`held_out`). Everything is
generated here from fixed lists and a seed: nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

INSTRUCTION = "Extract the person's name, age and city from this sentence as JSON with the keys name, age, city:"
NAMES = ("Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Noah", "Fatima", "Lucas", "Sofia", "Ivan",
         "Chen", "Amara", "Mateo", "Elif", "Kofi", "Hannah", "Ravi", "Ingrid", "Diego", "Yara", "Tomas", "Mei",
         "Samuel", "Leila", "Anton", "Zara", "Felix", "Nadia", "Oscar", "Keiko", "Victor", "Alma", "Jonas", "Rosa",
         "Emeka", "Clara", "Hugo", "Sana", "Pablo", "Greta", "Malik", "Vera", "Arjun", "Lucia", "Erik", "Dalia")
CITIES = ("Lisbon", "Toronto", "Osaka", "Cairo", "Berlin", "Lima", "Mumbai", "Denver", "Nairobi", "Oslo",
          "Seville", "Kyiv", "Shanghai", "Accra", "Bogota", "Izmir", "Dublin", "Hanoi", "Perth", "Prague", "Quito",
          "Tunis", "Krakow", "Busan", "Glasgow", "Porto", "Madras", "Austin", "Tallinn", "Manila", "Geneva",
          "Rabat", "Leeds", "Salta", "Bergen", "Durban", "Naples", "Taipei", "Halifax", "Lyon")
TEMPLATES = ("{name} is {age} years old and lives in {city}.",
             "Meet {name}, a {age}-year-old from {city}.",
             "{city} is home to {name}, who turned {age} this year.",
             "At {age}, {name} moved to {city} for work.",
             "My neighbor {name} ({age}) grew up in {city}.",
             "{name}, aged {age}, was born and raised in {city}.",
             "The new student, {name}, is {age} and comes from {city}.",
             "Living in {city} since last spring, {name} is now {age}.")
MIN_AGE, MAX_AGE = 18, 89
# FinetuneJob fields the task trains well with on SmolLM2-135M-Instruct (8 x 128-token micro-batches): held-out exact
# match 0% -> >= 80% in 30 steps, a few minutes of a 2-core CPU (bench/finetune_accuracy.py --task extract).
SCHEDULE = {"learning_rate": 1e-3, "total_steps": 30}


def answer(name: str, age: int, city: str) -> str:
    """The one JSON shape the task asks for."""
    return json.dumps({"name": name, "age": age, "city": city})


def _record(sentence: str, name: str, age: int, city: str) -> dict:
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
                         {"role": "assistant", "content": answer(name, age, city)}]}


def extraction_dataset(num_samples: int = 2000, seed: int = 0, exclude: Sequence[dict] = ()) -> list[dict]:
    """`num_samples` chat records with distinct sentences, none of them a sentence of `exclude`, the same for the
    same arguments (`numpy.random.default_rng(seed)`)."""
    capacity = len(NAMES) * len(CITIES) * (MAX_AGE - MIN_AGE + 1) * len(TEMPLATES)
    taken = {r["messages"][0]["content"] for r in exclude}
    if not 0 < num_samples <= capacity - len(taken):
        raise ValueError(f"num_samples must be in 1..{capacity - len(taken)}, got {num_samples}")
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    while len(out) < num_samples:
        name, city = NAMES[rng.integers(len(NAMES))], CITIES[rng.integers(len(CITIES))]
        age = int(rng.integers(MIN_AGE, MAX_AGE + 1))
        record = _record(TEMPLATES[rng.integers(len(TEMPLATES))].format(name=name, age=age, city=city), name, age,
                         city)
        if record["messages"][0]["content"] not in taken:
            taken.add(record["messages"][0]["content"])
            out.append(record)
    return out


def held_out(exclude: Sequence[dict], num_samples: int, seed: int = 1) -> list[dict]:
    """`num_samples` records whose sentences appear in none of `exclude` (e.g. a job's whole dataset)."""
    return extraction_dataset(num_samples, seed, exclude=exclude)
