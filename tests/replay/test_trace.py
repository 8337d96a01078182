"""Trace formats, rescaling and synthetic generators."""

import json

import numpy as np
import pytest

from harli_jax.replay.trace import (
    Trace,
    TraceError,
    TraceRequest,
    load_trace,
    peak_concurrency,
    synthesize,
    write_trace,
)


def test_every_format_reads_the_same_requests(tmp_path):
    want = [(0.0, 100, 20), (0.5, 30, 7), (2.25, 64, 64)]
    (tmp_path / "native.csv").write_text("# made by hand\narrival_s,prompt_tokens,output_tokens\n"
                                         "10.0,100,20\n10.5,30,7\n12.25,64,64\n")
    (tmp_path / "azure.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                        "2023-11-16 18:15:50.0000000,100,20\n"
                                        "2023-11-16 18:15:50.5000000,30,7\n"
                                        "2023-11-16 18:15:52.2500000,64,64\n")
    (tmp_path / "burst.csv").write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                                        "5,ChatGPT,100,20,120,Conversation log\n5.5,GPT-4,30,7,37,API log\n"
                                        "7.25,ChatGPT,64,64,128,Conversation log\n")
    (tmp_path / "mooncake.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 2250, "input_length": 64, "output_length": 64, "hash_ids": [1]},
        {"timestamp": 0, "input_length": 100, "output_length": 20, "hash_ids": [2]},
        {"timestamp": 500, "input_length": 30, "output_length": 7, "hash_ids": [3]}]))
    for name in ("native.csv", "azure.csv", "burst.csv", "mooncake.jsonl"):
        trace = load_trace(tmp_path / name)
        got = [(pytest.approx(r.arrival), r.prompt_tokens, r.output_tokens) for r in trace.requests]
        assert got == want, name
        assert trace.problems == ()
        assert trace.comment == ("made by hand" if name == "native.csv" else ""), name


def test_simultaneous_arrivals_keep_the_file_order(tmp_path):
    path = tmp_path / "ties.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n1.5,90,9\n0.5,70,7\n0.5,10,1\n0.5,50,5\n")
    assert [(r.arrival, r.prompt_tokens) for r in load_trace(path).requests] == [(0, 70), (0, 10), (0, 50), (1, 90)]


def test_malformed_rows_are_reported_with_file_and_row(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\nsoon,10,5\n1,-3,5\n2,10\n-4,8,8\n3,8,8\n")
    trace = load_trace(path)
    assert len(trace) == 2
    assert [p.split(": ", 1)[0] for p in trace.problems] == [f"{path} row {row}" for row in (3, 4, 5, 6)]
    assert trace.problems[0].endswith("row 3: arrival_s must be a number, got 'soon'")
    assert trace.problems[2].endswith("row 5: output_tokens is missing")
    assert "must be a finite number >= 0" in trace.problems[3]
    words = tmp_path / "words.csv"
    words.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,abc,5\n2,7.5,5\n")
    assert [p.split(": ", 1)[1] for p in load_trace(words).problems] == [
        "prompt_tokens must be an integer, got 'abc'", "prompt_tokens must be an integer, got '7.5'"]
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 0, "input_length": 3, "output_length": 2}\n'
                                        '{"timestamp": "noon", "input_length": 3, "output_length": 2}\n')
    assert load_trace(tmp_path / "bad.jsonl").problems[0].endswith("row 2: timestamp must be a number, got 'noon'")
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:50.0,100\n")
    with pytest.raises(TraceError, match=r"azure\.csv row 2: missing column 'GeneratedTokens'"):
        load_trace(azure, "azure", strict=True)
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(TraceError, match="blank.csv"):
        load_trace(tmp_path / "blank.csv")
    with pytest.raises(TraceError, match="t.csv row 3"):
        load_trace(path, strict=True)
    (tmp_path / "empty.csv").write_text("arrival_s,prompt_tokens,output_tokens\nx,y,z\n")
    with pytest.raises(TraceError, match="no usable request"):
        load_trace(tmp_path / "empty.csv")
    (tmp_path / "odd.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TraceError, match="cannot tell the trace format"):
        load_trace(tmp_path / "odd.csv")
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "nope.csv")


def test_rescaling_keeps_the_inter_arrival_shape():
    trace = synthesize("gamma", num_requests=200, rate=5.0, cv=2.0, seed=2)
    gaps = np.diff([r.arrival for r in trace.requests])
    for rate_scale, time_scale in ((2.0, 1.0), (1.0, 3.0), (4.0, 0.5)):
        scaled = np.diff([r.arrival for r in trace.rescale(rate_scale=rate_scale, time_scale=time_scale).requests])
        np.testing.assert_allclose(scaled, gaps * time_scale / rate_scale, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(scaled / scaled.mean(), gaps / gaps.mean(), rtol=1e-9, atol=1e-12)


def test_rescale_and_round_trip(tmp_path):
    trace = Trace((TraceRequest(0.0, 300, 100), TraceRequest(2.0, 50, 10), TraceRequest(4.0, 10, 10)))
    fast = trace.rescale(rate_scale=2.0, max_context=200)
    assert [r.arrival for r in fast.requests] == [0.0, 1.0, 2.0]
    assert fast.requests[0].prompt_tokens + fast.requests[0].output_tokens <= 200
    assert fast.requests[0].prompt_tokens == 150 and fast.requests[0].output_tokens == 50  # ratio kept
    assert fast.shrunk == 1 and trace.rescale().shrunk == 0
    for bad in (dict(rate_scale=0), dict(time_scale=-1), dict(duration=0), dict(max_requests=0)):
        with pytest.raises(TraceError, match="must be > 0"):
            trace.rescale(**bad)
    assert len(trace.rescale(duration=2.5)) == 2 and len(trace.rescale(max_requests=1)) == 1
    path = write_trace(trace, tmp_path / "t.csv", comment="three requests\nby hand")
    assert path.read_text().startswith("# three requests\n# by hand\narrival_s")
    loaded = load_trace(path)
    assert loaded.requests == trace.requests and loaded.comment == "three requests\nby hand"
    requests = trace.to_requests(vocab_size=512, seed=1)
    assert [len(r.prompt) for r in requests] == [300, 50, 10]
    assert [r.sampling.max_tokens for r in requests] == [100, 10, 10] and requests[1].arrival == 2.0


@pytest.mark.parametrize("kind", ["poisson", "gamma", "bursts", "diurnal"])
def test_synthetic_traces(kind):
    trace = synthesize(kind, num_requests=2000, rate=10.0, seed=3, period=20.0)
    arrivals = np.array([r.arrival for r in trace.requests])
    assert arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)
    assert trace == synthesize(kind, num_requests=2000, rate=10.0, seed=3, period=20.0)
    gaps = np.diff(arrivals)
    cv = gaps.std() / gaps.mean()
    if kind == "poisson":
        assert abs(1 / gaps.mean() - 10) < 1.0 and abs(cv - 1) < 0.1
    if kind == "gamma":
        assert cv > 1.6  # bursty
    prompts = np.array([r.prompt_tokens for r in trace.requests])
    outputs = np.array([r.output_tokens for r in trace.requests])
    assert abs(prompts.mean() - 100) < 10 and abs(outputs.mean() - 40) < 5


def test_peak_concurrency():
    trace = Trace((TraceRequest(0.0, 5, 10), TraceRequest(0.5, 5, 10), TraceRequest(5.0, 5, 10)))
    assert peak_concurrency(trace, seconds_per_token=0.1) == 2
