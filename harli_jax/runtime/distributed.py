"""Several processes (hosts) as one engine, through `jax.distributed`: process 0 owns the scheduler and the front
end; every process holds its devices' share of the weights and the arena and runs each step program with it.
Process 0 announces every step before it runs it (its program shape, its packed inputs); the others run the same
step on their devices when told (`Engine.follow`). A process that dies stops the others: JAX's coordination
service misses its heartbeats for `timeout_s` and terminates every process with an error that says so."""

from __future__ import annotations

import argparse
import logging
import os
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from harli_jax.errors import ConfigError
from harli_jax.logs import show_progress

log = logging.getLogger("harli_jax")

ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 60) -> bool:
    """Joins the processes of one engine (`coordinator` HOST:PORT, this process's id among `num_processes`), or the
    ones the environment names (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`); nothing when
    neither is given. Call before JAX computes anything. Returns whether this is a multi-process run."""
    env = {name: os.environ.get(name) for name in ENVIRONMENT}
    coordinator = coordinator or env["JAX_COORDINATOR_ADDRESS"]
    num_processes = num_processes if num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int(env, "JAX_PROCESS_ID")
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        return False
    missing = [flag for flag, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"a multi-process run needs --coordinator, --num-processes and --process-id (or "
                          f"{', '.join(ENVIRONMENT)}); missing {', '.join(missing)}")
    if ":" not in coordinator:
        raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in [0, --num-processes={num_processes}), got {process_id}")
    if timeout_s < 1:
        raise ConfigError(f"the distributed timeout must be at least 1 second, got {timeout_s}")
    show_progress()
    log.info("process %d of %d: joining at %s (the others must join within %d s; one silent for %d s stops "
             "them all)", process_id, num_processes, coordinator, timeout_s, timeout_s)
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=timeout_s)
    log.info("process %d of %d: %d local devices, %d in all", process_id, num_processes, len(jax.local_devices()),
             len(jax.devices()))
    return num_processes > 1


def add_options(parser: argparse.ArgumentParser) -> None:
    """The flags of a multi-process run (`start` reads them)."""
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="multi-process: process 0's address, where "
                        "the others join (or JAX_COORDINATOR_ADDRESS); unset: one process")
    parser.add_argument("--num-processes", type=int, help="multi-process: how many (or JAX_NUM_PROCESSES)")
    parser.add_argument("--process-id", type=int, help="multi-process: this one's, 0 first (or JAX_PROCESS_ID); "
                        "0 runs the scheduler and the front end, the others its steps on their devices")
    parser.add_argument("--distributed-timeout", type=int, default=60, metavar="SECONDS",
                        help="multi-process: how long the processes wait for each other to join, and for a "
                             "silent one before all stop with an error (default 60)")


def start(args: argparse.Namespace) -> bool:
    """`initialize` from the flags of `add_options`."""
    return initialize(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)


def _env_int(env: dict[str, str | None], name: str) -> int | None:
    value = env[name]
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


class StepCall(NamedTuple):
    """A step program run as process 0 announced it: its shape (seqs, tokens, pages), whether its input tokens
    include the previous step's outputs, and its packed inputs."""

    shape: tuple[int, int, int]
    takes_previous: bool
    inputs: np.ndarray


_STOP, _STEP = 0, 1


class Peers:
    """The other processes of a multi-process engine: process 0 announces each step program it runs (`announce`)
    and at the end `release`s them; the others `receive` each call in order (None: released)."""

    def __init__(self):
        self.leader = jax.process_index() == 0

    def announce(self, shape: tuple[int, int, int], takes_previous: bool, inputs: np.ndarray) -> None:
        self._header(_STEP, *shape, int(takes_previous), inputs.size)
        multihost_utils.broadcast_one_to_all(inputs)

    def release(self) -> None:
        """Tells the others that no more steps come."""
        self._header(_STOP, 0, 0, 0, 0, 0)

    def receive(self) -> StepCall | None:
        op, seqs, tokens, pages, takes_previous, size = self._header(0, 0, 0, 0, 0, 0)
        if op == _STOP:
            return None
        inputs = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(size, np.int32)))
        return StepCall((seqs, tokens, pages), bool(takes_previous), inputs)

    def _header(self, *fields: int) -> list[int]:
        return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(fields, np.int32))).tolist()
