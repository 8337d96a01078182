"""serve() with arrivals over time, text prompts, stop conditions, sampling through the engine, and the steps
dispatched ahead giving the synchronous loop's outputs."""

import dataclasses
import time

import pytest

from harli_jax import Engine, EngineConfig, FinishedEvent, FinishReason, Request, SamplingParams, TokenEvent
from harli_jax.model import greedy_generate, load_model
from harli_jax.model.tokenizer import ByteTokenizer
from harli_jax.runtime.processing import OutputProcessor
from harli_jax.runtime.state import RequestState


@pytest.fixture(scope="module")
def tiny(tiny_yaml):
    model = load_model(tiny_yaml)
    engine = Engine(model, EngineConfig(max_batch=4, prefill_chunk=16, max_seq_len=96, num_pages=64,
                                        compile_threads=2))
    return engine, model


def test_serve_submits_on_arrival_and_yields_tokens_in_order(tiny):
    engine, model = tiny
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    requests = [Request("alpha", sampling, arrival=0.0, request_id="a"),
                Request("beta", sampling, arrival=0.15, request_id="b"),
                Request([], sampling, arrival=0.2, request_id="bad"),
                Request("gamma delta", sampling, arrival=0.3, request_id="c")]
    start = time.perf_counter()
    events = list(engine.serve(requests))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert [e.time for e in tokens] == sorted(e.time for e in tokens)
    finished = {e.request_id: e.output for e in events if isinstance(e, FinishedEvent)}
    assert finished["bad"].finish_reason is FinishReason.REJECTED and "empty" in finished["bad"].error
    for rid, req in zip("abc", [requests[0], requests[1], requests[3]], strict=True):
        out = finished[rid]
        assert out.arrival_time == pytest.approx(start + req.arrival, abs=0.05)
        assert out.first_token_time >= out.arrival_time and out.ttft >= 0
        assert [e.token for e in tokens if e.request_id == rid] == list(out.token_ids)
        prompt = model.tokenizer.encode(req.prompt)
        assert list(out.token_ids) == greedy_generate(model.params, model.cfg, prompt, 6)
        assert out.text == model.tokenizer.decode(out.token_ids)
        assert out.tpot is not None and out.tpot > 0


def test_stop_token_and_stop_string(tiny):
    engine, model = tiny
    free = engine.generate(["stop here"], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    stop_id = free.token_ids[4]
    stopped = engine.generate(["stop here"], SamplingParams(max_tokens=20, ignore_eos=True,
                                                            stop_token_ids=(stop_id,)))[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]

    text = model.tokenizer.decode(free.token_ids)
    stop = text[3:5]
    cut = engine.generate(["stop here"], SamplingParams(max_tokens=20, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason is FinishReason.STOP and cut.text == text[: text.find(stop)]


def test_async_dispatch_gives_the_synchronous_tokens(tiny, monkeypatch):
    engine, model = tiny
    prompts = ["stop here", "a longer prompt, cut into chunks", "yes or no", "tokens"]  # all running at once
    free = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    late = free[2].text[8:]
    stop = next(ch for ch in late if ch.isascii() and ch.isprintable() and ch not in free[2].text[:8])
    samplings = [SamplingParams(max_tokens=9, ignore_eos=True),
                 SamplingParams(max_tokens=24, ignore_eos=True, stop_token_ids=(free[1].token_ids[12],)),
                 SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,)),
                 SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.9, top_k=20, top_p=0.9, seed=3)]
    def engine_with(async_dispatch):
        return Engine(model, dataclasses.replace(engine.config, runner=dataclasses.replace(
            engine.config.runner, async_dispatch=async_dispatch)))

    ahead_engine = engine_with(True)
    ahead = []
    dispatch = ahead_engine.runner.dispatch
    monkeypatch.setattr(ahead_engine.runner, "dispatch", lambda plan, previous=None, fused=None: (
        ahead.append(previous is not None), dispatch(plan, previous, fused))[1])
    outputs = ahead_engine.generate(prompts, samplings)
    expected = engine_with(False).generate(prompts, samplings)
    assert sum(ahead) > 10, "no step was dispatched ahead"
    for got, want in zip(outputs, expected, strict=True):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
    assert [o.finish_reason for o in outputs[:3]] == [FinishReason.LENGTH, FinishReason.STOP, FinishReason.STOP]
    assert len(outputs[0].token_ids) == 9 and 1 < len(outputs[1].token_ids) <= 13 and len(outputs[2].token_ids) > 8


