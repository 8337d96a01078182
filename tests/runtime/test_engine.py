"""The decode engine against transformers' greedy generate: continuous batching, chunked prefill, preemption,
prefilled-KV import, no recompiles, bad requests."""

import contextlib
import copy
import dataclasses
import threading
import time

import jax
import numpy as np
import pytest
import torch

from conftest import jax_events
from harli_jax import (
    Engine,
    EngineConfig,
    FinetuneJob,
    FinishedEvent,
    FinishReason,
    Request,
    RequestError,
    SamplingParams,
    TokenEvent,
)
from harli_jax.model import load_model
from harli_jax.model.loader import LoadedModel
from harli_jax.runtime.arena import Owner

PROMPT_LENGTHS = [1, 7, 33, 100, 20, 5, 64, 2]
NEW_TOKENS = 32
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
# A prefill chunk smaller than most prompts, fewer slots than prompts: prompts are cut and requests queue.
SMALL = EngineConfig(max_batch=4, prefill_chunk=16, max_seq_len=160, num_pages=48, compile_threads=2)


def _prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(model, prompts, new_tokens=NEW_TOKENS):
    model = copy.deepcopy(model)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def _run(engine, submissions):
    """Steps the engine, submitting `submissions[step]` (prompt lists) at those steps; outputs by request id."""
    outputs, ids, step = {}, {}, 0
    while step <= max(submissions, default=-1) or engine.has_unfinished():
        for prompt in submissions.get(step, []):
            ids[engine.submit(prompt, GREEDY)] = prompt
        for event in engine.step():
            if isinstance(event, FinishedEvent):
                outputs[event.request_id] = event.output
        engine.arena.table.check_invariants()
        step += 1
    return outputs, ids


@pytest.fixture(scope="module", params=["llama-gqa2", "qwen2-tied"])
def served(request, hf_checkpoint):
    model, path = hf_checkpoint(request.param)
    loaded = load_model(path)
    prompts = _prompts(loaded.cfg.vocab_size)
    return Engine(loaded, SMALL), prompts, _hf_greedy(model, prompts)


def test_generate_matches_transformers(served):
    engine, prompts, reference = served
    outputs = engine.generate(prompts, GREEDY)
    assert [list(o.token_ids) for o in outputs] == reference
    assert all(o.finish_reason is FinishReason.LENGTH for o in outputs)
    steps = engine.step_records
    assert max(r.decode_seqs + r.prefill_seqs for r in steps) == SMALL.scheduler.max_batch
    assert any(r.decode_seqs and r.prefill_tokens for r in steps), "no step mixed decode and prefill"
    assert max(r.prefill_tokens for r in steps) == SMALL.scheduler.prefill_chunk


def test_requests_arriving_at_different_steps(served):
    engine, prompts, reference = served
    arrivals = {0: prompts[:2], 3: prompts[2:3], 9: prompts[3:6], 30: prompts[6:]}
    outputs, ids = _run(engine, arrivals)
    for rid, prompt in ids.items():
        assert list(outputs[rid].token_ids) == reference[prompts.index(prompt)]
    assert engine.arena.table.usage()["kv"] == 0


def _exported(engine, prompt):
    """Prefills `prompt` on `engine` and exports its K/V (the request is then aborted)."""
    rid = engine.submit(prompt, GREEDY)
    while not any(isinstance(e, TokenEvent) and e.request_id == rid for e in engine.step()):
        pass
    kv = engine.export_kv(rid)
    engine.abort(rid)
    engine.step()
    return kv


def test_prefilled_kv_import_into_another_engine(served):
    engine, prompts, reference = served
    kv = _exported(engine, prompts[3])  # 100 tokens: 7 pages
    assert kv.first_token == reference[3][0]
    # The decode engine has another arena size, and pages 1..20 are taken, so the request's K/V lands in
    # other pages than it came from: only a real copy of the pages gives the reference tokens.
    bigger = dataclasses.replace(SMALL.cache, num_pages=SMALL.cache.num_pages + 9)
    decoder = Engine(LoadedModel(engine.cfg, engine.runner.params, engine.tokenizer),
                     dataclasses.replace(SMALL, cache=bigger), warmup=False)
    decoder.arena.table.allocate(Owner("test", "occupied"), 20)
    decoded = decoder.submit(Request(prompts[3], GREEDY), prefilled_kv=kv)
    decoder.step()
    assert min(decoder.arena.table.block_table(decoded)) > 20
    outputs, _ = _run(decoder, {})
    assert list(outputs[decoded].token_ids) == reference[3]
    decoder.arena.table.free(Owner("test", "occupied"))
    assert decoder.arena.table.usage()["kv"] == 0


def test_no_recompiles_after_warmup(served):
    engine, prompts, reference = served
    with jax_events() as compiles:
        engine.generate(prompts[:1], GREEDY)  # batch 1
        engine.generate(prompts[1:4], GREEDY)  # batch 3
        engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=1))
        # Export and import of prompts of 1, 3 and 7 pages (three page buckets).
        for i in (1, 2, 3):
            kv = _exported(engine, prompts[i])
            decoded = engine.submit(Request(prompts[i], GREEDY), prefilled_kv=kv)
            outputs, _ = _run(engine, {})
            assert list(outputs[decoded].token_ids) == reference[i]
        assert engine.step_records, "nothing ran"
        during = list(compiles)
        jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # the counter does see a compile
        assert len(compiles) > len(during)
    assert during == []


