"""Decode throughput of our engine against transformers' `generate` on the same weights, and the batch-1 step
time against the memory floor.

For each batch size, B random prompts of `--prompt-len` tokens each get `--new-tokens` greedy tokens (EOS
ignored) from our engine (`Engine.generate`) and from HF transformers' `generate` (torch on the CPU, the same
weights through an HF checkpoint written from our parameters), in the same process.

Every timed call goes through `common.interleave`: `--repeats` rounds, each running every side once (ours and
HF at every batch, and the copy-bandwidth probes) in a seeded random order, each attempt with the machine's
load; an attempt during which other processes took more than `--max-other-share` of the CPUs is repeated
(`--max-retries`), then marked invalid. A side's figure is the median over its valid attempts; a ratio is
computed from valid figures only (else reported invalid). Before the rounds, one untimed call per side warms
it up (compiles, allocator) and gives the greedy tokens compared between the systems.

- Our decode tokens/s: decode tokens of the decode-only steps (no prefill tokens in the step) over the time of
  those steps, from `engine.step_records`. With continuous batching the requests enter one prefill chunk
  apart, so they also leave apart: the decode-only steps include a tail where the batch drains. The
  steady-state figure counts only the steps that decode all B sequences.
- HF decode tokens/s: B * (new_tokens - 1) over (time of generate with new_tokens) - (time with 1 token,
  i.e. the prefill), both timed in the same attempt.
- End-to-end tokens/s for both: B * new_tokens over the wall time of the whole generate call (with prefill).
- Memory floor: the weight bytes over the machine's copy bandwidth (a numpy copy of a large buffer into a
  preallocated one, best of `--copy-repeats` per attempt, read + write bytes counted), against our median
  batch-1 decode step.
- Prefill: `--prefill-prompts` prompts of `--prefill-len` tokens, our `generate` of one token each (the time to
  their first tokens) against one transformers forward over the same tokens.
- Un-overlapped host time: per step, the wall time outside the step programs plus the packing inside them, as a
  share of the median decode step.

Writes bench/results/decode-<device>.json (or into --out). With --profile it also traces a few steady decode
steps per batch with jax.profiler and reports where the step time goes (XLA ops by model scope, host time).

    python bench/decode.py                     # batches 1 8 32, 128-token prompts, 128 new tokens, 3 rounds
    python bench/decode.py --quick --out /tmp/bench   # smoke run: tiny.yaml, batches 1 2, 16 + 16 tokens
    python bench/decode.py --batches 1 8 --profile
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import glob
import gzip
import json
import logging
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from common import say

from harli_jax import Engine, EngineConfig, SamplingParams
from harli_jax.model import load_model, save_hf_checkpoint
from harli_jax.runtime.config import SchedulerConfig
from harli_jax.runtime.runner import Bucket

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"decode_vs_hf_min": 1.5, "decode_vs_hf_batches": (8, 32), "batch1_step_vs_floor_max": 1.25,
           "prefill_vs_hf_min": 1.0, "host_share_of_batch8_step_max": 0.05}


def batch_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="YAML model config (default configs/models/small.yaml)")
    parser.add_argument("--batches", type=batch_list, nargs="+", default=None,
                        help="batch sizes, space or comma separated (default 1 8 32)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 128)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="the decode engine's context (default "
                                                                     "--prompt-len + --new-tokens): a longer one "
                                                                     "shows what the unused context costs")
    parser.add_argument("--seed", type=int, default=0, help="weights, prompts and the order of the sides per round")
    parser.add_argument("--prefill-chunk", type=int, default=SchedulerConfig().prefill_chunk)
    parser.add_argument("--prefill-prompts", type=int, default=4, help="prompts of the prefill comparison")
    parser.add_argument("--prefill-len", type=int, default=None, help="their tokens (default 512)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds: timed attempts per side (default 3; 2 with --quick)")
    parser.add_argument("--copy-mib", type=int, default=None, help="size of the copy-bandwidth probe (default 512)")
    parser.add_argument("--copy-repeats", type=int, default=None, help="copies per probe attempt, best kept "
                        "(default 7)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers (no ratios)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timings, trace 10 steady decode steps per batch and break the step down")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    common.add_arguments(parser)
    args = parser.parse_args()
    quick = dict(model=str(REPO / "configs/models/tiny.yaml"), batches=[1, 2], prompt_len=16, new_tokens=16,
                 repeats=2, copy_mib=32, copy_repeats=3, prefill_len=24)
    full = dict(model=str(REPO / "configs/models/small.yaml"), batches=[1, 8, 32], prompt_len=128, new_tokens=128,
                repeats=3, copy_mib=512, copy_repeats=7, prefill_len=512)
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if isinstance(args.batches[0], list):
        args.batches = sorted({b for group in args.batches for b in group})
    if min(args.batches) < 1 or min(args.prompt_len, args.prefill_len, args.prefill_prompts, args.repeats) < 1 \
            or args.new_tokens < 2:
        parser.error("batches, --prompt-len, --prefill-len, --prefill-prompts and --repeats must be >= 1, "
                     "--new-tokens >= 2")
    if args.max_seq_len is not None and args.max_seq_len < args.prompt_len + args.new_tokens:
        parser.error("--max-seq-len must hold --prompt-len + --new-tokens")
    return args


# Memory floor ----------------------------------------------------------------------------------------------


def copy_bandwidth(mib: int, repeats: int) -> dict:
    """`common.host_copy_bandwidth`, and for reference a jitted jnp.copy (which allocates its output each call,
    so it also pays page faults)."""
    result = common.host_copy_bandwidth(mib, repeats)
    x = jnp.ones(mib * 2**20 // 4, jnp.float32)
    jax_copy = jax.jit(jnp.copy)
    jax_copy(x).block_until_ready()
    jax_seconds = []
    for _ in range(max(3, repeats // 2)):
        start = time.perf_counter()
        jax_copy(x).block_until_ready()
        jax_seconds.append(time.perf_counter() - start)
    return {**result, "jax_copy_bytes_per_s_for_reference": result["bytes"] / min(jax_seconds)}


# Our engine ------------------------------------------------------------------------------------------------


def prompts_for(batch: int, args, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng([args.seed, batch])
    return [[int(t) for t in rng.integers(3, vocab, args.prompt_len)] for _ in range(batch)]


def run_engine(engine: Engine, prompts: list[list[int]], args) -> tuple[dict, list[list[int]]]:
    """One timed `generate`: the step records of that call summarized, and the tokens."""
    batch = len(prompts)
    sampling = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    first = len(engine.step_records)
    start = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    wall = time.perf_counter() - start
    records = engine.step_records[first:]
    tokens = [list(o.token_ids) for o in outputs]
    if any(len(t) != args.new_tokens for t in tokens):
        raise RuntimeError(f"engine returned {[len(t) for t in tokens]} tokens, expected {args.new_tokens} each")
    decode = [r for r in records if r.prefill_tokens == 0]
    prefill = [r for r in records if r.prefill_tokens > 0]
    steady = [r for r in decode if r.decode_seqs == batch]
    decode_tokens = sum(r.decode_seqs for r in decode)
    decode_time = sum(r.latency for r in decode)
    steady_time = sum(r.latency for r in steady)
    step_time = sum(r.latency for r in records)
    latencies = [r.latency for r in steady] or [r.latency for r in decode]
    host_per_step = (wall - step_time + sum(r.pack_time for r in records)) / len(records)
    return {
        "wall_s": wall,
        "steps": len(records),
        "decode_only_steps": len(decode),
        "full_batch_decode_steps": len(steady),
        "decode_tokens": decode_tokens,
        "decode_time_s": decode_time,
        "decode_tokens_per_s": decode_tokens / decode_time if decode_time else None,
        "steady_decode_tokens_per_s": batch * len(steady) / steady_time if steady_time else None,
        "end_to_end_tokens_per_s": batch * args.new_tokens / wall,
        "decode_step_median_s": statistics.median(latencies) if latencies else None,
        "decode_step_p90_s": float(np.percentile(latencies, 90)) if latencies else None,
        "decode_step_min_s": min(latencies) if latencies else None,
        "decode_buckets": sorted({f"{r.bucket_seqs}x{r.bucket_pages}p" for r in steady}),
        "prefill_steps": len(prefill),
        "prefill_steps_time_s": sum(r.latency for r in prefill),
        "prefill_step_median_s": statistics.median(r.latency for r in prefill) if prefill else None,
        "prefill_buckets": sorted({f"{r.bucket_seqs}x{r.bucket_tokens}t{r.bucket_pages}p" for r in prefill}),
        "host_outside_steps_s": wall - step_time,
        "pack_s_total": sum(r.pack_time for r in records),  # StepRecord.pack_time: host packing inside each step
        # The host time outside the steps and the packing inside them, per step, and as a share of the median
        # decode step (synchronous on a CPU: each step is read back before the next is planned).
        "host_unoverlapped_per_step_s": host_per_step,
        "host_share_of_decode_step": host_per_step / statistics.median(latencies) if latencies else None,
    }, tokens


def run_engine_prefill(engine: Engine, prompts: list[list[int]]) -> dict:
    """One timed `generate` of one token per prompt: the prompts' prefill, to their first tokens."""
    start = time.perf_counter()
    first = len(engine.step_records)
    engine.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))
    wall = time.perf_counter() - start
    tokens = sum(len(p) for p in prompts)
    return {"wall_s": wall, "prefill_tokens_per_s": tokens / wall, "steps": len(engine.step_records) - first}


