"""What the HTTP layer costs: the bundled trace replayed in process (`harli replay`'s `run_policy`) and through
HTTP streaming clients against `harli serve`, each with a finetune job running, at one SLO, in one invocation.

Both sides get the same requests (the trace's token-id prompts and exact output lengths, EOS ignored), the same
engine sizes and program shapes, the same TPOT SLO (measured once by `replay.run.prepare`: N x the solo decode
step), the same prefill pacing, policy (`--policy`, default harli), LoRA rank and micro-batch shape, and one
resident adapter slot (the server needs one to serve what it trains; the in-process engine is given the same).
The in-process side is `run_policy` (its job of `finetune_steps` optimizer steps, registered before serving). The
HTTP side starts `harli serve --engine-config` with that engine, uploads the job's data (the embedded
upper-casing task) to `/v1/files`, creates a fine-tuning job through `/v1/fine_tuning/jobs`, waits until it
trains, then sends each request at its arrival time as a streaming `/v1/completions` call and times the chunks
as the client receives them. Its figures use the replay's definitions (`replay.report`): TPOT = (last chunk -
first chunk) / (tokens - 1) with the token count from the usage chunk (tokens whose text is empty send no chunk,
so the HTTP side reports no TBT), TTFT from the send, attainment = share with TPOT <= the SLO; finetune tokens/s
= the job's `trained_tokens` over the replay's wall time. The load record also gives the share of the CPUs
that processes other than this one and the server used (the server's CPU time from /proc).

Writes bench/results/serve-<device>.json (or into --out; a --quick run writes only with --out).

    python bench/serve.py                          # small.yaml, the bundled default trace, 4x
    python bench/serve.py --quick --out /tmp/b     # smoke run: tiny.yaml, the first 8 requests
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import numpy as np
import openai
import yaml

from harli_jax.lora.data import default_dataset
from harli_jax.model import load_model
from harli_jax.replay import run as replay
from harli_jax.replay.options import build_parser, resolve_options
from harli_jax.replay.report import percentile, summarize, to_ms

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.10  # the HTTP side within 10% of the in-process side (attainment and finetune tokens/s)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default configs/models/small.yaml (--quick: tiny.yaml)")
    p.add_argument("--trace", default=str(REPO / "configs" / "traces" / "default.csv"))
    p.add_argument("--tpot-slo", default="4x", help="'50ms' or 'Nx' of the solo decode step (default 4x)")
    p.add_argument("--policy", default="harli")
    p.add_argument("--max-requests", type=int, help="replay only the first N requests")
    p.add_argument("--fused-tokens", default="8", help="harli's fused token chunks (default 8: few programs on a CPU)")
    p.add_argument("--fused-layers", default="1", help="harli's fused backward slices (default 1)")
    p.add_argument("--batch-buckets", default="4,8", help="sequences-per-step program shapes (default 4,8)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny.yaml, the first 8 requests")
    common.add_arguments(p)
    return p.parse_args()


def replay_options(args: argparse.Namespace, out: Path) -> dict:
    model = args.model or str(REPO / "configs" / "models" / ("tiny.yaml" if args.quick else "small.yaml"))
    argv = ["--model", model, "--trace", args.trace, "--role", "colocated", "--policy", args.policy,
            "--tpot-slo", args.tpot_slo, "--sweep-requests", "0", "--out", str(out), "--fused-tokens",
            args.fused_tokens, "--fused-layers", args.fused_layers, "--batch-buckets", args.batch_buckets,
            "--max-batch", "8", "--max-seq-len", "256", "--micro-batch-rows", "4", "--seq-len", "64"]
    requests = 8 if args.quick else args.max_requests
    if requests:
        argv += ["--max-requests", str(requests)]
    return resolve_options(build_parser(replay.__doc__).parse_args(argv))


def engine_yaml(config, path: Path) -> Path:
    """The engine config as the YAML `harli serve --engine-config` reads (one section per group)."""
    groups = {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(group).items()}
              for name, group in vars(config).items()}
    path.write_text(yaml.safe_dump(groups))
    return path


def start_server(argv: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    process = subprocess.Popen([sys.executable, "-m", "harli_jax.cli", "serve", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    errors: list[str] = []
    for pipe, into in ((process.stdout, lines), (process.stderr, errors)):
        threading.Thread(target=into.extend, args=(pipe,), daemon=True).start()
    while process.poll() is None:
        found = [m.group(1) for line in lines if (m := re.search(r"listening on (http://\S+)", line))]
        if found:
            return process, found[0], errors
        time.sleep(0.1)
    raise RuntimeError(f"harli serve did not start: {''.join(errors)}")


async def one_request(client: openai.AsyncOpenAI, model: str, request, start: float) -> dict:
    """Sends `request` at its arrival; the client-side times of its chunks."""
    await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
    sent = time.perf_counter()
    chunks, tokens = [], None
    stream = await client.completions.create(model=model, prompt=list(request.prompt), stream=True,
                                             max_tokens=request.sampling.max_tokens, temperature=0,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices and chunk.choices[0].text:
            chunks.append(time.perf_counter())
    return {"sent": sent, "chunks": chunks, "tokens": tokens}


async def replay_http(url: str, model: str, requests) -> tuple[list[dict], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_request(client, model, r, start) for r in requests))
    return list(results), time.perf_counter() - start


def http_summary(results: list[dict], tpot_slo: float, wall: float, trained: int) -> dict:
    tpots = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in results
             if r["tokens"] and r["tokens"] > 1 and len(r["chunks"]) > 1]
    ttfts = [r["chunks"][0] - r["sent"] for r in results if r["chunks"]]
    return {"requests": len(results), "timed": len(tpots),
            "slo_attainment": float(np.mean(np.array(tpots) <= tpot_slo)) if tpots else None,
            "tpot_p50_ms": to_ms(percentile(tpots, 50)), "tpot_p99_ms": to_ms(percentile(tpots, 99)),
            "ttft_p50_ms": to_ms(percentile(ttfts, 50)), "ttft_p99_ms": to_ms(percentile(ttfts, 99)),
            "finetune_tokens": trained, "finetune_tokens_per_s": trained / wall if wall else 0.0, "wall_s": wall}


def run_http(setup, slo, options: dict, config, work: Path) -> dict:
    rank = options["lora_rank"]
    argv = ["--model", options["model"], "--port", "0", "--engine-config", str(engine_yaml(config, work / "e.yaml")),
            "--state-dir", str(work / "state"), "--max-loras", "1", "--max-lora-rank", str(rank),
            "--finetune-rank", str(rank), "--finetune-seq-len", str(options["seq_len"]),
            "--tpot-slo", f"{slo.tpot_s * 1e3}ms", "--policy", config.colocation.policy,
            "--checkpoint-steps", str(10**6), "--drain-timeout", "5", "--seed", str(options["seed"]),
            "--max-logprobs", "0"]  # as the in-process engine: no logprobs computed
    common.say("[http] starting harli serve...")
    process, url, errors = start_server(argv)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        data = "".join(json.dumps(r) + "\n" for r in default_dataset(seed=options["seed"])).encode()
        upload = client.files.create(file=("task.jsonl", data), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=model, training_file=upload.id, seed=options["seed"],
                                             hyperparameters={"n_epochs": 1000,
                                                              "batch_size": options["micro_batch_rows"]})
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status != "running" or not job.trained_tokens:
            if job.status in ("failed", "cancelled"):
                raise RuntimeError(f"the fine-tuning job {job.status}: {job.error}")
            time.sleep(0.2)
        before = job.trained_tokens
        common.say(f"[http] job {job.id} trains; replaying {len(setup.requests)} requests...")
        results, wall = asyncio.run(replay_http(url, model, setup.requests))
        trained = client.fine_tuning.jobs.retrieve(job.id).trained_tokens - before
        client.fine_tuning.jobs.cancel(job.id)
        server_cpu = cpu_seconds(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    return http_summary(results, slo.tpot_s, wall, trained) | {"server_cpu_s": server_cpu,
                                                               "server_stderr_tail": "".join(errors)[-2000:]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def excluding_server(load: dict, http: dict) -> float | None:
    """The share of all CPUs that processes other than this one and the server used over the run."""
    if load.get("other_processes_cpu_share") is None:
        return None
    server = http["server_cpu_s"] / (load["wall_s"] * load["cpus"])
    return round(max(load["other_processes_cpu_share"] - server, 0.0), 4)


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="harli-serve-bench-"))
    options = replay_options(args, work / "replay")
    model = load_model(options["model"], seed=options["seed"])
    trace = replay.replay_trace(options, model.cfg)
    settings = {"max_loras": 1, "max_lora_rank": options["lora_rank"]}
    with common.LoadMeter() as load:
        setup = replay.prepare(model, trace, options, work / "replay")
        slo = replay.slo_of(options["slo"], setup.solo, setup.mixed, options["prefill_interval"])
        common.say(f"TPOT SLO {slo.tpot_s * 1e3:.2f} ms; in-process replay...")
        result = replay.run_policy(setup, args.policy, slo, work / "replay", settings=settings, checkpoint=False)
        in_process = summarize(result)
        config = replay.engine_config(options, args.policy, work / "replay", slo, **settings)
        http = run_http(setup, slo, options, config, work)
    ratios = {key: common.ratio(http[key], in_process[key]) for key in
              ("slo_attainment", "finetune_tokens_per_s", "tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms")}
    keys = ("requests", "slo_attainment", "tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms", "ttft_p99_ms",
            "finetune_tokens", "finetune_tokens_per_s", "wall_s")
    for side, row in (("in-process", in_process), ("http", http)):
        common.say(f"{side:>10}: " + ", ".join(f"{k} {row.get(k)}" for k in keys))
    common.say(f"http / in-process: {ratios}")
    within = {k: r.get("value") is not None and abs(r["value"] - 1) <= TARGET
              for k, r in ratios.items() if k in ("slo_attainment", "finetune_tokens_per_s")}
    payload = {"config": vars(args), "tpot_slo_ms": slo.tpot_s * 1e3, "prefill_interval": slo.prefill_interval,
               "requests": len(setup.requests), "in_process": {k: in_process.get(k) for k in keys},
               "http": http, "ratios": ratios, "target": f"within {TARGET:.0%}", "within_target": within,
               "load": load.record | {"other_processes_cpu_share_excluding_server": excluding_server(load.record,
                                                                                                   http)}}
    out = common.output_dir(args)
    if out is None:
        common.say("--quick without --out: no result file written")
        return
    common.say(f"wrote {common.write_result('serve', payload, out)}")


if __name__ == "__main__":
    main()
