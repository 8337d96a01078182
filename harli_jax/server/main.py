"""`harli serve`: the OpenAI-compatible server (harli_jax.server.app) over one engine, with uvicorn.

It loads the model, compiles the engine's step programs, starts the engine thread and the HTTP server, and prints
`harli serve: listening on http://HOST:PORT` once `/health` answers 200 (`--port 0` takes a free port; the line
names it). With `--state-dir` it also runs OpenAI fine-tuning jobs in the decode slack under `--tpot-slo` and
serves their adapters (with `--max-loras` adapters resident at once, any mix in one batch). SIGINT or SIGTERM
stops taking requests, lets those in flight finish for up to `--drain-timeout` seconds, aborts the rest,
checkpoints a running fine-tuning job (a restart resumes it) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import jax
import uvicorn

from harli_jax.errors import HarliError
from harli_jax.model import load_model
from harli_jax.model.config import DTYPES
from harli_jax.model.loader import NAMED_MODELS
from harli_jax.options import add_option, given
from harli_jax.replay.options import parse_slo
from harli_jax.runtime import distributed
from harli_jax.runtime.colocation import POLICIES
from harli_jax.runtime.config import (
    AdapterConfig,
    CacheConfig,
    CoLocationConfig,
    EngineConfig,
    ParallelConfig,
    RunnerConfig,
    SchedulerConfig,
)
from harli_jax.runtime.engine import Engine
from harli_jax.server.app import ServerMetrics, create_app
from harli_jax.server.finetuning import FineTuning
from harli_jax.server.loop import EngineLoop

# The server's defaults where they differ from EngineConfig's: adapters resident for fine-tuned and uploaded
# LoRAs, and top logprobs up to the OpenAI API's most.
SERVER_DEFAULTS = {"max_loras": 8, "max_logprobs": 20}
# The engine flags: (flag, config class, field, argparse keywords); each overrides --engine-config where given.
ENGINE_FLAGS = [
    ("--max-batch", SchedulerConfig, "max_batch", dict(type=int)),
    ("--max-seq-len", CacheConfig, "max_seq_len", dict(type=int)),
    ("--prefill-chunk", SchedulerConfig, "prefill_chunk", dict(type=int)),
    ("--queue-timeout", SchedulerConfig, "queue_timeout_s", dict(type=float)),
    ("--admission", SchedulerConfig, "admission", dict(action=argparse.BooleanOptionalAction)),
    ("--dtype", RunnerConfig, "dtype", dict(choices=DTYPES)),
    ("--max-loras", AdapterConfig, "max_loras", dict(type=int)),
    ("--max-cpu-loras", AdapterConfig, "max_cpu_loras", dict(type=int)),
    ("--max-lora-rank", AdapterConfig, "max_lora_rank", dict(type=int)),
    ("--max-logprobs", RunnerConfig, "max_logprobs", dict(type=int, help="the most top logprobs a request may ask "
                                                         "for; every step computes them (default 20, the OpenAI "
                                                         "API's most; 0: logprobs off)")),
    ("--policy", CoLocationConfig, "policy", dict(choices=POLICIES)),
    ("--tp", ParallelConfig, "tensor_parallel", dict(type=int)),
    ("--compilation-cache", RunnerConfig, "compile_cache_dir", dict(metavar="DIR|off")),
]


class _Server(uvicorn.Server):
    """uvicorn's server, except that SIGINT or SIGTERM only ends `run()`: uvicorn raises the signal again once it
    has stopped, which would kill the process before the engine drains."""

    @contextlib.contextmanager
    def capture_signals(self):
        handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harli serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="HF checkpoint directory, GGUF file, or a model config such as configs/models/tiny.yaml")
    p.add_argument("--served-model-name", help="the name clients call the model by (default: the model's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--engine-config", help="engine YAML (EngineConfig.from_yaml); the engine flags below override "
                                           "its fields where given")
    for flag, cls, name, kwargs in ENGINE_FLAGS:
        add_option(p, flag, cls, name, shown_default=SERVER_DEFAULTS.get(name, dataclasses.MISSING), **kwargs)
    p.add_argument("--max-waiting", type=int, help="requests that may wait beyond the batch; more get 429 "
                                                   "(default: no limit)")
    p.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens of a request that sets none "
                                                                      "(default 16, as the OpenAI API)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests may take to "
                                                                     "finish at shutdown (default 30)")
    p.add_argument("--seed", type=int, default=0, help="weights of a YAML model (default 0)")
    p.add_argument("--state-dir", help="fine-tuning: files, jobs and adapters live here and survive a restart "
                                       "(unset: the fine-tuning routes are off)")
    p.add_argument("--tpot-slo", help="the time-per-output-token SLO fine-tuning keeps to: '50ms', or 'Nx' of the "
                                      "measured solo decode step (default: --engine-config's tpot_slo_ms, else 4x)")
    p.add_argument("--finetune-seq-len", type=int, default=128, help="tokens per training row (default 128)")
    p.add_argument("--finetune-rank", type=int, default=8, help="LoRA rank of fine-tuning jobs (default 8)")
    p.add_argument("--checkpoint-steps", type=int, default=25, help="optimizer steps between a job's servable "
                                                                    "checkpoints (default 25)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="servable checkpoints kept per job, the newest "
                                                                   "(default 3, as OpenAI keeps); an older one is no "
                                                                   "longer served and its export is deleted")
    distributed.add_options(p)
    return p


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig's defaults, then the server's (`SERVER_DEFAULTS`), then `--engine-config`, then the engine
    flags that were given."""
    flags = {name: value for cls in {cls for _, cls, _, _ in ENGINE_FLAGS} for name, value in given(args, cls).items()}
    if flags.get("max_logprobs") == 0:
        flags["max_logprobs"] = None  # logprobs off
    if args.engine_config:
        return EngineConfig.from_yaml(args.engine_config, defaults=SERVER_DEFAULTS, **flags)
    return EngineConfig(**{**SERVER_DEFAULTS, **flags})


