"""The `harli` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import harli_jax
from harli_jax import Engine, EngineConfig, SamplingParams
from harli_jax.errors import HarliError
from harli_jax.model import load_model
from harli_jax.model.config import DTYPES


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harli", description=harli_jax.__doc__)
    parser.add_argument("--version", action="version", version=f"harli_jax {harli_jax.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate from a prompt",
                              description="Generates from a prompt with an HF checkpoint or a YAML model config "
                                          "(random weights), through the decode engine.")
    gen.add_argument("--model", required=True, metavar="DIR_OR_YAML",
                     help="HF checkpoint directory, or a model config such as configs/models/tiny.yaml")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=_positive_int, default=32, help="new tokens to generate (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
    gen.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the checkpoint's)")
    gen.add_argument("--seed", type=int, default=0,
                     help="seed of the sampler and of the random weights of a YAML config (default 0)")
    gen.set_defaults(run=_generate)
    return parser


def _generate(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, seed=args.seed)
    print(f"loaded {model.cfg.name} ({model.params.num_parameters() / 1e6:.1f}M parameters, {model.cfg.dtype}) "
          f"in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    if model.tokenizer is None:
        raise HarliError(f"{args.model} has no tokenizer.json and its vocabulary ({model.cfg.vocab_size}) is too "
                         "small for the byte-level tokenizer")
    prompt_ids = model.tokenizer.encode(args.prompt)
    # One request: one batch slot, a context just long enough, the whole prompt in one chunk.
    config = EngineConfig(max_batch=1, max_seq_len=len(prompt_ids) + args.max_tokens,
                          prefill_chunk=max(1, min(len(prompt_ids), 512)))
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    started = time.perf_counter()
    engine = Engine(model, config)
    compiled = time.perf_counter()
    output = engine.generate([prompt_ids], sampling)[0]
    if output.error:
        raise HarliError(output.error)
    elapsed = time.perf_counter() - compiled
    print(output.text)
    print(f"{len(prompt_ids)} prompt tokens, {len(output.token_ids)} new tokens in {elapsed:.2f}s "
          f"(compiled in {compiled - started:.1f}s); finish: {output.finish_reason.value}; "
          f"ids: {list(output.token_ids)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except HarliError as e:
        print(f"harli: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
