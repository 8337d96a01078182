"""The served LoRA adapters: the catalogue of those a request may name (`AdapterCatalog`, their weights on the
host) and which of them hold one of the runner's resident slots (`SlotTable`, least recently used first out).

A catalogue entry never changes: an adapter trained further is added again under a new name (a versioned
snapshot), so a running request never sees a half-applied update. The scheduler acquires a slot when it admits a
request and releases it when the request finishes or is preempted; only a slot no running request holds is
reused. The model runner writes a slot's weights before the first step that uses them.
"""

from __future__ import annotations

import collections
import dataclasses
import threading

from harli_jax.errors import HarliError
from harli_jax.lora.adapters import LoRAConfig
from harli_jax.model.params import LoRASlots


@dataclasses.dataclass(frozen=True)
class ServedAdapter:
    """A servable adapter: its name, its LoRA shape, and its weights as one resident slot's (`slot_weights`)."""

    name: str
    lora: LoRAConfig
    weights: LoRASlots
    base_model: str | None = None


class AdapterCatalog:
    """The adapters requests may name (any thread adds; the engine thread reads)."""

    def __init__(self):
        self._entries: dict[str, ServedAdapter] = {}
        self._lock = threading.Lock()

    def check_new(self, name: str) -> None:
        """A HarliError when `name` is taken (before its weights are read)."""
        if self.get(name) is not None:
            raise HarliError(f"an adapter named {name!r} is already served; adapters never change: add the new "
                             f"weights under a new name")

    def add(self, adapter: ServedAdapter) -> None:
        with self._lock:
            if adapter.name not in self._entries:
                self._entries[adapter.name] = adapter
                return
        self.check_new(adapter.name)

    def get(self, name: str) -> ServedAdapter | None:
        with self._lock:
            return self._entries.get(name)

    def remove(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)


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

    def resident(self) -> dict[str, int]:
        """Slot by adapter name, least recently used first."""
        return dict(self._slot_of)
