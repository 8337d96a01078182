"""Standalone LoRA finetune throughput: the single-program step against the training micro-steps.

Modes, all on the same engine weights and arena, the same LoRA (rank 8 on q/k/v/o by default) and the same
micro-batch of `--rows x --seq-len` tokens (synthetic `{"text"}` records of exactly `--seq-len` tokens, so
every row is full and has `seq_len - 1` trained tokens), each its own `FinetuneRunner` (the public trainer
`Engine.finetune` builds) driven through its public methods:

- `single`: `train_microbatch()` with `remat=False` (every activation kept for backward): the DEFAULT program
  and the headline reference of every ratio;
- `single-remat`: the same with `remat=True` (each layer recomputed in backward from its input): the secondary
  reference;
- `micro-K`: `micro.start()` then `micro.run(K)` until done, for K in `--chunks`
  (default 1, 4 and all layers): forward chunks stashing each layer's input into leased arena pages, the loss,
  backward chunks recomputing each layer from its stash with `jax.vjp`, the commit.

`--grad-accum` is 1 by default, so each micro-batch also pays the Optax update (the same for every mode; its
program time alone is reported in the profile). After one untimed warm-up micro-batch per mode, the modes run
through `common.interleave`: `--iters` rounds, one micro-batch per mode per round in a seeded random order,
each attempt with the machine's load; an attempt during which other processes took more than
`--max-other-share` of the CPUs is repeated (`--max-retries`), then marked invalid. A mode's time is the median
over its valid attempts (trained tokens/s: loss tokens; packed tokens/s: all non-padding tokens); a ratio is
computed only when both modes have a valid attempt.

Then two diagnostic sections, not part of the comparison (their load is recorded, they are not repeated):
the micro-step path once more with a block after every micro-step (time per kind: start = lease + packing +
embed, forward, forward+loss, backward, backward+commit), and (unless --no-profile) a profile of the jitted
programs alone on fixed inputs, which reaches into private trainer/runner internals (median of `--profile-reps`
calls, each blocked): the forward chunk with and without its stash write, the stash write and read alone (also on a
4x larger arena, to see whether the scatter copies the arena), the backward chunk with and without its stash gather,
one layer alone, the forward of all layers, the loss, commit, update, the single-program step with and without
remat, and an empty jitted call (dispatch cost); programs are timed round-robin. Model flops come from XLA's
estimate of one layer's forward and vjp (its estimate of a program with a loop counts the body once).

Every timing also records the process's minor page faults (on a CPU, XLA allocates a program's temporaries
on each call and glibc serves large blocks from fresh, zero-filled mmap pages, so a program pays about one
fault per 4 KiB of temporaries per call: many small programs pay it many times) and the cores it used (CPU
time over wall time). `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:
glibc.malloc.trim_threshold=4000000000` keeps freed memory for reuse and removes the faults.

Writes bench/results/finetune-<device>.json (GLIBC_TUNABLES / LD_PRELOAD / XLA_FLAGS when set), or into --out.

    python bench/finetune.py                          # small.yaml, 4 x 256 tokens, chunks 1 4 8, 5 rounds
    python bench/finetune.py --rows 8 --seq-len 128 --iters 7
    python bench/finetune.py --quick --out /tmp/bench # smoke run: tiny.yaml, 2 x 32 tokens, 2 rounds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import resource
import statistics
import string
import time
from pathlib import Path

import common  # bench/common.py: the script's directory is on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from harli_jax.lora import data as data_lib
from harli_jax.lora import trainer
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.config import ModelConfig
from harli_jax.model.layers import rope_tables
from harli_jax.model.paged import ArenaLayout
from harli_jax.model.params import layer_adapters
from harli_jax.model.transformer import causal_mask, decoder_layer
from harli_jax.runtime import Engine, EngineConfig
from harli_jax.runtime import job as ft
from harli_jax.runtime import microbatch as mb
from harli_jax.runtime.arena import Arena
from harli_jax.runtime.finetune import FinetuneJob
from harli_jax.runtime.job import FinetuneRunner

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="model YAML (default configs/models/small.yaml)")
    parser.add_argument("--rows", type=int, default=None, help="micro-batch rows (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 256)")
    parser.add_argument("--chunks", type=int, nargs="+", default=None,
                        help="layers per chunk of the micro-step path (default 1 4 and all layers)")
    parser.add_argument("--iters", type=int, default=None,
                        help="interleaved rounds: timed micro-batches per mode (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed micro-batches per mode (compiles)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--seed", type=int, default=0, help="the order of the modes per round")
    parser.add_argument("--breakdown-iters", type=int, default=None,
                        help="micro-batches per chunk size, blocked per step (default 2; 1 with --quick)")
    parser.add_argument("--profile-reps", type=int, default=None,
                        help="timed calls per program in the profile (default 3; 2 with --quick)")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-program profile")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny.yaml, 2 x 32 tokens, 2 rounds")
    common.add_arguments(parser)
    args = parser.parse_args()
    quick = args.quick
    defaults = dict(config="configs/models/tiny.yaml" if quick else "configs/models/small.yaml",
                    rows=2 if quick else 4, seq_len=32 if quick else 256, iters=2 if quick else 5,
                    breakdown_iters=1 if quick else 2, profile_reps=2 if quick else 3)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    return args


def synthetic_records(tokenizer, seq_len: int, n: int = 64, seed: int = 0) -> list[dict]:
    """`n` `{"text"}` records that encode to exactly `seq_len` tokens (BOS/EOS included), so rows are full."""
    overhead = len(data_lib.encode_record({"text": "x"}, tokenizer)) - 1  # BOS, EOS
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase + " "))
    records = []
    for _ in range(n):
        records.append({"text": "".join(rng.choice(letters, seq_len - overhead))})
    got = len(data_lib.encode_record(records[0], tokenizer))
    if got != seq_len:
        raise RuntimeError(f"synthetic record encodes to {got} tokens, wanted {seq_len} (not a byte tokenizer?)")
    return records


def block(*xs) -> None:
    jax.block_until_ready([x for x in xs if x is not None])


def minor_faults() -> int:
    """Page faults of this process so far that needed no I/O: on a CPU mostly fresh memory being touched (XLA
    allocates each program's temporaries per call; large blocks come straight from mmap and are zero-filled)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cores_used(cpu_seconds: float, wall_seconds: float) -> float:
    """CPU time of all this process's threads over wall time: about the core count when nothing else runs, less
    when other processes take cores (then the timing is not representative)."""
    return cpu_seconds / wall_seconds


# Modes ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Mode:
    name: str
    runner: FinetuneRunner
    chunk: int | None  # layers per chunk on the micro-step path; None: the single program
    arena: Arena  # the engine's arena, which the micro-steps run over

    def run_microbatch(self) -> dict:
        """One micro-batch (and the update when grad_accum is reached), blocked: seconds, trained tokens,
        minor page faults, cores used."""
        r = self.runner
        before = r.progress().tokens
        faults, cpu = minor_faults(), time.process_time()
        started = time.perf_counter()
        if self.chunk is None:
            r.train_microbatch()
        else:
            if not r.micro.start():
                raise RuntimeError(f"{self.name}: no stash lease granted (arena too small?)")
            while r.micro.current is not None:
                r.micro.run(self.chunk)
        block(r.state, self.arena.buffer)
        wall = time.perf_counter() - started
        return {"seconds": wall, "trained_tokens": r.progress().tokens - before,
                "minor_faults": minor_faults() - faults, "cores_used": cores_used(time.process_time() - cpu, wall)}


def make_runner(engine: Engine, args, records, name: str, remat: bool) -> FinetuneRunner:
    """The trainer `Engine.finetune` builds, through its public constructor over the engine's public weights,
    tokenizer and arena, without registering it, so that several jobs can be timed side by
    side (only one micro-batch is ever in flight, so one stash's worth of pages is enough)."""
    job = FinetuneJob(dataset=records, lora=LoRAConfig(rank=args.rank, alpha=2.0 * args.rank,
                                                       targets=tuple(args.targets)),
                      micro_batch_rows=args.rows, seq_len=args.seq_len, grad_accum=args.grad_accum,
                      total_steps=10**9, eval_interval=0, eval_fraction=0.0, warmup_steps=1, remat=remat,
                      learning_rate=1e-4, name=name)
    return FinetuneRunner(job, engine.cfg, engine.runner.params, engine.tokenizer, engine.arena)


def breakdown(mode: Mode, iters: int) -> dict:
    """Per micro-step kind, seconds (median over the kind's calls), with a block after each micro-step."""
    r = mode.runner
    per_kind: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}
    totals = []
    for _ in range(iters):
        t_mb = time.perf_counter()
        f, t = minor_faults(), time.perf_counter()
        if not r.micro.start():
            raise RuntimeError("no stash lease granted")
        block(r.micro.current.x)
        per_kind.setdefault("start", []).append(time.perf_counter() - t)
        faults.setdefault("start", []).append(minor_faults() - f)
        while r.micro.current is not None:
            f, t = minor_faults(), time.perf_counter()
            kind = r.micro.run(mode.chunk).kind
            block(mode.arena.buffer, r.state, r.micro.current.x if r.micro.current is not None else None)
            per_kind.setdefault(kind, []).append(time.perf_counter() - t)
            faults.setdefault(kind, []).append(minor_faults() - f)
        totals.append(time.perf_counter() - t_mb)
    out = {kind: {"calls_per_microbatch": len(ts) // iters, "seconds_median": statistics.median(ts),
                  "seconds_per_microbatch": statistics.median(ts) * len(ts) / iters,
                  "minor_faults_median": statistics.median(faults[kind])}
           for kind, ts in per_kind.items()}
    return {"kinds": out, "microbatch_seconds_median": statistics.median(totals)}


