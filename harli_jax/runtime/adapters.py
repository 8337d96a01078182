"""The served LoRA adapters: the catalogue of those a request may name and their weights in host memory
(`AdapterCatalog`, a bounded cache of them), and which of them hold one of the runner's resident slots
(`SlotTable`, least recently used first out).

A catalogue entry never changes: an adapter trained further is added again under a new name (a versioned
snapshot), so a running request never sees a half-applied update. Host memory keeps the weights of at most
`max_in_memory` adapters (vLLM's `max_cpu_loras`): one read from a directory leaves it, least recently used first,
and is read again, in the background, when a request names it; a job's snapshot has no directory and always stays.
The scheduler admits a request once its adapter's weights are in memory (or its slot holds them) and acquires a
slot; it releases it when the request finishes or is preempted; only a slot no running request holds is reused. The
model runner writes a slot's weights before the first step that uses them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harli_jax.errors import HarliError
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.params import LoRASlots

log = logging.getLogger("harli_jax")


@dataclasses.dataclass(frozen=True)
class ServedAdapter:
    """A servable adapter: its name, its LoRA shape, and the directory its weights are read from again once they
    left host memory (None: a snapshot, kept in memory while it is served)."""

    name: str
    lora: LoRAConfig
    base_model: str | None = None
    source: Path | None = None


class AdapterCatalog:
    """The adapters requests may name, and the weights (as one resident slot's, `slot_weights`) of at most
    `max_in_memory` of them in host memory (any thread adds; the engine thread reads). `read` reads a
    directory's weights."""

    def __init__(self, read: Callable[[Path], LoRASlots], max_in_memory: int | None = None):
        self._read, self.max_in_memory = read, max_in_memory
        self._entries: dict[str, ServedAdapter] = {}
        self._weights: collections.OrderedDict[str, LoRASlots] = collections.OrderedDict()  # least recent first
        self._reading: set[str] = set()
        self._failed: dict[str, str] = {}  # adapters whose weights could not be read again, and why
        self._reader: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def check_new(self, name: str) -> None:
        """A HarliError when `name` is taken (before its weights are read)."""
        if self.get(name) is not None:
            raise HarliError(f"an adapter named {name!r} is already served; adapters never change: add the new "
                             f"weights under a new name")

    def add(self, adapter: ServedAdapter, weights: LoRASlots) -> None:
        with self._lock:
            if adapter.name not in self._entries:
                self._entries[adapter.name] = adapter
                self._keep(adapter.name, weights)
                return
        self.check_new(adapter.name)

    def get(self, name: str) -> ServedAdapter | None:
        with self._lock:
            return self._entries.get(name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)
            self._weights.pop(name, None)
            self._failed.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def in_memory(self) -> list[str]:
        """The adapters whose weights are in host memory, least recently used first."""
        with self._lock:
            return list(self._weights)

    def ready(self, name: str) -> bool:
        """Whether the weights of `name` are in host memory; when they are not, starts reading them in the
        background (once) and a later call says True."""
        with self._lock:
            if name in self._weights:
                self._weights.move_to_end(name)
                return True
            if name in self._reading or name in self._failed:
                return False
            self._reading.add(name)
            source = self._entries[name].source
            if self._reader is None:
                self._reader = ThreadPoolExecutor(1, thread_name_prefix="harli-adapter-reader")
        self._reader.submit(self._read_again, name, source)
        return False

    def weights(self, name: str) -> LoRASlots:
        """The weights of `name`, read on this thread if they left host memory since a request was admitted."""
        with self._lock:
            if name in self._weights:
                self._weights.move_to_end(name)
                return self._weights[name]
            source = self._entries[name].source
        weights = self._read(source)
        with self._lock:
            self._keep(name, weights)
        return weights

    def take_failures(self) -> dict[str, str]:
        """The adapters whose weights could not be read again since the last call, and why (a request naming one
        later tries again)."""
        with self._lock:
            failed, self._failed = self._failed, {}
        return failed

    def _read_again(self, name: str, source: Path) -> None:
        try:
            weights = self._read(source)
        except HarliError as e:
            log.error("cannot read adapter %r again: %s", name, e)
            with self._lock:
                self._reading.discard(name)
                if name in self._entries:
                    self._failed[name] = str(e)
            return
        with self._lock:
            self._reading.discard(name)
            if name in self._entries:
                self._keep(name, weights)

    def _keep(self, name: str, weights: LoRASlots) -> None:
        """Holds `weights` in memory as the most recently used; drops the least recently used that can be read
        again while more than `max_in_memory` are held (with the lock)."""
        self._weights[name] = weights
        self._weights.move_to_end(name)
        if self.max_in_memory is None:
            return
        for held in list(self._weights):
            if len(self._weights) <= self.max_in_memory:
                break
            if held != name and self._entries[held].source is not None:
                del self._weights[held]


class SlotTable:
    """Which adapter each of `num_slots` resident slots holds, and how many running requests use it."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._slot_of: collections.OrderedDict[str, int] = collections.OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # slots holding no adapter, the lowest last

    def acquire(self, name: str) -> int | None:
        """The slot of `name` for one more running request: the one it holds, a free one, or the least recently
        used idle one's; None when every slot is in use (the request waits)."""
        if name in self._slot_of:
            self._slot_of.move_to_end(name)
            self._users[name] += 1
            return self._slot_of[name]
        if self._free:
            slot = self._free.pop()
        else:
            idle = next((n for n in self._slot_of if self._users[n] == 0), None)
            if idle is None:
                return None
            slot = self._slot_of.pop(idle)
            del self._users[idle]
        self._slot_of[name], self._users[name] = slot, 1
        return slot

    def release(self, name: str) -> None:
        self._users[name] -= 1

    def forget(self, name: str) -> None:
        """Frees the slot of `name`, an adapter no longer served (no running request uses it)."""
        if name in self._slot_of:
            assert self._users[name] == 0, f"adapter {name!r} still has running requests"
            self._free.append(self._slot_of.pop(name))
            del self._users[name]

    def holds(self, name: str) -> bool:
        """Whether a slot holds `name` (its weights are on the device)."""
        return name in self._slot_of

    def resident(self) -> dict[str, int]:
        """Slot by adapter name, least recently used first."""
        return dict(self._slot_of)
