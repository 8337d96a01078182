"""Served adapters: the slot table and the scheduler waiting for a slot (no model), and an engine serving several
HF PEFT adapters in one batch against PEFT's own greedy generation, evicting idle adapters without recompiling."""

import copy
import dataclasses

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import jax_events
from harli_jax import ConfigError, Engine, EngineConfig, FinishReason, HarliError, Request, RequestError, SamplingParams
from harli_jax.lora.adapters import LoRAConfig, export_peft, init_lora
from harli_jax.model import load_model
from harli_jax.runtime.adapters import SlotTable
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
    engine.adapters.add(dataclasses.replace(engine.adapters.get("a2"), name="a0"))
    _check(engine, prompts, {("a0", 1): reference["a2", 1]}, [("a0", 1)])