# Diagnostic: the programs alone, through private trainer/runner internals (not the comparison) -------------


def _fwd_nostash(layers, cfg, lora, x, batch, start):
    """forward_chunk without the stash write: the same layers, dynamic layer index of the adapters."""
    mask, rope = causal_mask(batch.segment_ids), rope_tables(cfg, batch.positions)
    for i, lp in enumerate(layers):
        x = decoder_layer(lp, cfg, x, rope, mask, layer_adapters(lora, start + i))
    return x


def _stash_write(layout, arena, x, stash_pages, start, num_layers):
    """forward_chunk's stash scatter alone."""
    tokens = x.shape[0] * x.shape[1]

    def body(i, arena):
        pages, slots = trainer.stash_index(layout, stash_pages, start + i, jnp.arange(tokens), tokens)
        rows = layout.stash_rows(arena)
        return rows.at[pages, slots].set(x.reshape(-1, layout.stash_row)).reshape(arena.shape)

    return jax.lax.fori_loop(0, num_layers, body, arena)


def _stash_read(layout, arena, g, stash_pages, end, num_layers):
    """backward_chunk's stash gather alone (summed so that nothing is dead)."""
    arena_rows = layout.stash_rows(arena)
    tokens = g.shape[0] * g.shape[1]

    def body(i, acc):
        pages, slots = trainer.stash_index(layout, stash_pages, end - 1 - i, jnp.arange(tokens), tokens)
        return acc + arena_rows[pages, slots].reshape(g.shape)

    return jax.lax.fori_loop(0, num_layers, body, jnp.zeros_like(g))


