"""Served adapters: the slot table, the catalogue's bounded host memory and the scheduler waiting for a slot or
for weights (no model), and an engine serving several HF PEFT adapters in one batch against PEFT's own greedy
generation, evicting idle adapters from slots and host memory without recompiling."""

import copy
import dataclasses
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import jax_events
from harli_jax import (
    CheckpointError,
    ConfigError,
    Engine,
    EngineConfig,
    FinishReason,
    HarliError,
    Request,
    RequestError,
    SamplingParams,
)
from harli_jax.lora.adapters import LoRAConfig, export_peft, init_lora
from harli_jax.model import load_model
from harli_jax.runtime.adapters import AdapterCatalog, ServedAdapter, SlotTable
from harli_jax.runtime.arena import PageTable
from harli_jax.runtime.config import SchedulerConfig
from harli_jax.runtime.processing import OutputProcessor
from harli_jax.runtime.request import SamplingParams as Sampling
from harli_jax.runtime.scheduler import Scheduler
from harli_jax.runtime.state import RequestState

NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
# (rank, targets) of the three adapters: different projections and ranks, all within the slots' rank 8.
ADAPTERS = [(4, ["q_proj", "v_proj"]), (2, ["o_proj", "gate_proj", "down_proj"]), (8, ["k_proj", "up_proj"])]


def test_slot_table_reuses_the_least_recently_used_idle_slot():
    table = SlotTable(2)
    assert table.acquire("a") == 0 and table.acquire("b") == 1
    assert table.acquire("c") is None  # both in use
    table.release("a")
    assert table.acquire("b") == 1  # a second user of b
    assert table.acquire("c") == 0  # a was idle: its slot goes to c
    assert table.resident() == {"b": 1, "c": 0}
    table.release("b")
    assert table.acquire("a") is None  # b still has a user, c too
    table.release("b")
    table.release("c")
    assert table.acquire("a") == 1  # b is the least recently used idle one
    assert table.resident() == {"c": 0, "a": 1}


def test_a_forgotten_adapter_frees_its_slot_for_the_next():
    table = SlotTable(3)
    assert [table.acquire(n) for n in "abc"] == [0, 1, 2]
    table.release("b")
    table.forget("b")  # no longer served
    assert table.resident() == {"a": 0, "c": 2}
    assert table.acquire("d") == 1  # b's slot, not one that a or c holds
    table.forget("nope")  # never resident: nothing to free
    assert table.acquire("e") is None


def test_a_request_waits_for_a_slot_and_gets_one_when_a_request_finishes():
    pages = PageTable(32, 4, max_pages_per_seq=8)
    sched = Scheduler(pages, SchedulerConfig(max_batch=4, prefill_chunk=16), OutputProcessor(None), SlotTable(1))
    for rid, adapter in (("a", "x"), ("b", "y"), ("c", None)):
        sched.add(RequestState(rid, (5, 6, 7), Sampling(max_tokens=1), frozenset(), 0.0, adapter=adapter), 0.0)
    plan = sched.schedule()
    assert [(s.request_id, w.adapter, w.adapter_slot) for s, w in zip(plan.states, plan.work, strict=True)] == [
        ("a", "x", 0)]  # b waits for the one slot, c behind it (first come, first served)
    sched.update(plan, [9], 1.0)  # a's one token: it finishes and releases the slot
    plan = sched.schedule()
    assert [(s.request_id, w.adapter_slot) for s, w in zip(plan.states, plan.work, strict=True)] == [
        ("b", 0), ("c", -1)]


class _Directories:
    """A stand-in for reading adapters' directories: the weights are the directory's name; records the reads."""

    def __init__(self):
        self.reads, self.missing, self.gate = [], set(), threading.Event()
        self.gate.set()

    def __call__(self, directory):
        self.gate.wait()
        self.reads.append(directory.name)
        if directory.name in self.missing:
            raise CheckpointError(f"cannot read the PEFT adapter weights {directory}/adapter_model.safetensors")
        return directory.name


def _served(name, source=True):
    return ServedAdapter(name, LoRAConfig(), source=Path(name) if source else None)


def _until_ready(catalog, name):
    deadline = time.monotonic() + 10
    while not catalog.ready(name):
        assert time.monotonic() < deadline, f"{name} never read"
        time.sleep(0.01)