def test_one_step_program_serves_contexts_of_128_and_2048_tokens_reading_only_their_pages(tiny_yaml):
    # Attention walks the pages a step's contexts span, a bound read at run time: one page shape (the maximum),
    # nothing compiled between a batch of 128-token and one of 2,048-token contexts, and the decode program's
    # temporaries those of an engine whose longest context is 8x shorter (no block table's worth gathered).
    tiny = load_model(tiny_yaml)
    model = LoadedModel(tiny.cfg.replace(max_position_embeddings=4096), tiny.params, tiny.tokenizer)

    def engine(max_seq_len):
        return Engine(model, EngineConfig(max_batch=2, batch_buckets=(2,), max_seq_len=max_seq_len,
                                          prefill_chunk=256, compile_threads=2))

    def decode_temp_bytes(e):
        program = e.runner.program(e.runner.bucket_for(2, 2, e.runner.page_buckets[-1]))
        return program.memory_analysis().temp_size_in_bytes

    long, short = engine(2112), engine(264)
    assert long.runner.page_buckets == (132,) and short.runner.page_buckets == (17,)
    table_growth = 2 * 2 * (132 - 17) * 4  # the block tables, padded to whole blocks
    assert decode_temp_bytes(long) <= decode_temp_bytes(short) + table_growth
    rng = np.random.default_rng(0)
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    with jax_events() as compiles:
        for context in (128, 2048):
            outputs = long.generate([rng.integers(3, 200, context).tolist() for _ in range(2)], sampling)
            assert all(len(o.token_ids) == 4 for o in outputs)
    assert compiles == []
    assert max(r.max_context for r in long.step_records) >= 2048
    assert {r.bucket_pages for r in long.step_records} == {132}


def test_bad_requests_are_rejected_alone(served):
    engine, prompts, reference = served
    good = engine.submit(prompts[1], GREEDY)
    bad = {
        "empty": ([], GREEDY, "the prompt is empty"),
        "vocab": ([1, 10_000], GREEDY, r"outside the vocabulary"),
        "too long": (prompts[3], SamplingParams(max_tokens=100), "exceeds the context length 160"),
        "max_tokens": ([1, 2], SamplingParams(max_tokens=0), "max_tokens must be a positive integer"),
        "top_p": ([1, 2], SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
    }
    for prompt, sampling, message in bad.values():
        with pytest.raises(RequestError, match=message):
            engine.submit(prompt, sampling)
    with pytest.raises(RequestError, match="unknown request id 'nope'"):
        engine.abort("nope")
    outputs, _ = _run(engine, {})
    assert list(outputs[good].token_ids) == reference[1]

    mixed = engine.generate([prompts[2], [], prompts[5]], GREEDY)
    assert [o.finish_reason for o in mixed] == [FinishReason.LENGTH, FinishReason.REJECTED, FinishReason.LENGTH]
    assert "empty" in mixed[1].error
    assert list(mixed[0].token_ids) == reference[2] and list(mixed[2].token_ids) == reference[5]


def test_abort_frees_pages_and_spares_the_others(served):
    engine, prompts, reference = served
    keep = engine.submit(prompts[2], GREEDY)
    drop = engine.submit(prompts[3], GREEDY)
    for _ in range(4):
        engine.step()
    engine.abort(drop)
    outputs, _ = _run(engine, {})
    assert outputs[drop].finish_reason is FinishReason.ABORTED
    assert list(outputs[keep].token_ids) == reference[2]
    assert engine.arena.table.usage()["kv"] == 0


def test_tiny_arena_preempts_and_still_matches(hf_checkpoint):
    model, path = hf_checkpoint("llama-gqa2")
    loaded = load_model(path)
    prompts = _prompts(loaded.cfg.vocab_size)
    tight = EngineConfig(max_batch=4, prefill_chunk=16, max_seq_len=160, num_pages=12, compile_threads=2)
    engine = Engine(loaded, tight)
    outputs, ids = _run(engine, {0: prompts})
    reference = _hf_greedy(model, prompts)
    for rid, prompt in ids.items():
        assert list(outputs[rid].token_ids) == reference[prompts.index(prompt)]
    assert sum(o.preemptions for o in outputs.values()) > 0, "the arena was not tight enough to preempt"
    assert engine.arena.table.usage() == {"free": 11, "kv": 0, "lease": 0}


def test_threads_submit_and_abort_while_the_engine_serves_and_trains(tiny_yaml):
    engine = Engine(load_model(tiny_yaml), EngineConfig(max_batch=4, prefill_chunk=16, max_seq_len=64, num_pages=40,
                                                        policy="static", static_layers=1, compile_threads=2))
    handle = engine.finetune(FinetuneJob(total_steps=10_000, eval_interval=0, micro_batch_rows=2, seq_len=32))
    submitted: list[str] = []
    errors: list[BaseException] = []

    def client(seed):
        rng = np.random.default_rng(seed)
        mine = []
        try:
            for _ in range(12):
                prompt = rng.integers(3, 500, int(rng.integers(1, 30))).tolist()
                mine.append(engine.submit(prompt, SamplingParams(max_tokens=int(rng.integers(1, 20)),
                                                                 ignore_eos=True)))
                if rng.random() < 0.4:
                    with contextlib.suppress(RequestError):  # it may have finished already
                        engine.abort(mine[int(rng.integers(len(mine)))])
                time.sleep(float(rng.uniform(0, 0.01)))
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)
        submitted.extend(mine)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    finished, deadline = [], time.monotonic() + 120
    while (any(t.is_alive() for t in threads) or engine.has_unfinished()) and time.monotonic() < deadline:
        finished += [e.request_id for e in engine.step() if isinstance(e, FinishedEvent)]
    for t in threads:
        t.join()
    assert not errors, errors
    assert not engine.has_unfinished(), "the engine still counts requests as running"
    assert len(submitted) == 48 and sorted(finished) == sorted(submitted)  # exactly one finished event each
    engine.arena.table.check_invariants()
    assert engine.arena.table.usage()["kv"] == 0
    assert handle.progress().tokens > 0, "the job did not train"