def _bwd_nogather(layers, cfg, lora, x_in, g, grads, batch, end):
    """backward_chunk with every layer's input taken from `x_in` instead of the stash."""
    mask, rope = causal_mask(batch.segment_ids), rope_tables(cfg, batch.positions)
    for i, lp in enumerate(reversed(layers)):
        layer = end - 1 - i

        def layer_fn(x, adapters, lp=lp):
            return decoder_layer(lp, cfg, x, rope, mask, adapters)

        _, vjp = jax.vjp(layer_fn, x_in, layer_adapters(lora, layer))
        g, g_lora = vjp(g)
        grads = jax.tree.map(lambda acc, d, layer=layer: jax.lax.dynamic_update_index_in_dim(
            acc, jax.lax.dynamic_index_in_dim(acc, layer, keepdims=False) + d, layer, 0), grads, g_lora)
    return g, grads


def _layer_static(lp, cfg, lora_l, x, batch):
    return decoder_layer(lp, cfg, x, rope_tables(cfg, batch.positions), causal_mask(batch.segment_ids), lora_l)


def _layer_vjp_static(lp, cfg, lora_l, x, g, batch):
    mask = causal_mask(batch.segment_ids)
    rope = rope_tables(cfg, batch.positions)
    _, vjp = jax.vjp(lambda x, a: decoder_layer(lp, cfg, x, rope, mask, a), x, lora_l)
    return vjp(g)