def test_host_memory_keeps_the_most_recent_adapters_and_reads_the_rest_again_in_the_background():
    read = _Directories()
    catalog = AdapterCatalog(read, max_in_memory=2)
    catalog.add(_served("snap", source=False), "snap")  # a job's snapshot: no directory, it always stays
    for name in ("a", "b"):
        catalog.add(_served(name), name)
    assert catalog.in_memory() == ["snap", "b"]  # a, the least recently used with a directory, left
    assert catalog.names() == ["snap", "a", "b"]  # still served
    assert catalog.ready("b") and read.reads == []
    read.gate.clear()
    assert catalog.ready("a") is False  # starts reading a on the reader thread
    assert catalog.ready("a") is False and catalog.in_memory() == ["snap", "b"]
    read.gate.set()
    _until_ready(catalog, "a")
    assert read.reads == ["a"]  # read once however often it was asked for
    assert catalog.in_memory() == ["snap", "a"]  # b left in its turn; snap stays over the bound
    assert catalog.weights("b") == "b" and read.reads == ["a", "b"]  # read on the caller's thread
    assert catalog.in_memory() == ["snap", "b"]
    catalog.remove("b")
    assert catalog.in_memory() == ["snap"] and catalog.names() == ["snap", "a"]


def test_an_adapter_that_cannot_be_read_again_is_reported_once_and_tried_again_later():
    read = _Directories()
    catalog = AdapterCatalog(read, max_in_memory=1)
    catalog.add(_served("a"), "a")
    catalog.add(_served("b"), "b")
    read.missing.add("a")
    assert catalog.ready("a") is False
    deadline = time.monotonic() + 10
    while not (failed := catalog.take_failures()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(failed) == ["a"] and "adapter_model.safetensors" in failed["a"]
    assert catalog.take_failures() == {}
    read.missing.clear()
    _until_ready(catalog, "a")  # the directory is back: a later request reads it
    assert catalog.in_memory() == ["a"]


def test_a_request_waits_for_its_adapters_weights_and_is_rejected_when_they_cannot_be_read():
    pages = PageTable(32, 4, max_pages_per_seq=8)
    ready = set()
    sched = Scheduler(pages, SchedulerConfig(max_batch=4, prefill_chunk=16), OutputProcessor(None), SlotTable(2),
                      adapter_ready=ready.__contains__)
    for rid, adapter in (("a", "x"), ("b", "y"), ("c", "x")):
        sched.add(RequestState(rid, (5, 6, 7), Sampling(max_tokens=2), frozenset(), 0.0, adapter=adapter), 0.0)
    assert sched.schedule().states == []  # x's weights are being read: everyone waits (first come, first served)
    ready.add("x")
    plan = sched.schedule()
    assert [s.request_id for s in plan.states] == ["a"]  # y's weights are not in memory yet: b and c wait
    sched.update(plan, [9], 1.0)
    [event] = sched.reject_adapter("y", "no such file")
    assert event.output.finish_reason is FinishReason.REJECTED and "no such file" in event.output.error
    ready.discard("x")  # x left host memory, but a slot holds it: c needs no read
    plan = sched.schedule()
    assert [s.request_id for s in plan.states] == ["a", "c"]


@pytest.fixture(scope="module")
def served(hf_checkpoint, tmp_path_factory):
    """An engine with two resident slots and three PEFT adapters, the prompts, and PEFT's greedy tokens for each
    (adapter, prompt)."""
    model, path = hf_checkpoint("llama-gqa2")
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = None
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 160, n).tolist() for n in (5, 21, 38)]
    engine = Engine(load_model(path), EngineConfig(max_batch=4, prefill_chunk=16, max_seq_len=96, num_pages=48,
                                                   compile_threads=2, max_loras=2, max_lora_rank=8))
    reference = {}
    for i, (rank, targets) in enumerate(ADAPTERS):
        torch.manual_seed(i)
        peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                     target_modules=targets, lora_dropout=0.0))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn_like(p))
            for j, prompt in enumerate(prompts):
                out = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=NEW_TOKENS,
                                          do_sample=False, pad_token_id=0)
                reference[f"a{i}", j] = out[0, len(prompt):].tolist()
        directory = tmp_path_factory.mktemp(f"adapter{i}")
        peft_model.save_pretrained(directory)
        engine.add_adapter(f"a{i}", directory)
    with torch.no_grad():
        for j, prompt in enumerate(prompts):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            reference[None, j] = out[0, len(prompt):].tolist()
    assert len({tuple(reference[a, 0]) for a in (None, "a0", "a1", "a2")}) == 4  # the adapters change the tokens
    return engine, prompts, reference


def _check(engine, prompts, reference, cases):
    outputs = engine.generate([prompts[j] for _, j in cases], GREEDY, adapter=[a for a, _ in cases])
    for (adapter, j), output in zip(cases, outputs, strict=True):
        assert output.finish_reason is FinishReason.LENGTH, output.error
        assert list(output.token_ids) == reference[adapter, j], (adapter, j)


