"""No program copies the arena: every compiled program that takes it (the step programs of every bucket, the fused
steps, the micro-steps, the page copies) updates it in place. A read of the arena and an in-place write of it in no
data order make XLA copy the whole buffer first (JAX_NOTES.md), so the optimized HLO of each program is searched
for a copy of the arena's shape, and its scratch memory must stay far below the arena's size."""

import re

import jax
import jax.numpy as jnp
import pytest

from harli_jax import Engine, EngineConfig, FinetuneJob, LoRAConfig
from harli_jax.lora.fused import token_stash_pages
from harli_jax.lora.trainer import TrainBatch
from harli_jax.model import load_model
from harli_jax.runtime import microbatch
from harli_jax.runtime.colocation import Sizes

ROWS, SEQ_LEN = 2, 32


def arena_copies(compiled, shape: tuple[int, ...]) -> list[str]:
    """The instructions of `compiled`'s optimized HLO that copy a buffer of the arena's `shape`."""
    dims = re.escape(",".join(map(str, shape)))
    copy = re.compile(rf"= \w+\[{dims}\](\{{[^}}]*\}})? copy(-start)?\(")
    return [line.strip() for line in compiled.as_text().splitlines() if copy.search(line)]


@pytest.fixture(scope="module")
def engine(tiny_yaml, tmp_path_factory):
    """A tiny engine whose arena (1,024 pages, 4 MiB) dwarfs every program's scratch, with a job that fuses token
    chunks and backward slices into its decode steps (cobatch runs its forwards in token chunks)."""
    config = EngineConfig(max_batch=4, batch_buckets=(1, 4), max_seq_len=128, page_buckets=(2, 8), prefill_chunk=16,
                          num_pages=1024, policy="cobatch", fused_tokens=(8,), fused_layers=(1, 2),
                          calibration_dir=str(tmp_path_factory.mktemp("calibration")), compile_threads=2)
    engine = Engine(load_model(tiny_yaml), config)
    engine.finetune(FinetuneJob(total_steps=10, eval_interval=0, micro_batch_rows=ROWS, seq_len=SEQ_LEN,
                                lora=LoRAConfig(rank=4, alpha=8)))
    return engine


def _check(name: str, compiled, arena: jax.Array) -> None:
    copies = arena_copies(compiled, arena.shape)
    assert not copies, f"{name} copies the arena: {copies}"
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < arena.nbytes / 8, f"{name}: {temp} bytes of scratch against a {arena.nbytes}-byte arena"


def test_step_programs_of_every_bucket_update_the_arena_in_place(engine):
    runner = engine.runner
    assert {b.decode_only for b in runner.buckets} == {True, False}
    for bucket in runner.buckets:
        _check(f"step {bucket}", runner.program(bucket), runner.arena.buffer)
    for pages in runner.page_buckets:
        _, read, write = runner.page_copy(pages)
        _check(f"page read {pages}", read, runner.arena.buffer)
        _check(f"page write {pages}", write, runner.arena.buffer)
        assert write.memory_analysis().alias_size_in_bytes >= runner.arena.buffer.nbytes  # donated, written in place


def test_fused_step_programs_update_the_arena_in_place(engine):
    """cobatch's shapes, and harli's forward windows (compiled here for the same job)."""
    runner, sizes, micro = engine.runner, engine.colocation.sizes, engine.colocation.job.micro
    shapes = [("tokens", n) for n in sizes.fused_tokens] + [("backward", n) for n in sizes.fused_layers]
    assert shapes == [("tokens", 8), ("backward", 1), ("backward", 2)]
    windows = [("forward", 1), ("forward", 2)]
    runner.prepare_fused({shape: micro.fused_examples(*shape) for shape in windows})
    shapes += windows
    decode = [b for b in runner.buckets if b.decode_only]
    fusable = {b for b in decode if runner.can_fuse(b, "backward", 1)}
    assert fusable == {b for b in decode if b.pages == 8}  # the largest page bucket only, every batch bucket
    for bucket in fusable:
        for kind, size in shapes:
            program = runner.fused_program(bucket, kind, size)
            _check(f"fused {kind}:{size} in {bucket}", program, runner.arena.buffer)
            assert program.memory_analysis().alias_size_in_bytes >= runner.arena.buffer.nbytes


def test_micro_step_programs_update_the_arena_in_place(engine):
    job, arena = engine.colocation.job, engine.arena
    layout, cfg = arena.layout, engine.cfg
    spec = jax.ShapeDtypeStruct
    batch = TrainBatch(*(spec((ROWS, SEQ_LEN), dtype) for dtype in (jnp.int32, jnp.int32, jnp.float32, jnp.int32,
                                                                    jnp.int32)))
    hidden = spec((ROWS, SEQ_LEN, cfg.hidden_size), jnp.dtype(cfg.dtype))
    pages = spec((token_stash_pages(layout, ROWS * SEQ_LEN),), jnp.int32)
    lora, start = job.state.lora, spec((), jnp.int32)
    totals = (spec((), jnp.float32), spec((), jnp.float32))
    sizes: Sizes = engine.colocation.sizes
    for n in sizes.layers:
        layers = job.params.layers[:n]
        programs = {
            f"forward chunk of {n}": microbatch._forward_chunk.lower(layers, layout, lora, arena.buffer, hidden, batch,
                                                                     pages, start),
            f"backward chunk of {n}": microbatch._backward_chunk.lower(layers, layout, lora, arena.buffer, hidden,
                                                                       lora, batch, pages, start)}
        for name, lowered in programs.items():
            _check(name, lowered.compile(), arena.buffer)
    for n in sizes.tokens:
        lowered = microbatch._forward_tokens.lower(job.params, layout, lora, arena.buffer, batch, pages, start, totals,
                                                   chunk=n)
        _check(f"token chunk of {n}", lowered.compile(), arena.buffer)
    lowered = microbatch._loss_gradient.lower(layout, arena.buffer, pages, (ROWS, SEQ_LEN, cfg.hidden_size))
    _check("loss gradient read", lowered.compile(), arena.buffer)