def _layers_forward(params, cfg, lora, x, batch):
    mask, rope = causal_mask(batch.segment_ids), rope_tables(cfg, batch.positions)
    for index, lp in enumerate(params.layers):
        x = decoder_layer(lp, cfg, x, rope, mask, layer_adapters(lora, index))
    return x


def _flops(jitted, *args, **kwargs) -> float:
    """XLA's flop estimate of a program without loops (it counts a loop body once, whatever the trip count)."""
    cost = jitted.lower(*args, **kwargs).cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost["flops"])


class Programs:
    """Programs timed round-robin (one call of each per round, each blocked), so that load from other processes
    falls on all of them alike; the median per program is kept."""

    def __init__(self):
        self.entries: list[tuple[str, object, float | None]] = []

    def add(self, label: str, call, flops: float | None = None) -> None:
        self.entries.append((label, call, flops))

    def run(self, reps: int) -> dict:
        first = {}
        for label, call, _ in self.entries:  # compile and warm up
            t = time.perf_counter()
            block(call())
            first[label] = time.perf_counter() - t
            block(call())
        times: dict[str, list[float]] = {label: [] for label, _, _ in self.entries}
        faults: dict[str, list[int]] = {label: [] for label, _, _ in self.entries}
        cores: dict[str, list[float]] = {label: [] for label, _, _ in self.entries}
        for _ in range(reps):
            for label, call, _ in self.entries:
                f, c, t = minor_faults(), time.process_time(), time.perf_counter()
                block(call())
                times[label].append(time.perf_counter() - t)
                faults[label].append(minor_faults() - f)
                cores[label].append(cores_used(time.process_time() - c, times[label][-1]))
        res = {}
        for label, _, flops in self.entries:
            med = statistics.median(times[label])
            res[label] = {"seconds_median": med, "seconds_min": min(times[label]), "seconds_all": times[label],
                          "first_call_seconds": first[label], "minor_faults_median": statistics.median(faults[label]),
                          "cores_used_median": statistics.median(cores[label])}
            extra = f"  {statistics.median(faults[label]):8.0f} faults  {statistics.median(cores[label]):4.2f} cores"
            if flops:
                res[label].update(model_flops=flops, gflop_per_s=flops / med / 1e9)
                extra += f"  {flops / med / 1e9:6.1f} GFLOP/s"
            print(f"  {label:<36} {med * 1e3:10.2f} ms{extra}", flush=True)
        return res