def run_hf_prefill(model, prompts: list[list[int]]) -> dict:
    """One timed transformers forward over the prompts (no cache returned)."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        wall = time.perf_counter() - start
    return {"wall_s": wall, "prefill_tokens_per_s": ids.numel() / wall}


# transformers ----------------------------------------------------------------------------------------------


def hf_generate(model, input_ids, new_tokens: int) -> tuple[float, list[list[int]]]:
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - start
    return seconds, out[:, input_ids.shape[1]:].tolist()


def run_hf(model, prompts: list[list[int]], args) -> dict:
    """One timed attempt: generate with 1 new token (the prefill), then with all of them."""
    import torch

    batch = len(prompts)
    ids = torch.tensor(prompts, dtype=torch.long)
    prefill = hf_generate(model, ids, 1)[0]
    full, tokens = hf_generate(model, ids, args.new_tokens)
    if any(len(t) != args.new_tokens for t in tokens):
        raise RuntimeError(f"HF returned {[len(t) for t in tokens]} tokens, expected {args.new_tokens} each")
    decode_time = full - prefill
    return {
        "wall_s": full,
        "prefill_wall_s": prefill,
        "decode_time_s": decode_time,
        "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode_time if decode_time > 0 else None,
        "decode_step_s": decode_time / (args.new_tokens - 1) if decode_time > 0 else None,
        "end_to_end_tokens_per_s": batch * args.new_tokens / full,
    }


def load_hf(checkpoint: Path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = None  # generate() would stop at it whatever it is passed
    info = {"transformers": transformers.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "settings": "generate(input_ids [B, prompt], attention_mask=ones, max_new_tokens=N, min_new_tokens=N, "
                        "do_sample=False, pad_token_id=0), generation_config.eos_token_id=None, "
                        "torch.inference_mode, float32, default (dynamic) KV cache; per batch one untimed "
                        "generate(1) and generate(N) before the rounds; each attempt times generate(1) (the "
                        "prefill) then generate(N)"}
    return model, info


# Profile ---------------------------------------------------------------------------------------------------

SCOPES = (("paged_attention_reference", "attention: paged reference (gather, softmax, dots)"),
          ("write_kv", "attention: write_kv scatter"),
          ("dynamic_index_in_dim", "scan: per-layer weight slices (dynamic-slice copies)"),
          ("layer/mlp", "mlp matmuls + norm"), ("qkv", "q/k/v matmuls + norm"), ("rope", "rope"),
          ("o_proj", "o_proj matmul"), ("lm_head", "lm_head + final norm"), ("sample", "sampling"),
          ("embed", "embedding"))


def profile_steps(engine: Engine, batch: int, args, steps: int = 10) -> dict:
    """Traces `steps` steady decode steps at `batch` and sums the trace by model scope and host function."""
    sampling = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    ids = [engine.submit(prompt, sampling) for prompt in prompts_for(batch, args, engine.cfg.vocab_size)]
    while engine.has_unfinished():  # until every sequence decodes, with room for `steps` more
        engine.step()
        last = engine.step_records[-1]
        if last.prefill_tokens == 0 and last.decode_seqs == batch:
            break
    if not engine.has_unfinished() or engine.step_records[-1].decode_seqs != batch:
        return {"error": "could not reach a steady decode batch"}
    traced = len(engine.step_records)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                if engine.has_unfinished():
                    engine.step()
        paths = glob.glob(f"{tmp}/plugins/profile/*/*.trace.json.gz")
        trace = json.load(gzip.open(paths[0])) if paths else None
    for request_id in ids:  # done with them: abort rather than decode to the end
        try:
            engine.abort(request_id)
        except ValueError:  # already finished
            pass
    while engine.has_unfinished():
        engine.step()
    records = [r for r in engine.step_records[traced:traced + steps] if r.decode_seqs == batch]
    if trace is None or not records:
        return {"error": "no trace written"}
    r0 = records[0]
    program = engine.runner.program(Bucket(r0.bucket_seqs, r0.bucket_tokens, r0.bucket_pages))
    scope_of = dict(re.findall(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]+)"', program.as_text(), re.M))
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    xla, host, ops = collections.Counter(), collections.Counter(), collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") != "X":
            continue
        thread, name = threads.get((e["pid"], e["tid"]), ""), e["name"]
        if thread.startswith("tf_XLA"):
            if name.startswith(("Thunk", "end:", "Threadpool", "SlinkyThreadPool")):
                continue
            scope = scope_of.get(name, "")
            label = next((lab for key, lab in SCOPES if key in scope), None)
            if label is None:
                label = "weight matmuls without scope metadata" if name.startswith("dot.") else "other"
            xla[label] += e["dur"] * 1e-6
            ops[f"{name} [{scope.rsplit('/', 2)[-2] if scope.count('/') > 1 else scope}]"] += e["dur"] * 1e-6
        elif thread.startswith("python"):
            host[name] += e["dur"] * 1e-6
    n = len(records)
    step = statistics.median(r.latency for r in records)
    total = sum(xla.values())
    wait = host.get("$numpy asarray", 0.0) / n  # execute() blocks here until the step program is done
    engine_step = next((v for k, v in host.items() if k.endswith("step") and "engine.py" in k), 0.0) / n
    return {
        "steps_traced": n,
        "bucket": f"{r0.bucket_seqs} seqs x {r0.bucket_pages} pages",
        "context_tokens": [records[0].max_context, records[-1].max_context],
        "step_latency_median_s_under_trace": step,
        "xla_op_seconds_per_step_summed_over_threads": total / n,
        "xla_share_by_scope": {k: round(v / total, 3) for k, v in xla.most_common()},
        "xla_top_ops_ms_per_step": {k: round(1e3 * v / n, 3) for k, v in ops.most_common(10)},
        "host": {
            "engine_step_s": engine_step,
            "waiting_for_device_s": wait,
            "host_work_in_step_s": engine_step - wait,
            "pack_s": sum(v for k, v in host.items() if k.endswith("_pack")) / n,
            "schedule_s": sum(v for k, v in host.items() if k.endswith(" schedule")) / n,
        },
    }


def print_profile(batch: int, prof: dict) -> None:
    if "error" in prof:
        say(f"profile batch {batch}: {prof['error']}")
        return
    say(f"profile batch {batch} ({prof['bucket']}, context {prof['context_tokens']}): step "
        f"{prof['step_latency_median_s_under_trace'] * 1e3:.1f} ms, XLA ops "
        f"{prof['xla_op_seconds_per_step_summed_over_threads'] * 1e3:.1f} ms (summed over threads), host work "
        f"{prof['host']['host_work_in_step_s'] * 1e3:.2f} ms (pack {prof['host']['pack_s'] * 1e3:.2f}, schedule "
        f"{prof['host']['schedule_s'] * 1e3:.2f})")
    for label, share in prof["xla_share_by_scope"].items():
        if share >= 0.005:
            say(f"    {100 * share:5.1f}%  {label}")


# Main ------------------------------------------------------------------------------------------------------

OURS_KEYS = ("decode_tokens_per_s", "steady_decode_tokens_per_s", "end_to_end_tokens_per_s", "decode_step_median_s",
             "decode_step_min_s", "wall_s", "pack_s_total", "host_outside_steps_s", "host_unoverlapped_per_step_s",
             "host_share_of_decode_step")
HF_KEYS = ("decode_tokens_per_s", "end_to_end_tokens_per_s", "decode_step_s", "wall_s", "prefill_wall_s")


def side_figures(comparison: dict, side: str, keys) -> dict:
    """{key: median over the side's valid attempts}, with the attempt counts."""
    figures = {key: common.figure(comparison, side, key) for key in keys}
    first = next(iter(figures.values()))
    return {"valid_attempts": first["valid_attempts"], "attempts": first["attempts"],
            **{key: f["median"] for key, f in figures.items()}}


def describe(result: dict) -> str:
    if "bytes_per_s" in result:
        return f"{result['bytes_per_s'] / 1e9:6.1f} GB/s"
    if "prefill_tokens_per_s" in result:
        return f"prefill {result['prefill_tokens_per_s']:8.1f} tok/s, wall {result['wall_s']:.3f} s"
    return f"decode {result['decode_tokens_per_s'] or float('nan'):8.1f} tok/s, wall {result['wall_s']:.3f} s"


def greedy_agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Greedy tokens of both systems on the same weights (float32 near-ties can make them part ways)."""
    pairs = list(zip(ours, theirs, strict=True))
    same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True))
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), len(x)) for x, y in pairs]
    return {"greedy_tokens_equal_share": same / sum(len(x) for x in ours),
            "greedy_identical_prefix_mean": sum(prefix) / len(prefix)}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("jax", "absl", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = common.comparison_settings(args)
    say(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")

    loaded = load_model(args.model, seed=args.seed)
    cfg, params = loaded.cfg, loaded.params
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    say(f"model {cfg.name}: {n_params / 1e6:.1f}M parameters, {weight_bytes / 2**20:.1f} MiB ({cfg.dtype})")
    engine_config = EngineConfig(max_batch=max(args.batches), prefill_chunk=args.prefill_chunk,
                                 max_seq_len=args.max_seq_len or args.prompt_len + args.new_tokens)
    # The prefill comparison has its own engine, with its own context.
    prefill_config = EngineConfig(max_batch=args.prefill_prompts, prefill_chunk=args.prefill_chunk,
                                  max_seq_len=args.prefill_len + 1)
    with common.LoadMeter() as compile_load:
        engine = Engine(loaded, engine_config)
        prefill_engine = Engine(loaded, prefill_config)
    weight_mib = max(1, weight_bytes // 2**20)

    hf_info = None
    tokens: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = None
        if not args.no_hf:
            save_hf_checkpoint(tmp, cfg, params)
            model, hf_info = load_hf(Path(tmp))
        sides = {"copy": lambda: copy_bandwidth(args.copy_mib, args.copy_repeats),
                 "copy_weight_sized": lambda: copy_bandwidth(weight_mib, args.copy_repeats)}
        with common.LoadMeter() as warmup_load:  # untimed: first use of each program, allocator, caches
            for batch in args.batches:
                prompts = prompts_for(batch, args, cfg.vocab_size)
                tokens[f"ours@{batch}"] = run_engine(engine, prompts, args)[1]
                sides[f"ours@{batch}"] = lambda p=prompts: run_engine(engine, p, args)[0]
                if model is not None:
                    import torch

                    ids = torch.tensor(prompts, dtype=torch.long)
                    hf_generate(model, ids, 1)
                    tokens[f"hf@{batch}"] = hf_generate(model, ids, args.new_tokens)[1]
                    sides[f"hf@{batch}"] = lambda p=prompts, m=model: run_hf(m, p, args)
            rng = np.random.default_rng([args.seed, 0])
            long_prompts = [[int(t) for t in rng.integers(3, cfg.vocab_size, args.prefill_len)]
                            for _ in range(args.prefill_prompts)]
            run_engine_prefill(prefill_engine, long_prompts)
            sides["prefill-ours"] = lambda: run_engine_prefill(prefill_engine, long_prompts)
            if model is not None:
                run_hf_prefill(model, long_prompts)
                sides["prefill-hf"] = lambda m=model: run_hf_prefill(m, long_prompts)
        quiet = common.wait_for_quiet(args.max_other_share, settings["quiet_timeout"], settings["quiet_sample"], say)
        say(f"{args.repeats} interleaved rounds over {len(sides)} sides (quiet wait: {quiet['waited_s']} s, "
            f"other processes' shares {quiet['shares'][-2:]})")
        comparison = common.interleave(sides, args.repeats, seed=args.seed, log=say, describe=describe, **settings)
        del model, sides
    ours = {b: side_figures(comparison, f"ours@{b}", OURS_KEYS) for b in args.batches}
    theirs = {b: side_figures(comparison, f"hf@{b}", HF_KEYS) for b in args.batches} if hf_info else {}
    copy_bw = side_figures(comparison, "copy", ("bytes_per_s", "jax_copy_bytes_per_s_for_reference"))
    copy_small = side_figures(comparison, "copy_weight_sized", ("bytes_per_s",))
    for b in args.batches:
        o = ours[b]
        say(f"ours batch {b:3d}: decode {o['decode_tokens_per_s'] or float('nan'):8.1f} tok/s (steady "
            f"{o['steady_decode_tokens_per_s'] or float('nan'):8.1f}), end-to-end "
            f"{o['end_to_end_tokens_per_s'] or float('nan'):8.1f} tok/s ({o['valid_attempts']}/{o['attempts']} valid)")
        if b in theirs:
            h = theirs[b]
            say(f"HF   batch {b:3d}: decode {h['decode_tokens_per_s'] or float('nan'):8.1f} tok/s, end-to-end "
                f"{h['end_to_end_tokens_per_s'] or float('nan'):8.1f} tok/s ({h['valid_attempts']}/{h['attempts']} "
                f"valid)")

    # The floor: the weights over the large copy's bandwidth (the weights may fit in the last-level cache, where a
    # weight-sized copy runs faster: recorded as context only).
    bandwidth = copy_bw["bytes_per_s"]
    floor_s = weight_bytes / bandwidth if bandwidth else None
    b1 = ours.get(1)
    step_over_floor = common.ratio(b1["decode_step_median_s"] if b1 else None, floor_s)
    memory_floor = {"weight_bytes": weight_bytes, "copy_bytes_per_s": bandwidth, "floor_s": floor_s,
                    "floor_s_at_weight_sized_copy_bandwidth": weight_bytes / copy_small["bytes_per_s"]
                    if copy_small["bytes_per_s"] else None,
                    "batch1_decode_step_median_s": b1["decode_step_median_s"] if b1 else None,
                    "step_over_floor": step_over_floor["value"], "valid": step_over_floor["valid"],
                    "target_max": TARGETS["batch1_step_vs_floor_max"],
                    "met": step_over_floor["value"] <= TARGETS["batch1_step_vs_floor_max"]
                    if step_over_floor["valid"] else None}
    if 1 in theirs:
        memory_floor["hf_batch1_decode_step_over_floor"] = common.ratio(theirs[1]["decode_step_s"], floor_s)["value"]
    if step_over_floor["valid"]:
        say(f"batch-1 decode step {b1['decode_step_median_s'] * 1e3:.2f} ms vs memory floor {floor_s * 1e3:.2f} ms "
            f"({weight_bytes / 2**20:.0f} MiB at {bandwidth / 1e9:.1f} GB/s): {step_over_floor['value']:.2f}x "
            f"(target <= {TARGETS['batch1_step_vs_floor_max']}x)")
    else:
        say("batch-1 decode step vs memory floor: invalid (no valid attempt on one side)")

    prefill = {"prompts": args.prefill_prompts, "prompt_len": args.prefill_len,
               "ours": side_figures(comparison, "prefill-ours", ("prefill_tokens_per_s", "wall_s"))}
    if hf_info:
        prefill["hf"] = side_figures(comparison, "prefill-hf", ("prefill_tokens_per_s", "wall_s"))
        ratio = common.ratio(prefill["ours"]["prefill_tokens_per_s"], prefill["hf"]["prefill_tokens_per_s"])
        prefill.update(ratio_ours_over_hf=ratio["value"], valid=ratio["valid"], target_min=TARGETS["prefill_vs_hf_min"],
                       met=ratio["value"] >= TARGETS["prefill_vs_hf_min"] if ratio["valid"] else None)
        if ratio["valid"]:
            say(f"prefill of {args.prefill_prompts} x {args.prefill_len} tokens: ours "
                f"{prefill['ours']['prefill_tokens_per_s']:.0f} tok/s, HF forward "
                f"{prefill['hf']['prefill_tokens_per_s']:.0f} tok/s: {ratio['value']:.2f}x")
    host = {b: ours[b]["host_share_of_decode_step"] for b in args.batches}
    say("un-overlapped host time per step, share of the median decode step: "
        + ", ".join(f"batch {b} {v:.1%}" for b, v in host.items() if v is not None))

    ratios = []
    for batch in theirs:
        o, h = ours[batch], theirs[batch]
        decode = common.ratio(o["decode_tokens_per_s"], h["decode_tokens_per_s"])
        row = {"batch": batch, "valid": decode["valid"], "decode": decode["value"],
               "steady_decode": common.ratio(o["steady_decode_tokens_per_s"], h["decode_tokens_per_s"])["value"],
               "end_to_end": common.ratio(o["end_to_end_tokens_per_s"], h["end_to_end_tokens_per_s"])["value"],
               **greedy_agreement(tokens[f"ours@{batch}"], tokens[f"hf@{batch}"])}
        if batch in TARGETS["decode_vs_hf_batches"]:
            row["target_min"] = TARGETS["decode_vs_hf_min"]
            row["met"] = row["decode"] >= TARGETS["decode_vs_hf_min"] if row["valid"] else None
        ratios.append(row)
        say(f"ours / HF batch {batch:3d}: " + (f"decode {row['decode']:.2f}x, end-to-end {row['end_to_end']:.2f}x"
                                              if row["valid"] else "invalid (no valid attempt on one side)")
            + f"; same greedy tokens {100 * row['greedy_tokens_equal_share']:.0f}%")

    profile = {}
    if args.profile:
        for batch in args.batches:
            with common.LoadMeter() as meter:
                profile[batch] = profile_steps(engine, batch, args)
            profile[batch]["load"] = meter.record
            print_profile(batch, profile[batch])

    payload = {
        "config": {
            "model": os.path.relpath(args.model, REPO) if Path(args.model).is_absolute() else args.model,
            "parameters": n_params, "weight_bytes": weight_bytes, "dtype": cfg.dtype, "batches": args.batches,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "seed": args.seed,
            "repeats": args.repeats, "quick": args.quick, "copy_mib": args.copy_mib,
            "copy_repeats": args.copy_repeats, "weight_sized_copy_mib": weight_mib,
            "sampling": "SamplingParams(max_tokens=new_tokens, ignore_eos=True): greedy",
            "engine": dataclasses.asdict(engine_config),
            "prefill_engine": dataclasses.asdict(prefill_config),
            "warmup": "one untimed generate per batch and system before the rounds (its tokens are compared)",
            "hf": hf_info,
        },
        "phases": {"engine_compile": compile_load.record, "warmup": warmup_load.record},
        "quiet_wait": quiet,
        "comparison": comparison,
        "ours": [{"batch": b, **row} for b, row in ours.items()],
        "hf": [{"batch": b, **row} for b, row in theirs.items()],
        "ratios_ours_over_hf": ratios,
        "copy_bandwidth": {**copy_bw, "weight_sized_bytes_per_s": copy_small["bytes_per_s"],
                           "method": "numpy.copyto into a preallocated buffer, best of copy_repeats per attempt; "
                                     "bytes = read + write"},
        "memory_floor": memory_floor,
        "prefill": prefill,
        "host_share_of_decode_step": {"by_batch": host,
                                      "target_max_at_batch_8": TARGETS["host_share_of_batch8_step_max"]},
        "definitions": {
            "figure": "median over the side's valid attempts (None without one); every attempt is in comparison",
            "ratio": "ours figure / HF figure, both from valid attempts; None and valid=false otherwise",
            "ours.decode_tokens_per_s": "decode tokens of the steps without prefill tokens / the time of those steps "
                                        "(StepRecord latencies); includes the drain tail at shrinking batch",
            "ours.steady_decode_tokens_per_s": "the same over the steps that decode all B sequences",
            "hf.decode_tokens_per_s": "B * (new_tokens - 1) / (generate(new_tokens) - generate(1)) wall times",
            "end_to_end_tokens_per_s": "B * new_tokens / wall time of one generate call (prefill included)",
            "memory_floor.floor_s": "weight bytes / copy bandwidth (read + write bytes per second)",
            "prefill.ours": "prompts x prompt_len / wall time of generate(max_tokens=1) over the prompts",
            "prefill.hf": "the same tokens / wall time of one transformers forward (use_cache=False)",
            "host_unoverlapped_per_step_s": "(wall - step latencies + packing inside steps) / steps: host time "
                                            "no device work overlaps (each step is read back before the next)",
        },
    }
    if profile:
        payload["profile"] = [{"batch": b, **p} for b, p in profile.items()]
    out = common.output_dir(args)
    if out is None:
        say("--quick without --out: no result file written")
        return
    say(f"wrote {common.write_result('decode', payload, out)}")


if __name__ == "__main__":
    main()
