"""The `harli` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import harli_jax
from harli_jax.errors import HarliError
from harli_jax.model import greedy_generate, load_model
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

    gen = commands.add_parser("generate", help="greedy generation from a prompt",
                              description="Greedy generation from a prompt with an HF checkpoint or a YAML model "
                                          "config (random weights).")
    gen.add_argument("--model", required=True, metavar="DIR_OR_YAML",
                     help="HF checkpoint directory, or a model config such as configs/models/tiny.yaml")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=_positive_int, default=32, help="new tokens to generate (default 32)")
    gen.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: the checkpoint's)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the random weights of a YAML config (default 0)")
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
    started = time.perf_counter()
    new_ids = greedy_generate(model.params, model.cfg, prompt_ids, args.max_tokens, model.cfg.eos_token_ids)
    elapsed = time.perf_counter() - started
    print(model.tokenizer.decode(new_ids))
    print(f"{len(prompt_ids)} prompt tokens, {len(new_ids)} new tokens in {elapsed:.2f}s "
          f"(including compilation): {new_ids}", file=sys.stderr)


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
