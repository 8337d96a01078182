"""The `harli` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

import harli_jax
from harli_jax import Engine, EngineConfig, FinetuneJob, LoRAConfig, SamplingParams
from harli_jax.errors import HarliError
from harli_jax.lora import extraction
from harli_jax.lora.adapters import load_peft
from harli_jax.model import load_model
from harli_jax.model.config import DTYPES
from harli_jax.model.params import PROJECTIONS
from harli_jax.options import add_option, default_of, given
from harli_jax.replay.run import main as replay_main
from harli_jax.replay.trace import synthesize, write_trace
from harli_jax.runtime import distributed
from harli_jax.runtime.config import COMPILE_CACHE_HELP, ParallelConfig, RunnerConfig
from harli_jax.runtime.job import default_schedule


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harli", description=harli_jax.__doc__)
    parser.add_argument("--version", action="version", version=f"harli_jax {harli_jax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("replay", add_help=False, help="replay a trace with a finetune job and report "
                                                        "(harli replay --help)")
    commands.add_parser("serve", add_help=False, help="an OpenAI-compatible HTTP server (harli serve --help)")

    gen = commands.add_parser("generate", help="generate from a prompt",
                              description="Generates from a prompt with an HF checkpoint or a YAML model config "
                                          "(random weights), through the decode engine.")
    gen.add_argument("--model", required=True, metavar="MODEL",
                     help="HF checkpoint directory, GGUF file, or a model config such as configs/models/tiny.yaml")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message in the model's chat "
                                                         "template (e.g. --model smollm2)")
    gen.add_argument("--adapter", metavar="DIR", help="an HF PEFT LoRA adapter directory to generate with "
                                                      "(e.g. harli finetune --out, harli replay --export-adapter)")
    add_option(gen, "--max-tokens", SamplingParams, "max_tokens", type=_positive_int)
    add_option(gen, "--temperature", SamplingParams, "temperature", type=float)
    add_option(gen, "--top-k", SamplingParams, "top_k", type=int)
    add_option(gen, "--top-p", SamplingParams, "top_p", type=float)
    add_option(gen, "--dtype", RunnerConfig, "dtype", choices=DTYPES)
    add_option(gen, "--seed", SamplingParams, "seed", type=int)
    add_option(gen, "--tp", ParallelConfig, "tensor_parallel", type=_positive_int)
    gen.add_argument("--compilation-cache", metavar="DIR|off", help=COMPILE_CACHE_HELP)
    distributed.add_options(gen)
    gen.set_defaults(run=_generate)

    ft = commands.add_parser("finetune", help="train a LoRA adapter",
                             description="Trains a LoRA adapter on a JSONL dataset and exports it in the HF PEFT "
                                         "format. Without --dataset it trains a generated task: on a model with a "
                                         "chat template (e.g. --model smollm2) extracting fields from a sentence "
                                         f"as JSON, at that task's schedule ({_schedule_text()}) unless a flag "
                                         "sets it; else upper-casing words.")
    ft.add_argument("--model", required=True, metavar="MODEL", help="HF checkpoint directory, GGUF file or model YAML")
    add_option(ft, "--dataset", FinetuneJob, "dataset")
    add_option(ft, "--steps", FinetuneJob, "total_steps", type=_positive_int)
    add_option(ft, "--rank", LoRAConfig, "rank", type=_positive_int)
    add_option(ft, "--alpha", LoRAConfig, "alpha", type=float)
    add_option(ft, "--targets", LoRAConfig, "targets", type=_names)
    add_option(ft, "--lr", FinetuneJob, "learning_rate", type=float)
    add_option(ft, "--rows", FinetuneJob, "micro_batch_rows", type=_positive_int)
    add_option(ft, "--seq-len", FinetuneJob, "seq_len", type=_positive_int)
    add_option(ft, "--grad-accum", FinetuneJob, "grad_accum", type=_positive_int)
    add_option(ft, "--checkpoint-dir", FinetuneJob, "checkpoint_dir")
    add_option(ft, "--checkpoint-interval", FinetuneJob, "checkpoint_interval", type=_positive_int)
    add_option(ft, "--strict", FinetuneJob, "strict_data", action="store_true")
    ft.add_argument("--out", help="directory to export the PEFT adapter to")
    add_option(ft, "--dtype", RunnerConfig, "dtype", choices=DTYPES)
    add_option(ft, "--seed", FinetuneJob, "seed", type=int)
    add_option(ft, "--tp", ParallelConfig, "tensor_parallel", type=_positive_int)
    ft.add_argument("--compilation-cache", metavar="DIR|off", help=COMPILE_CACHE_HELP)
    ft.set_defaults(run=_finetune)

    trace = commands.add_parser("trace", help="inference traces").add_subparsers(dest="trace_command",
                                                                                  required=True)
    synth = trace.add_parser("synth", help="write a synthetic trace (native CSV)",
                             description="Writes a synthetic inference trace as native CSV "
                                         "(arrival_s,prompt_tokens,output_tokens).")
    synth.add_argument("--kind", choices=("poisson", "gamma", "bursts", "diurnal"), default="gamma")
    synth.add_argument("--requests", type=_positive_int, default=200)
    synth.add_argument("--rate", type=float, default=5.0, help="mean requests per second (default 5)")
    for flag, name, help in (("--cv", "cv", "gamma: inter-arrival coefficient of variation"),
                             ("--period", "period", "bursts/diurnal: period in seconds"),
                             ("--prompt-mean", "prompt_mean", "mean prompt tokens"),
                             ("--output-mean", "output_mean", "mean output tokens")):
        default = default_of(synthesize, name)
        synth.add_argument(flag, type=float, default=default, help=f"{help} (default {default})")
    synth.add_argument("--burst-rate", type=float, help="bursts: rate during a burst (default 5x --rate)")
    synth.add_argument("--seed", type=int, default=default_of(synthesize, "seed"))
    synth.add_argument("--out", required=True, help="CSV file to write")
    synth.set_defaults(run=_trace_synth)
    return parser


def _schedule_text() -> str:
    flags = {"learning_rate": "--lr", "total_steps": "--steps"}
    return ", ".join(f"{flags[k]} {v:g}" for k, v in extraction.SCHEDULE.items())


def _trace_synth(args: argparse.Namespace) -> None:
    made = synthesize(args.kind, num_requests=args.requests, rate=args.rate, seed=args.seed, cv=args.cv,
                      burst_rate=args.burst_rate, period=args.period, prompt_mean=args.prompt_mean,
                      output_mean=args.output_mean)
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "trace_command", "run", "out")}
    comment = "harli trace synth " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items()
                                               if v is not None)
    comment += f"\n{len(made)} requests over {made.duration:.1f}s"
    print(f"wrote {write_trace(made, args.out, comment)} ({len(made)} requests, {made.duration:.1f}s)",
          file=sys.stderr)


def _finetune(args: argparse.Namespace) -> None:
    options = given(args, FinetuneJob)
    job = FinetuneJob(lora=LoRAConfig(**given(args, LoRAConfig)), **options)
    model = load_model(args.model, seed=job.seed, **given(args, RunnerConfig), **given(args, ParallelConfig))
    if job.dataset is None:  # the default task, at its schedule where no flag says otherwise
        schedule = {k: v for k, v in default_schedule(model.tokenizer).items() if k not in options}
        job = dataclasses.replace(job, **schedule)
    job = dataclasses.replace(job, eval_interval=max(job.total_steps // 4, 1))
    engine = Engine(model, EngineConfig(max_batch=1, max_seq_len=job.seq_len, num_pages=2,
                                        compile_cache_dir=args.compilation_cache, **given(args, ParallelConfig)),
                    warmup=False)
    handle = engine.finetune(job)
    start = handle.progress()
    if handle.done():
        print(f"the job in {job.checkpoint_dir} already finished at step {start.step}/{start.total_steps}: nothing "
              f"to train (another --checkpoint-dir, or more --steps, trains on)", file=sys.stderr)
    elif start.step:
        print(f"resumed from {job.checkpoint_dir} at step {start.step}/{start.total_steps}", file=sys.stderr)
    else:
        loss = handle.evaluate()
        if loss is not None:
            print(f"before training: eval loss {loss:.4f}, {handle.progress().eval_exact_match:.0%} of the eval "
                  f"samples answered exactly", file=sys.stderr)
    every = max(job.total_steps // 20, 1)
    while not handle.done():
        progress = handle.wait(max_steps=every)
        loss = "-" if progress.loss is None else f"{progress.loss:.4f}"  # no step made yet
        scored = "" if progress.eval_exact_match is None else f" ({progress.eval_exact_match:.0%} exact)"
        print(f"step {progress.step}/{progress.total_steps}  loss {loss}  "
              f"eval {progress.eval_loss if progress.eval_loss is None else round(progress.eval_loss, 4)}{scored}  "
              f"{progress.tokens_per_s:,.0f} tokens/s", file=sys.stderr)
        if progress.status.value == "paused":
            raise HarliError(f"the job paused: {progress.reason}")
    if args.out:
        print(f"adapter written to {handle.export_peft(args.out)}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    several = distributed.start(args)  # before JAX computes anything
    sampling = SamplingParams(**given(args, SamplingParams))
    model = load_model(args.model, seed=sampling.seed, **given(args, RunnerConfig), **given(args, ParallelConfig))
    print(f"loaded {model.cfg.name} ({model.params.num_parameters() / 1e6:.1f}M parameters, {model.cfg.dtype}) "
          f"in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if model.tokenizer is None:
        raise HarliError(f"{args.model} has no tokenizer.json and its vocabulary ({model.cfg.vocab_size}) is too "
                         "small for the byte-level tokenizer")
    if not args.prompt:
        raise HarliError("the prompt is empty")  # as the engine says of an empty prompt
    prompt = args.prompt
    if args.chat:
        template = getattr(model.tokenizer, "chat_template", None)
        if template is None:
            raise HarliError(f"--chat: {args.model} has no chat template")
        prompt = template.render([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    prompt_ids = model.tokenizer.encode(prompt)
    # One request: one batch slot, a context just long enough, the whole prompt in one chunk.
    if several and args.adapter:
        raise HarliError("--adapter: a multi-process engine serves the base model only")
    adapter = load_peft(args.adapter, model.cfg)[0] if args.adapter else None
    config = EngineConfig(max_batch=1, max_seq_len=len(prompt_ids) + sampling.max_tokens,
                          prefill_chunk=max(1, min(len(prompt_ids), 512)), max_loras=int(adapter is not None),
                          max_lora_rank=adapter.rank if adapter else 1,
                          lora_targets=adapter.targets if adapter else PROJECTIONS,
                          compile_cache_dir=args.compilation_cache, **given(args, ParallelConfig))
    started = time.perf_counter()
    engine = Engine(model, config)
    if engine.peers is not None and not engine.peers.leader:
        engine.follow()  # process 0 prints
        return
    if args.adapter:
        engine.add_adapter(args.adapter, args.adapter)
    compiled = time.perf_counter()
    try:
        output = engine.generate(prompt_ids, sampling, adapter=args.adapter)[0]
    finally:
        engine.release_followers()
    if output.error:
        raise HarliError(output.error)
    elapsed = time.perf_counter() - compiled
    print(output.text)
    print(f"{len(prompt_ids)} prompt tokens, {len(output.token_ids)} new tokens in {elapsed:.2f}s "
          f"(compiled in {compiled - started:.1f}s); finish: {output.finish_reason.value}; "
          f"ids: {list(output.token_ids)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replay"]:
        return replay_main(argv[1:])
    if argv[:1] == ["serve"]:
        from harli_jax.server.main import main as serve_main  # FastAPI and uvicorn load only for the server

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except HarliError as e:
        print(f"harli: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
