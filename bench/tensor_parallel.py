"""Step times and bytes per device of one engine at tensor-parallel degrees 1, 2 and 4.

On a CPU the devices are emulated (`--devices`, XLA's host platform device count, set before JAX loads): they
share the machine's cores, so the step times are relative only (what the split and its collectives cost against
one device, not a speed-up). On a machine with several GPUs the same run measures real devices.

For each degree an engine is built over the same weights (`--model`, random from `--seed` for a YAML) and its
decode programs (`--batches`, the longest page bucket) and one mixed program (a prefill chunk) are timed on
synthetic inputs (`ModelRunner.time_synthetic`: every sequence at a random context, no cache changed; an
attempt's time is the median of `--runs` runs). Every timed figure goes through `common.interleave`: `--repeats`
rounds, each running every (degree, program) once in a seeded random order, with the machine's load; a side's
figure is the median over its valid attempts. Bytes per device come from the arrays' shardings (weights, arena)
and from the compiled decode program (`memory_analysis`: its arguments, outputs and workspace on one device).

    python bench/tensor_parallel.py                      # small.yaml, 4 devices, degrees 1 2 4, batches 1 8
    python bench/tensor_parallel.py --quick --out /tmp/b # tiny.yaml, degrees 1 2, batch 1, 2 rounds
"""

from __future__ import annotations

import argparse
import os
import sys


def _devices_flag(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
    return 4


# The emulated device count must be set before JAX is imported (by bench/common.py below).
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={_devices_flag(sys.argv[1:])}").strip()

import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import common  # noqa: E402  (bench/common.py: the script's directory is on sys.path)
import jax  # noqa: E402
from common import say  # noqa: E402

from harli_jax import Engine, EngineConfig  # noqa: E402
from harli_jax.model import load_model  # noqa: E402
from harli_jax.model.sharding import device_bytes  # noqa: E402
from harli_jax.runtime.runner import Bucket  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny.yaml, degrees 1 2, batch 1, 2 rounds")
    p.add_argument("--model", help="HF checkpoint directory or model YAML (default configs/models/small.yaml; "
                                   "tiny.yaml with --quick)")
    p.add_argument("--devices", type=int, default=4, help="emulated CPU devices (default 4)")
    p.add_argument("--degrees", type=int, nargs="+", help="tensor-parallel degrees (default 1 2 4; 1 2 with --quick)")
    p.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 8; 1 with --quick)")
    p.add_argument("--max-seq-len", type=int, default=512, help="context of the timed programs (default 512)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 5; 2 with --quick)")
    p.add_argument("--runs", type=int, default=20, help="runs of a program per attempt, their median its time "
                                                        "(default 20)")
    p.add_argument("--seed", type=int, default=0, help="weights of a YAML model and the order of the rounds")
    common.add_arguments(p)
    args = p.parse_args(argv)
    model = "tiny.yaml" if args.quick else "small.yaml"
    args.model = args.model or str(REPO / "configs" / "models" / model)
    args.degrees = args.degrees or ([1, 2] if args.quick else [1, 2, 4])
    args.batches = args.batches or ([1] if args.quick else [1, 8])
    args.repeats = args.repeats or (2 if args.quick else 5)
    if args.quick:
        args.max_seq_len = min(args.max_seq_len, 64)
    return args


def placement(engine: Engine, decode: Bucket) -> dict:
    """Bytes on one device and in all: weights, arena, and the decode program's buffers (from XLA)."""
    leaves = jax.tree.leaves(engine.runner.params)
    memory = engine.runner.compile(decode).memory_analysis()
    program = None if memory is None else {
        "argument_bytes": memory.argument_size_in_bytes, "output_bytes": memory.output_size_in_bytes,
        "workspace_bytes": memory.temp_size_in_bytes}
    return {"weights_per_device": sum(map(device_bytes, leaves)), "weights_total": sum(x.nbytes for x in leaves),
            "arena_per_device": device_bytes(engine.arena.buffer), "arena_total": engine.arena.buffer.nbytes,
            "decode_program_per_device": program}


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = jax.devices()
    say(f"{len(devices)} {devices[0].device_kind} devices; model {args.model}; degrees {args.degrees}")
    model = load_model(args.model, seed=args.seed)  # on one device: each engine places its copy on its mesh
    top = max(args.batches)
    # An arena of room for every sequence at full context twice over, whatever the device's memory (one engine
    # per degree is alive at once).
    arena_pages = 2 * top * -(-args.max_seq_len // 16) + 1
    config = dict(max_batch=top, batch_buckets=tuple(args.batches), max_seq_len=args.max_seq_len,
                  prefill_chunk=min(64, args.max_seq_len // 2), num_pages=arena_pages, page_tokens=16)
    engines = {}
    for tp in args.degrees:
        engines[tp] = Engine(model, EngineConfig(**config, tensor_parallel=tp))  # compiles and runs each program
    runner = engines[args.degrees[0]].runner
    pages = runner.page_buckets[-1]
    programs = {f"decode@{b}": runner.bucket_for(b, b, pages) for b in args.batches}
    programs["mixed"] = runner.bucket_for(1, 1 + runner.prefill_chunk, pages)
    sides = {}
    for tp, engine in engines.items():
        for name, bucket in programs.items():
            def run(engine=engine, bucket=bucket):
                timed = [engine.runner.time_synthetic(bucket, seed=i, scratch_page=1) for i in range(args.runs)]
                return {"seconds": statistics.median(t for _, t in timed),
                        "context": statistics.median(c for c, _ in timed)}
            sides[f"tp{tp}/{name}"] = run
    comparison = common.interleave(sides, args.repeats, seed=args.seed,
                                   describe=lambda r: f"{r['seconds'] * 1e3:.2f} ms",
                                   **common.comparison_settings(args))
    table = []
    for tp in args.degrees:
        row = {"tp": tp, **placement(engines[tp], programs[f"decode@{args.batches[0]}"])}
        for name in programs:
            fig = common.figure(comparison, f"tp{tp}/{name}", "seconds")
            base = common.figure(comparison, f"tp{args.degrees[0]}/{name}", "seconds")["median"]
            row[name] = {"step_s": fig, "relative_to_first_degree": common.ratio(fig["median"], base)}
        table.append(row)
        say(f"tp {tp}: " + ", ".join(f"{name} {row[name]['step_s']['median'] * 1e3:.2f} ms"
                                     if row[name]['step_s']['median'] else f"{name} invalid" for name in programs)
            + f"; weights {row['weights_per_device'] / 2**20:.1f} of {row['weights_total'] / 2**20:.1f} MiB, arena "
              f"{row['arena_per_device'] / 2**20:.1f} of {row['arena_total'] / 2**20:.1f} MiB per device")
    payload = {"config": {"model": args.model, "devices": len(devices), "degrees": args.degrees,
                          "batches": args.batches, "max_seq_len": args.max_seq_len, "page_bucket": pages,
                          "programs": {name: vars(b) for name, b in programs.items()}, "repeats": args.repeats,
                          "emulated": devices[0].platform == "cpu"},
               "note": ("emulated CPU devices share the machine's cores: step times are relative only"
                        if devices[0].platform == "cpu" else "real devices"),
               "table": table, "comparison": comparison,
               "median_context": statistics.median(a["result"]["context"] for a in comparison["attempts"])}
    out = common.output_dir(args)
    if out is not None:
        say(f"wrote {common.write_result('tensor_parallel', payload, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