def profile(engine: Engine, runner: FinetuneRunner, chunks: list[int], reps: int) -> dict:
    """The jitted programs alone on fixed inputs (see the module docstring). Flops: XLA's estimate of one layer's
    forward (F) and vjp (V, which includes the recompute) with static weights, and of the loss, times the layers
    each program runs: forward chunk k = k F, backward chunk k = k V, single program = L V + loss (remat:
    L (F + V) + loss)."""
    cfg, params, owner = runner.cfg, runner.params, engine.arena
    layout = owner.layout
    layers = cfg.num_layers
    batch = trainer.TrainBatch.from_host(runner.loader.next_batch().arrays())
    lora = jax.tree.map(jnp.copy, runner.state.lora)  # the state (and its LoRA) is donated below
    pages = owner.table.lease("bench-profile", runner.micro.stash_pages_needed)
    stash_pages = jnp.asarray(pages, jnp.int32)
    x = trainer.embed_step(params, batch)
    arena = owner.buffer
    owner.buffer = None  # threaded through the donating programs below, handed back at the end
    # Fill the stash.
    arena = mb._forward_chunk(params.layers, layout, lora, arena, x, batch, stash_pages, jnp.int32(0))[0]
    _, _, g = mb._loss_step(params, cfg, x, batch)
    grads = jax.tree.map(jnp.zeros_like, lora)
    state = runner.state
    runner.state = None
    big = jnp.zeros((4 * arena.shape[0], *arena.shape[1:]), arena.dtype)

    lp0, lora0 = params.layers[0], layer_adapters(lora, 0)
    layer_static = jax.jit(_layer_static, static_argnames=("cfg",))
    layer_vjp = jax.jit(_layer_vjp_static, static_argnames=("cfg",))
    f_layer = _flops(layer_static, lp0, cfg, lora0, x, batch)
    v_layer = _flops(layer_vjp, lp0, cfg, lora0, x, g, batch)
    f_loss = _flops(mb._loss_step, params, cfg, x, batch)
    flops = {"layer_forward": f_layer, "layer_vjp": v_layer, "loss": f_loss}
    print(f"  XLA flops: layer forward {f_layer / 1e9:.2f} G, layer vjp {v_layer / 1e9:.2f} G, "
          f"loss {f_loss / 1e9:.2f} G", flush=True)

    noop = jax.jit(lambda a: a + 1)
    fwd_nostash = jax.jit(_fwd_nostash, static_argnames=("cfg",))
    stash_write = jax.jit(_stash_write, static_argnames=("layout", "num_layers"), donate_argnames=("arena",))
    stash_read = jax.jit(_stash_read, static_argnames=("layout", "num_layers"))
    bwd_nogather = jax.jit(_bwd_nogather, static_argnames=("cfg",), donate_argnames=("grads",))
    layers_fwd = jax.jit(_layers_forward, static_argnames=("cfg",))

    def fwd(k):
        nonlocal arena
        arena, y = mb._forward_chunk(params.layers[:k], layout, lora, arena, x, batch, stash_pages, jnp.int32(0))
        return y

    def write(k, big_arena=False):
        nonlocal arena, big
        if big_arena:
            big = stash_write(layout, big, x, stash_pages, jnp.int32(0), k)
            return big
        arena = stash_write(layout, arena, x, stash_pages, jnp.int32(0), k)
        return arena

    def bwd(k, gather=True):
        nonlocal grads
        if gather:
            g_out, grads = mb._backward_chunk(params.layers[layers - k:], layout, lora, arena, g, grads, batch,
                                              stash_pages, jnp.int32(layers))
        else:
            g_out, grads = bwd_nogather(params.layers[layers - k:], cfg, lora, x, g, grads, batch, jnp.int32(layers))
        return g_out

    def commit():
        nonlocal state, grads
        state, grads = ft._commit(state, grads, jnp.float32(1))
        return state

    def update():
        nonlocal state
        state = ft._update(runner.optimizer, state)[0]
        return state

    def single(remat):
        nonlocal state
        state = ft._grad_step(params, cfg, state, batch, remat)[0]
        return state

    one = jnp.int32(0)
    p = Programs()
    p.add("dispatch: empty jitted call", lambda: noop(one))
    p.add("embed (eager, as the runner calls it)", lambda: trainer.embed_step(params, batch))
    p.add("1 layer forward, static weights", lambda: layer_static(lp0, cfg, lora0, x, batch), f_layer)
    p.add("1 layer vjp, static weights", lambda: layer_vjp(lp0, cfg, lora0, x, g, batch), v_layer)
    p.add(f"forward, {layers} layers", lambda: layers_fwd(params, cfg, lora, x, batch), layers * f_layer)
    for k in chunks:
        p.add(f"forward chunk {k}", functools.partial(fwd, k), k * f_layer)
        p.add(f"forward chunk {k} without stash",
              functools.partial(fwd_nostash, params.layers[:k], cfg, lora, x, batch, jnp.int32(0)), k * f_layer)
        p.add(f"stash write {k} layers", functools.partial(write, k))
    p.add(f"stash write {layers} layers, 4x arena", functools.partial(write, layers, True))
    p.add("loss (norm, head, CE, grad)", lambda: mb._loss_step(params, cfg, x, batch), f_loss)
    for k in chunks:
        p.add(f"backward chunk {k}", functools.partial(bwd, k), k * v_layer)
        p.add(f"backward chunk {k} without gather", functools.partial(bwd, k, False), k * v_layer)
        p.add(f"stash read {k} layers",
              lambda k=k: stash_read(layout, arena, g, stash_pages, jnp.int32(layers), k))  # the current arena
    p.add("commit", commit)
    p.add("optax update", update)
    p.add("single program, remat=False", functools.partial(single, False), layers * v_layer + f_loss)
    p.add("single program, remat=True", functools.partial(single, True), layers * (f_layer + v_layer) + f_loss)
    res = p.run(reps)
    runner.state = state
    owner.buffer = arena
    owner.table.release("bench-profile")
    return {"flops": flops, "programs": res}


