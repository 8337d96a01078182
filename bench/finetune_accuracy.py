"""Does the default finetune learn its task? Exact-match accuracy on inputs it never trained on.

`--task uppercase` (the default on the tiny model):
Runs what `harli finetune --model configs/models/tiny.yaml` runs (the embedded upper-casing task, 200 steps of
8 x 128 tokens, LoRA rank 8 on q/k/v/o, the CLI's defaults) through the Python API, once per `--seeds` (the
job's seed: its data, shuffling and adapter init), and for each run measures on `--words` held-out words:

- exact-match accuracy of greedy completions (the completion text equals the capitalized word) of the base
  model and of the model with the trained adapter;
- eval loss on the job's eval split before and after training.

Held-out words are drawn with `harli_jax.lora.default_data.held_out` to be disjoint from the job's whole
dataset (training and eval split); the script checks that no word overlaps.

`--task extract` (with `--model smollm2`): what `harli finetune --model smollm2` runs, the generated JSON-extraction
chat task of `harli_jax.lora.extraction` (2,000 records) at its schedule (`extraction.SCHEDULE`, the CLI's default
for a chat model: 30 steps at a 1e-3 peak), scored on held-out sentences: the greedy answer (chat template, up to
40 tokens) must equal the expected JSON exactly. Results go to finetune_accuracy-extract-<device>.json.

    python bench/finetune_accuracy.py                 # seeds 0 1 2, 200 words, writes bench/results
    python bench/finetune_accuracy.py --task extract --model smollm2 --words 100
    python bench/finetune_accuracy.py --quick --out /tmp/acc
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path

from harli_jax import Engine, EngineConfig, FinetuneJob, LoRAConfig, SamplingParams, cli
from harli_jax.lora import extraction
from harli_jax.lora.default_data import default_dataset, held_out
from harli_jax.model import load_model

REPO = Path(__file__).resolve().parent.parent
EXTRACT_TOKENS = 40  # room for the JSON answer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "configs/models/tiny.yaml"),
                        help="YAML model config, or (--task extract) a named or checkpoint model such as smollm2")
    parser.add_argument("--task", choices=("uppercase", "extract"), default="uppercase")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="job seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default the CLI's: 200, or the "
                                                                "extraction task's 30)")
    parser.add_argument("--words", type=int, default=None, help="held-out words scored (default 200)")
    parser.add_argument("--quick", action="store_true", help="one seed, 20 steps, 20 words: a smoke run")
    parser.add_argument("--out", default=None, help="directory for the JSON (default bench/results)")
    args = parser.parse_args()
    steps = extraction.SCHEDULE["total_steps"] if args.task == "extract" else 200
    defaults = dict(seeds=[0], steps=20, words=20) if args.quick else dict(seeds=[0, 1, 2], steps=steps, words=200)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and args.out is None:
        parser.error("--quick needs --out (a smoke run never writes into bench/results)")
    return args


def accuracy(engine: Engine, samples: list[dict], max_tokens: int, adapter: str | None = None) -> dict:
    """Exact match of greedy completions: `samples` hold a prompt (text, or token ids) and its completion."""
    outputs = engine.generate([s["prompt"] for s in samples], SamplingParams(max_tokens=max_tokens),
                              adapter=adapter)
    hits = [o.text.strip() == s["completion"] for o, s in zip(outputs, samples, strict=True)]
    return {"exact_match": sum(hits) / len(hits), "correct": sum(hits), "scored": len(hits),
            "examples": [{"prompt": s.get("text", s["prompt"]), "expected": s["completion"], "got": o.text}
                         for o, s in list(zip(outputs, samples, strict=True))[:5]]}


def extraction_samples(engine: Engine, records: list[dict]) -> list[dict]:
    """Held-out chat records as prompts (the user turn in the model's chat template) and expected answers."""
    tokenizer = engine.tokenizer
    out = []
    for r in records:
        text = tokenizer.chat_template.render(r["messages"][:1], add_generation_prompt=True)
        out.append({"prompt": tokenizer.encode(text), "text": r["messages"][0]["content"],
                    "completion": r["messages"][1]["content"]})
    return out


def run_extract(args, seed: int) -> dict:
    """`harli finetune --model M --seed s --out DIR --compilation-cache off` as a user runs it (its defaults for a
    chat model: the extraction task at `extraction.SCHEDULE`), timed from the command's start to the adapter on
    disk; then greedy answers to held-out sentences from the base model and with the exported adapter."""
    adapter = Path(tempfile.mkdtemp(prefix="harli-extract-")) / "adapter"
    argv = ["finetune", "--model", args.model, "--seed", str(seed), "--out", str(adapter),
            "--compilation-cache", "off"]
    if args.steps != extraction.SCHEDULE["total_steps"]:
        argv += ["--steps", str(args.steps)]
    started = time.perf_counter()
    if cli.main(argv) != 0:
        raise RuntimeError(f"harli {' '.join(argv)} failed")
    command_s = time.perf_counter() - started
    engine = Engine(load_model(args.model), EngineConfig(max_batch=8, max_seq_len=256, max_loras=1,
                                                         max_lora_rank=LoRAConfig().rank))
    engine.add_adapter("tuned", adapter)
    dataset = extraction.extraction_dataset(seed=seed)  # what the job trained and evaluated on
    records = extraction.held_out(dataset, args.words, seed=1000 + seed)
    overlap = {r["messages"][0]["content"] for r in records} & {r["messages"][0]["content"] for r in dataset}
    if overlap:
        raise RuntimeError(f"held-out inputs overlap the training data: {sorted(overlap)[:5]}")
    samples = extraction_samples(engine, records)
    base = accuracy(engine, samples, EXTRACT_TOKENS)
    tuned = accuracy(engine, samples, EXTRACT_TOKENS, adapter="tuned")
    shutil.rmtree(adapter.parent, ignore_errors=True)
    common.say(f"seed {seed}: exact match {base['exact_match']:.1%} -> {tuned['exact_match']:.1%} on "
               f"{len(samples)} held-out sentences; harli {' '.join(argv[:-4])} took {command_s:.0f} s")
    return {"seed": seed, "command": "harli " + " ".join(argv), "command_s": command_s, "base": base,
            "tuned": tuned}


def run_uppercase(args, seed: int) -> dict:
    # The CLI's engine and job (harli_jax/cli.py _finetune) with its default flags.
    engine = Engine.from_config(args.model, EngineConfig(max_batch=8, max_seq_len=128, num_pages=64,
                                                         max_loras=1, max_lora_rank=LoRAConfig().rank),
                                seed=seed)
    job = FinetuneJob(lora=LoRAConfig(), learning_rate=3e-3, micro_batch_rows=8, seq_len=128,
                      total_steps=args.steps, seed=seed, eval_interval=max(args.steps // 4, 1))
    dataset = default_dataset(seed=seed)  # what the job trains and evaluates on (dataset=None)
    words = held_out(dataset, args.words, seed=1000 + seed)
    overlap = {w["prompt"] for w in words} & {r["prompt"] for r in dataset}
    if overlap:
        raise RuntimeError(f"held-out inputs overlap the training data: {sorted(overlap)[:5]}")
    handle = engine.finetune(job)
    eval_before = handle.evaluate()
    base = accuracy(engine, words, 8)  # room for a word
    started = time.perf_counter()
    progress = handle.wait()
    train_s = time.perf_counter() - started
    engine.add_adapter("tuned", handle)
    tuned = accuracy(engine, words, 8, adapter="tuned")
    row = {"seed": seed, "steps": progress.step, "trained_tokens": progress.tokens, "train_s": train_s,
           "eval_loss_before": eval_before, "eval_loss_after": progress.eval_loss,
           "final_train_loss": progress.loss, "base": base, "tuned": tuned}
    common.say(f"seed {seed}: exact match {base['exact_match']:.1%} -> {tuned['exact_match']:.1%} on "
               f"{len(words)} held-out inputs; eval loss {eval_before:.3f} -> {progress.eval_loss:.3f} "
               f"({progress.step} steps in {train_s:.0f} s)")
    return row


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.out:
        common.RESULTS_DIR = Path(args.out)
    runs = []
    with common.LoadMeter() as load:
        for seed in args.seeds:
            runs.append((run_extract if args.task == "extract" else run_uppercase)(args, seed))
    tuned = [r["tuned"]["exact_match"] for r in runs]
    payload = {
        "config": {"model": str(Path(args.model).resolve().relative_to(REPO)) if REPO in Path(args.model).resolve()
                   .parents else args.model, "task": args.task,
                   "seeds": args.seeds, "steps": args.steps, "held_out_words": args.words,
                   "job": "the CLI's defaults: LoRA rank 8, alpha 16, q/k/v/o; AdamW 3e-3, 10 warmup steps, "
                          "cosine; 8 x 128-token micro-batches; embedded dataset of 2000 words, 5% eval split",
                   "held_out": "harli_jax.lora.default_data.held_out(default_dataset(seed=s), words, seed=1000+s): "
                               "no word of the job's training or eval data"},
        "runs": runs,
        "summary": {"tuned_exact_match_min": min(tuned), "tuned_exact_match_max": max(tuned),
                    "base_exact_match_max": max(r["base"]["exact_match"] for r in runs)},
        "load": load.record,
    }
    if args.task == "extract":
        payload["config"]["job"] = (f"harli finetune --model {args.model}'s defaults for a chat model: the "
                                    "extraction task (harli_jax.lora.extraction's 2,000 records, 5% eval split) at "
                                    f"extraction.SCHEDULE {extraction.SCHEDULE}; LoRA rank 8, alpha 16, q/k/v/o; "
                                    "AdamW, 10 warmup steps, cosine; 8 x 128-token micro-batches; no compilation "
                                    "cache ('command_s': the command's wall time, compiles included)")
        payload["config"]["held_out"] = ("harli_jax.lora.extraction.held_out(dataset, n, seed=1000+s): no sentence "
                                         "of the job's training or eval data; greedy, chat template, up to "
                                         f"{EXTRACT_TOKENS} tokens, the answer must equal the expected JSON")
    path = common.write_result("finetune_accuracy" + ("-extract" if args.task == "extract" else ""), payload)
    common.say(f"wrote {path}")


if __name__ == "__main__":
    main()
