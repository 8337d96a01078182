"""Runs engines at several tensor-parallel degrees on emulated CPU devices and prints what they did as JSON (one
line): greedy tokens, per-device bytes, micro-step gradients, checkpoint resumes. Started by
test_tensor_parallel.py in a subprocess, because the device count is fixed before JAX is imported.

usage: tp_worker.py DEVICES CHECK [ARGS...]
  tokens CKPT_DIR DEGREES SCRATCH  greedy tokens (a prefill + decode batch) of the base model and of a served
                                   adapter, and per-device bytes per degree
  grads MODEL_YAML DEGREES         the LoRA gradient of one micro-batch through the micro-steps per degree
  resume MODEL_YAML RUN...         each RUN `CKPT_DIR,TP,N` trains N steps at TP with checkpoints in CKPT_DIR
                                   (resuming what is there), then exports the adapter (HF PEFT) to CKPT_DIR-peft
  fused MODEL_YAML DEGREES          a micro-batch in token chunks (or layer windows) fused into decode steps, then
                                   backward slices (tests/lora/test_fused.py's run) per degree: losses, gradients,
                                   served tokens
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={sys.argv[1]}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from harli_jax import Engine, EngineConfig, FinetuneJob, LoRAConfig, SamplingParams  # noqa: E402
from harli_jax.lora.adapters import export_peft, init_lora  # noqa: E402
from harli_jax.model import load_model  # noqa: E402
from harli_jax.model.params import PROJECTIONS, LoRAPair  # noqa: E402
from harli_jax.model.sharding import device_bytes  # noqa: E402

PROMPTS = [[1, 5, 7, 9, 11, 13, 17, 19, 23], [2, 4, 6], [3, 8, 15, 16]]
SMALL = dict(max_batch=4, max_seq_len=64, prefill_chunk=16, num_pages=24, page_tokens=8, batch_buckets=(4,),
             page_buckets=(8,))
JOB = dict(eval_interval=0, micro_batch_rows=2, seq_len=32, seed=3,
           lora=LoRAConfig(rank=4, alpha=8.0, targets=PROJECTIONS))


def engine(model, tp: int, **extra) -> Engine:
    return Engine(model, EngineConfig(**SMALL, tensor_parallel=tp, **extra), warmup=False)


def greedy(e: Engine, adapter: str | None = None) -> list[list[int]]:
    outputs = e.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.0), adapter=adapter)
    return [list(o.token_ids) for o in outputs]


def random_adapter(cfg, directory: Path) -> Path:
    """A PEFT adapter on every projection with random A and B (so that it changes the tokens)."""
    lora = LoRAConfig(rank=4, alpha=8.0, targets=PROJECTIONS)
    rng = np.random.default_rng(5)
    adapters = {name: LoRAPair(p.a, rng.normal(0, 0.5, p.b.shape).astype(np.float32), p.scale)
                for name, p in init_lora(cfg, lora, seed=5).items()}
    return export_peft(adapters, lora, cfg, directory)


def placement(e: Engine) -> dict:
    """Bytes on one device and in all, of the arena and of the weights (split and whole)."""
    leaves = jax.tree.leaves(e.runner.params)
    split = [x for x in leaves if not x.sharding.is_fully_replicated]
    return {"arena": [device_bytes(e.arena.buffer), e.arena.buffer.nbytes],
            "split_weights": [sum(map(device_bytes, split)), sum(x.nbytes for x in split)],
            "all_weights": [sum(map(device_bytes, leaves)), sum(x.nbytes for x in leaves)],
            "whole": [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(e.runner.params)
                      if x.sharding.is_fully_replicated],
            "arena_after_steps_split": not e.arena.buffer.sharding.is_fully_replicated}


def tokens(path: str, degrees: str, scratch: str) -> dict:
    """Greedy tokens of the base model and of a served adapter (a resident slot), the bytes per device, and
    whether the loader placed every weight where the engine keeps it (the engine took them as they were)."""
    adapter = None
    out = {}
    for tp in map(int, degrees.split(",")):
        model = load_model(path, tensor_parallel=tp)
        adapter = adapter or random_adapter(model.cfg, Path(scratch) / "adapter")
        e = engine(model, tp, max_loras=1, max_lora_rank=4)
        e.add_adapter("random", adapter)
        in_place = all(a is b for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(e.runner.params),
                                              strict=True))
        out[tp] = {"tokens": greedy(e), "adapter_tokens": greedy(e, "random"), "loaded_in_place": in_place,
                   **placement(e)}
    return out


def grads(path: str, degrees: str) -> dict:
    """One micro-batch through the micro-steps (a layer each), its gradient read from the accumulator before the
    optimizer step (grad_accum 2). Every B starts random (the same at every degree, on the B's devices), so that
    no gradient is zero. The weights are made on each degree's mesh (the same values)."""
    out = {}
    for tp in map(int, degrees.split(",")):
        e = engine(load_model(path, tensor_parallel=tp), tp)
        handle = e.finetune(FinetuneJob(total_steps=1, grad_accum=2, name=f"grads-{tp}", **JOB))
        runner = handle._runner
        rng = np.random.default_rng(0)
        lora = {name: LoRAPair(p.a, jax.device_put(rng.normal(0, 0.1, p.b.shape).astype(p.b.dtype), p.b.sharding),
                               p.scale) for name, p in sorted(runner.state.lora.items())}
        runner.state = dataclasses.replace(runner.state, lora=lora)
        micro = runner.micro
        assert micro.start()
        while micro.current is not None:
            micro.run(1)
        state = handle._runner.state
        out[tp] = {name: [np.asarray(p.a).tolist(), np.asarray(p.b).tolist(),
                          [_split_axes(x) for x in (state.lora[name].a, state.lora[name].b)]]
                   for name, p in sorted(state.accum.items())}
        out[tp]["arena split axes"] = _split_axes(e.arena.buffer)  # still by KV heads after the micro-steps
    return out


def _split_axes(x: jax.Array) -> list[int]:
    """The axes of `x` that its devices split."""
    return [axis for axis, (full, part) in enumerate(zip(x.shape, x.addressable_shards[0].data.shape,
                                                         strict=True)) if part < full]


def resume(path: str, *runs: str) -> list[dict]:
    """Each run `DIR,TP,STEPS` in turn, in this one process, from weights loaded once at degree 2 (an engine of
    another degree places them on its own mesh, or gathers them onto one device)."""
    model = load_model(path, tensor_parallel=2)
    return [_resume(model, *run.split(",")) for run in runs]


def _resume(model, directory: str, tp: str, steps: str) -> dict:
    e = engine(model, int(tp))
    handle = e.finetune(FinetuneJob(total_steps=4, checkpoint_dir=directory, checkpoint_interval=1, **JOB))
    start = handle.progress().step
    handle.wait(max_steps=int(steps))
    handle.stop()
    exported = handle.export_peft(f"{directory}-peft")
    return {"start": start, "step": handle.progress().step, "losses": [h["loss"] for h in handle.history],
            "peft": str(exported), "weight_devices": len(jax.tree.leaves(e.runner.params)[0].sharding.device_set)}


def fused(path: str, degrees: str) -> dict:
    sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parents[1] / "lora")]
    from test_fused import _fused_micro_batch, _lora

    from conftest import resident_slots, train_batch
    from harli_jax.model import ModelConfig, init_params
    from harli_jax.model.sharding import shard_adapters, shard_params, shard_slots, tp_mesh

    cfg = ModelConfig.from_yaml(path).replace(num_layers=4)
    params, lora = init_params(cfg, seed=1, init_std=0.1), _lora(cfg, 2)
    serving, batch = resident_slots(cfg, [_lora(cfg, 7), _lora(cfg, 11)]), train_batch(cfg.vocab_size)
    out = {}
    for tp in map(int, degrees.split(",")):
        mesh = tp_mesh(cfg, tp)
        for shape, sizes in (("tokens", dict(chunk=8)), ("window", dict(chunk=None, window=1))):
            total, count, grads, served = _fused_micro_batch(
                cfg, shard_params(cfg, params, mesh), shard_adapters(lora, mesh), shard_slots(serving, mesh), batch,
                layers=2, with_inference=True, mesh=mesh, **sizes)
            out[f"{shape}:{tp}"] = {
                "loss": float(total), "tokens": float(count),
                "grads": {k: [np.asarray(p.a).tolist(), np.asarray(p.b).tolist()] for k, p in sorted(grads.items())},
                "served": [[np.asarray(f).tolist(), np.asarray(a).tolist()] for f, a in served]}
    return out


if __name__ == "__main__":
    check, args = sys.argv[2], sys.argv[3:]
    print(json.dumps({"tokens": tokens, "grads": grads, "resume": resume, "fused": fused}[check](*args)))