def test_one_batch_mixes_adapters_and_the_base_model_as_peft_serves_each(served):
    # The adapters' first requests: their slots are written by a program the engine's warm-up compiled.
    engine, prompts, reference = served
    with jax_events() as compiles:
        _check(engine, prompts, reference, [("a0", 0), ("a1", 1), (None, 2), ("a1", 0)])
    assert compiles == []


def test_more_adapters_than_slots_wait_evict_and_never_recompile(served):
    engine, prompts, reference = served
    with jax_events() as compiles:
        # Three adapters over two slots: the third request waits until a slot is idle, then evicts its adapter.
        _check(engine, prompts, reference, [("a0", 1), ("a1", 2), ("a2", 0), (None, 1)])
        _check(engine, prompts, reference, [("a2", 1), ("a0", 0)])
    assert compiles == []


def test_an_adapter_read_again_serves_as_peft_does_and_one_that_cannot_be_read_is_rejected(served, tmp_path):
    # Two slots and host memory for two adapters' weights: a batch of the two others takes both slots, and
    # reading their weights leaves the third's in its directory only.
    engine, prompts, reference = served

    def forget_copy():
        _check(engine, prompts, reference, [("a0", 0), ("a2", 1)])
        for name in ("a0", "a2"):
            engine.adapters.weights(name)
        assert engine.adapters.in_memory() == ["a0", "a2"]
        assert not engine.scheduler.adapter_slots.holds("copy")

    shutil.copytree(engine.adapters.get("a1").source, tmp_path / "copy")
    engine.add_adapter("copy", tmp_path / "copy")
    forget_copy()
    with jax_events() as compiles:
        _check(engine, prompts, {("copy", 1): reference["a1", 1]}, [("copy", 1)])  # read again from its directory
    assert compiles == []
    assert "copy" in engine.adapters.in_memory() and len(engine.adapters.in_memory()) == 2
    forget_copy()
    shutil.rmtree(tmp_path / "copy")
    [rejected] = engine.generate(prompts[:1], GREEDY, adapter="copy")
    assert rejected.finish_reason is FinishReason.REJECTED
    assert "adapter 'copy' cannot be read" in rejected.error and "adapter_config.json" in rejected.error
    assert engine.remove_adapter("copy")


def test_bad_adapters_are_refused_with_their_reason(served, hf_checkpoint, tmp_path):
    engine, prompts, _ = served
    with pytest.raises(RequestError, match="unknown adapter 'nope'; this engine serves 'a0', 'a1', 'a2'"):
        engine.submit(Request(prompts[0], GREEDY, adapter="nope"))
    [rejected] = engine.generate(prompts[:1], GREEDY, adapter="nope")
    assert rejected.finish_reason is FinishReason.REJECTED and "unknown adapter" in rejected.error
    with pytest.raises(HarliError, match="already served"):
        engine.add_adapter("a0", tmp_path / "a0")
    export_peft(init_lora(engine.cfg, LoRAConfig(rank=16)), LoRAConfig(rank=16), engine.cfg, tmp_path / "big")
    with pytest.raises(ConfigError, match="rank 16 exceeds the resident slots' rank 8"):
        engine.add_adapter("big", tmp_path / "big")
    base = Engine(load_model(hf_checkpoint("llama-gqa2")[1]), EngineConfig(max_seq_len=32, num_pages=8),
                  warmup=False)
    with pytest.raises(ConfigError, match="max_loras"):
        base.add_adapter("x", tmp_path / "big")


def test_an_adapter_is_removed_only_when_no_request_names_it_and_its_name_can_serve_another(served):
    engine, prompts, reference = served
    engine.submit(Request(prompts[0], GREEDY, adapter="a0"))
    assert engine.remove_adapter("a0") is False  # queued
    engine.step()
    assert engine.remove_adapter("a0") is False  # running
    while engine.has_unfinished():
        engine.step()
    assert engine.remove_adapter("a0") is True
    with pytest.raises(RequestError, match="unknown adapter 'a0'"):
        engine.submit(Request(prompts[0], GREEDY, adapter="a0"))
    with pytest.raises(RequestError, match="unknown adapter 'a0'"):
        engine.remove_adapter("a0")
    assert "a0" not in engine.adapters.names()
    # The name again, now a2's weights: the slot that held a0 is written anew before a request uses it.
    engine.adapters.add(dataclasses.replace(engine.adapters.get("a2"), name="a0"), engine.adapters.weights("a2"))
    _check(engine, prompts, {("a0", 1): reference["a2", 1]}, [("a0", 1)])