def tpot_slo(args: argparse.Namespace, config: EngineConfig) -> str:
    """The SLO fine-tuning keeps to: --tpot-slo, else the engine config's, else 4x the solo decode step."""
    if args.tpot_slo is not None:
        return args.tpot_slo
    ms = config.colocation.tpot_slo_ms
    return "4x" if ms is None else f"{ms:g}ms"


def check_args(args: argparse.Namespace, config: EngineConfig) -> None:
    """A HarliError naming the first bad flag, before anything loads (`config`, which checked its own fields,
    is what `engine_config` made of --engine-config and the engine flags)."""
    if args.model not in NAMED_MODELS and not Path(args.model).exists():
        raise HarliError(f"--model not found: {args.model}")
    for name in ("default_max_tokens", "finetune_seq_len", "finetune_rank", "checkpoint_steps", "keep_checkpoints"):
        value = getattr(args, name)
        if value <= 0:
            raise HarliError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.max_waiting is not None and args.max_waiting < 0:
        raise HarliError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    if args.finetune_rank > config.adapters.max_lora_rank:
        raise HarliError(f"--finetune-rank {args.finetune_rank} exceeds --max-lora-rank "
                         f"{config.adapters.max_lora_rank}: the jobs' adapters could not be served")
    if args.state_dir is not None and config.adapters.max_loras == 0:
        raise HarliError("--state-dir serves fine-tuned adapters: it needs --max-loras >= 1")
    parse_slo(tpot_slo(args, config), "tpot-slo")
    if not 0 <= args.port < 65536:
        raise HarliError(f"--port must be in [0, 65535], got {args.port}")
    if args.drain_timeout < 0:
        raise HarliError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")


def _announce(server, host: str) -> None:
    """Prints the URL once the server listens and /health answers 200."""
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://{host}:{port}"
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
                if response.status == 200:
                    print(f"harli serve: listening on {url}", flush=True)
                    return
        except OSError:
            time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = engine_config(args)
        check_args(args, config)
        several = distributed.start(args)  # before JAX computes anything
        if several and args.state_dir is not None:
            raise HarliError("--state-dir: fine-tuning jobs run on a single-process server")
        model = load_model(args.model, dtype=config.runner.dtype, seed=args.seed,
                           tensor_parallel=config.parallel.tensor_parallel)
        name = args.served_model_name or model.cfg.name
        print(f"harli serve: {name}, compiling the step programs...", file=sys.stderr, flush=True)
        engine = Engine(model, config)
        if engine.peers is not None and not engine.peers.leader:
            engine.follow()  # process 0 serves; this one runs its steps until it stops
            return 0
    except HarliError as e:
        print(f"harli serve: error: {e}", file=sys.stderr)
        return 2
    try:
        return _serve(engine, args, name)
    finally:
        engine.release_followers()  # however process 0 ends, the others stop with it


def _serve(engine: Engine, args: argparse.Namespace, name: str) -> int:
    """Sets the SLO, starts the engine thread and the HTTP server, and serves until SIGINT/SIGTERM."""
    try:
        slo = parse_slo(tpot_slo(args, engine.config), "tpot-slo")
        solo = engine.time_decode_step(engine.config.scheduler.max_batch) if slo.unit == "x" else 0.0
        engine.set_tpot_slo(slo.seconds(solo) * 1e3)
        fine_tuning = None if args.state_dir is None else FineTuning(
            args.state_dir, engine, name, seq_len=args.finetune_seq_len, rank=args.finetune_rank,
            checkpoint_steps=args.checkpoint_steps, keep_checkpoints=args.keep_checkpoints)
    except HarliError as e:
        print(f"harli serve: error: {e}", file=sys.stderr)
        return 2
    colocation = engine.config.colocation
    print(f"harli serve: TPOT SLO {colocation.tpot_slo_ms:.1f} ms ({slo}), policy {colocation.policy}"
          + (f", fine-tuning state in {args.state_dir}" if fine_tuning else ""), file=sys.stderr, flush=True)
    metrics = ServerMetrics(colocation.tpot_slo_ms / 1e3, name, engine.config.adapters.max_loras)
    jax.monitoring.register_event_duration_secs_listener(metrics.compiled)
    loop = EngineLoop(engine, args.max_waiting, on_finished=metrics.finished, on_snapshot=metrics.observe,
                      jobs=fine_tuning)
    loop.start()
    app = create_app(loop, name, metrics, fine_tuning=fine_tuning, api_key=args.api_key,
                     default_max_tokens=args.default_max_tokens)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=int(args.drain_timeout) or None))
    threading.Thread(target=_announce, args=(server, args.host), daemon=True).start()
    try:
        server.run()  # until SIGINT/SIGTERM: uvicorn stops listening and waits for the open streams
    finally:
        loop.stop(drain_s=args.drain_timeout)
    print("harli serve: stopped", file=sys.stderr, flush=True)
    return 0 if loop.failure is None else 1