# Main -------------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    settings = common.comparison_settings(args)
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"load {[round(x, 2) for x in os.getloadavg()]}", flush=True)
    config_path = str(REPO / args.config) if not Path(args.config).is_absolute() else args.config
    cfg = ModelConfig.from_yaml(config_path)
    layers = cfg.num_layers
    chunks = sorted({min(c, layers) for c in (args.chunks or [1, 4, layers])})
    page_tokens = EngineConfig().cache.page_tokens
    stash_pages = ArenaLayout(cfg, page_tokens).stash_pages(args.rows * args.seq_len)
    num_pages = stash_pages + 1  # + the null page
    engine = Engine.from_config(config_path, EngineConfig(max_batch=1, max_seq_len=args.seq_len,
                                                          num_pages=num_pages), warmup=False)
    n_params = sum(x.size for x in jax.tree.leaves(engine.runner.params))
    print(f"{cfg.name}: {n_params / 1e6:.1f}M params, {layers} layers, hidden {cfg.hidden_size}, {cfg.dtype}; "
          f"micro-batch {args.rows} x {args.seq_len}; arena {num_pages} pages ({stash_pages} for the stash, "
          f"{engine.arena.buffer.nbytes / 2**20:.1f} MiB)", flush=True)

    records = synthetic_records(engine.tokenizer, args.seq_len)
    specs = [("single", None, False), ("single-remat", None, True)] + [(f"micro-{k}", k, False) for k in chunks]
    modes = [Mode(name, make_runner(engine, args, records, name, remat), chunk, engine.arena)
             for name, chunk, remat in specs]
    probe = make_runner(engine, args, records, "probe", remat=False).loader.next_batch()
    packed, trained = probe.num_tokens, probe.num_loss_tokens
    lora_params = sum(x.size for x in jax.tree.leaves(modes[0].runner.state.lora))
    print(f"tokens per micro-batch: {packed} packed, {trained} trained; LoRA {lora_params / 1e6:.2f}M params",
          flush=True)

    warmup = {}
    for mode in modes:
        with common.LoadMeter() as meter:
            for _ in range(args.warmup):
                mode.run_microbatch()
        warmup[mode.name] = meter.record
        print(f"warm-up {mode.name:<13} {meter.record['wall_s']:7.1f} s", flush=True)

    def timed(mode: Mode):
        def run() -> dict:
            result = mode.run_microbatch()
            if result["trained_tokens"] != trained:
                raise RuntimeError(f"{mode.name}: {result['trained_tokens']} trained tokens, expected {trained}")
            return result
        return run

    quiet = common.wait_for_quiet(args.max_other_share, settings["quiet_timeout"], settings["quiet_sample"])
    comparison = common.interleave({m.name: timed(m) for m in modes}, args.iters, seed=args.seed,
                                   describe=lambda r: f"{r['seconds']:.4f} s, {r['cores_used']:.2f} cores", **settings)

    results = {}
    for m in modes:
        seconds = common.figure(comparison, m.name, "seconds")
        valid = [r["seconds"] for r in common.valid_results(comparison, m.name)]
        med = seconds["median"]
        results[m.name] = {
            "layers_per_chunk": m.chunk, "remat": m.runner.job.remat, "last_loss": m.runner.progress().loss,
            "valid_attempts": seconds["valid_attempts"], "attempts": seconds["attempts"],
            "seconds_median": med, "seconds_min": min(valid) if valid else None,
            "trained_tokens_per_s": trained / med if med else None,
            "packed_tokens_per_s": packed / med if med else None,
            "minor_faults_median": common.figure(comparison, m.name, "minor_faults")["median"],
            "cores_used_median": common.figure(comparison, m.name, "cores_used")["median"]}
    # Throughput ratios (> 1: faster than the reference), from valid medians only. The headline reference is the
    # default single program (activations kept, remat=False); the remat program is the secondary one.
    for r in results.values():
        r["throughput_vs_single"] = common.ratio(results["single"]["seconds_median"], r["seconds_median"])["value"]
        r["throughput_vs_single_remat"] = common.ratio(results["single-remat"]["seconds_median"],
                                                       r["seconds_median"])["value"]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"\n{'mode':<14}{'s/micro-batch':>14}{'trained tok/s':>15}{'packed tok/s':>14}{'vs single':>11}"
          f"{'vs remat':>10}{'faults':>9}{'valid':>7}")
    for name, r in results.items():
        print(f"{name:<14}{f(r['seconds_median'], '14.4f')}{f(r['trained_tokens_per_s'], '15.1f')}"
              f"{f(r['packed_tokens_per_s'], '14.1f')}{f(r['throughput_vs_single'], '11.3f')}"
              f"{f(r['throughput_vs_single_remat'], '10.3f')}{f(r['minor_faults_median'], '9.0f')}"
              f"{r['valid_attempts']:>4}/{r['attempts']}", flush=True)

    print("\nmicro-step breakdown (diagnostic, blocked after each micro-step):", flush=True)
    breakdowns = {}
    for mode in modes:
        if mode.chunk is None:
            continue
        with common.LoadMeter() as meter:
            b = breakdown(mode, args.breakdown_iters)
        breakdowns[mode.name] = {**b, "load": meter.record}
        parts = ", ".join(f"{kind} {v['calls_per_microbatch']}x{v['seconds_median'] * 1e3:.0f}ms"
                          f"/{v['minor_faults_median']:.0f}flt"
                          for kind, v in b["kinds"].items())
        print(f"  {mode.name:<9} {b['microbatch_seconds_median']:.3f} s: {parts}", flush=True)

    programs = None
    if not args.no_profile:
        print("\nprograms alone (diagnostic, median, blocked per call):", flush=True)
        micro = next(m for m in modes if m.chunk is not None)
        with common.LoadMeter() as meter:
            programs = profile(engine, micro.runner, chunks, args.profile_reps)
        programs["load"] = meter.record
        fl = programs["flops"]
        for r in results.values():  # model flops of a micro-batch: remat and micro-steps recompute each layer
            per_layer = fl["layer_vjp"] + (fl["layer_forward"] if r["remat"] or r["layers_per_chunk"] else 0.0)
            r["model_flops"] = layers * per_layer + fl["loss"]
            r["gflop_per_s"] = r["model_flops"] / r["seconds_median"] / 1e9 if r["seconds_median"] else None

    payload = {
        "config": {**vars(args), "chunks": chunks},
        "model": {"config": args.config, "name": cfg.name, "params": int(n_params), "layers": layers,
                  "hidden_size": cfg.hidden_size, "dtype": str(cfg.dtype)},
        "lora": {"rank": args.rank, "targets": args.targets, "params": int(lora_params)},
        "microbatch": {"rows": args.rows, "seq_len": args.seq_len, "packed_tokens": int(packed),
                       "trained_tokens": int(trained)},
        "arena": {"num_pages": num_pages, "stash_pages": stash_pages, "page_tokens": page_tokens,
                  "bytes": int(engine.arena.buffer.nbytes)},
        "env": {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "XLA_FLAGS") if os.environ.get(k)},
        "warmup_load": warmup,
        "quiet_wait": quiet,
        "comparison": comparison,
        "reference": {"headline": "single", "secondary": "single-remat"},
        "results": results,
        "micro_step_breakdown": breakdowns,
        "programs": programs,
    }
    out = common.output_dir(args)
    if out is None:
        print("\n--quick without --out: no result file written")
        return
    print(f"\nwrote {common.write_result('finetune', payload, out)}")


if __name__ == "__main__":
    main()