def test_eos_stops_unless_ignored(tiny):
    engine, model = tiny
    free = engine.generate(["x"], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    eos = free.token_ids[2]
    eos_engine_cfg = model.cfg.replace(eos_token_ids=(eos,))
    with_eos = Engine(model.__class__(eos_engine_cfg, model.params, model.tokenizer), engine.config, warmup=False)
    out = with_eos.generate(["x"], SamplingParams(max_tokens=30))[0]
    assert out.finish_reason is FinishReason.STOP and out.token_ids[-1] == eos


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny):
    engine, _ = tiny
    hot = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=11, ignore_eos=True)
    alone = engine.generate(["sample me"], hot)[0]
    crowd = engine.generate(["other", "sample me", "third one"],
                            [SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True), hot,
                             SamplingParams(max_tokens=12, ignore_eos=True)])
    assert crowd[1].token_ids == alone.token_ids
    other_seed = engine.generate(["sample me"], SamplingParams(max_tokens=12, temperature=1.0, seed=12,
                                                               ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_a_string_is_one_prompt_and_token_events_carry_the_new_text(tiny):
    engine, model = tiny
    (alone,) = engine.generate("hello", SamplingParams(max_tokens=24, ignore_eos=True))
    assert alone.prompt_ids == tuple(model.tokenizer.encode("hello"))
    (as_ids,) = engine.generate(list(alone.prompt_ids), SamplingParams(max_tokens=24, ignore_eos=True))
    assert as_ids.token_ids == alone.token_ids
    events = list(engine.serve([Request("hello", SamplingParams(max_tokens=24, ignore_eos=True))], realtime=False))
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert streamed == events[-1].output.text == alone.text  # every token's text, in order, spells the output


def _streamed(processor, state, ids):
    """Feeds `ids` one by one as the scheduler does; the texts of the token events and the finish reason."""
    texts = []
    for token in ids:
        state.output_ids.append(token)
        text, reason = processor.new_token(state)
        texts.append(text)
        if reason is not None:
            return texts, reason, processor.finished_text(state)
    return texts, None, None


def test_incremental_detokenization_and_stop_strings_on_new_text():
    tok = ByteTokenizer()
    ids = tok.encode("héllo wörld", add_special_tokens=False)  # é and ö are two bytes each

    def state(**sampling):
        return RequestState("r", (1,), SamplingParams(max_tokens=len(ids), **sampling), frozenset({2}), 0.0)

    texts, reason, final = _streamed(OutputProcessor(tok), state(), ids)
    assert texts[1:3] == ["", "é"]  # the first byte of é alone is no character yet
    assert "".join(texts) == final == "héllo wörld" and reason is FinishReason.LENGTH
    # "o w" straddles tokens; text that could begin it is held back, then the rest comes with the last token.
    texts, reason, final = _streamed(OutputProcessor(tok), state(stop=("o w",)), ids)
    assert reason is FinishReason.STOP and final == "héll" and "".join(texts) == final
    assert len(texts) == len(tok.encode("héllo w", add_special_tokens=False))
    texts, reason, final = _streamed(OutputProcessor(tok), state(stop=("xyz",)), [*ids[:3], 2])  # a stop id
    assert reason is FinishReason.STOP and final == "hé" and "".join(texts) == final
