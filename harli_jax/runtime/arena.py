"""The unified arena: one device array of pages (Arena), and the host page table that says who owns each page.

Two tenants share the pages. A request's KV cache owns pages as its context grows; the trainer leases pages
for activation stashes. KV has priority: a lease is granted only while the free pool stays above a
watermark, and when KV needs pages the table reclaims leases (newest first) and returns which, so that the
caller can abandon that work: the table never calls back. Page 0 is the null page: never allocated, the
padding of every block table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import jax

from harli_jax.model.paged import ArenaLayout

NULL_PAGE = 0
T = TypeVar("T")


class Owner(NamedTuple):
    """Who holds pages (a tuple: cheap to build and hash on every step)."""

    kind: str  # "kv" (a request's cache) or "lease" (a trainer stash)
    key: str


@dataclasses.dataclass(frozen=True)
class Growth:
    """What growing a KV cache did: whether it fits now, and the leases taken back for it."""

    ok: bool
    reclaimed: tuple[Owner, ...] = ()

    def __bool__(self) -> bool:
        return self.ok


class OutOfPages(Exception):
    """Not enough free pages for an allocation; the caller decides whom to wait or preempt."""


class PageTable:
    """Host-side bookkeeping of the arena's pages. Every page is free or has exactly one owner."""

    def __init__(self, num_pages: int, page_tokens: int, max_pages_per_seq: int):
        if num_pages < 2:
            raise ValueError(f"the arena needs at least 2 pages (page 0 is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.max_pages_per_seq = max_pages_per_seq
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))  # a stack: low ids are handed out first
        self._owner: list[Owner | None] = [None] * num_pages
        self._pages: dict[Owner, list[int]] = {}
        self._by_kind: dict[str, int] = {"kv": 0, "lease": 0}  # pages held per owner kind
        self.reclaims = 0

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages(self, owner: Owner) -> list[int]:
        return self._pages.get(owner, [])

    def owners(self, kind: str | None = None) -> list[Owner]:
        return [o for o in self._pages if kind is None or o.kind == kind]

    def usage(self) -> dict[str, int]:
        """Pages by owner kind, and free."""
        return {"free": self.num_free, **self._by_kind}

    def allocate(self, owner: Owner, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"{owner} needs {n} pages, {self.num_free} free")
        new = [self._free.pop() for _ in range(n)]
        for page in new:
            self._owner[page] = owner
        self._pages.setdefault(owner, []).extend(new)
        self._by_kind[owner.kind] = self._by_kind.get(owner.kind, 0) + n
        return new

    def free(self, owner: Owner) -> int:
        pages = self._pages.pop(owner, [])
        if pages:
            self._by_kind[owner.kind] -= len(pages)
            if not self._by_kind[owner.kind] and owner.kind not in ("kv", "lease"):
                del self._by_kind[owner.kind]
        for page in pages:
            self._owner[page] = None
        self._free.extend(reversed(pages))
        return len(pages)

    # KV caches -------------------------------------------------------------------------------------------

    def pages_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_tokens)

    def grow_kv(self, request_id: str, num_tokens: int) -> Growth:
        """Makes the request's KV cover `num_tokens` tokens, reclaiming leases if needed (not ok if even that
        is not enough)."""
        owner = Owner("kv", request_id)
        need = self.pages_for_tokens(num_tokens) - len(self.pages(owner))
        if need <= 0:
            return Growth(True)
        reclaimed = tuple(self.reclaim(need)) if need > self.num_free else ()
        if need > self.num_free:
            return Growth(False, reclaimed)
        self.allocate(owner, need)
        return Growth(True, reclaimed)

    def block_table(self, request_id: str) -> list[int]:
        return self.pages(Owner("kv", request_id))

    # Trainer leases --------------------------------------------------------------------------------------

    def lease(self, lease_id: str, n: int, watermark: int = 0) -> list[int] | None:
        """Leases `n` pages if at least `watermark` pages stay free afterwards; else None."""
        if self.num_free - n < watermark:
            return None
        return self.allocate(Owner("lease", lease_id), n)

    def release(self, lease_id: str) -> int:
        return self.free(Owner("lease", lease_id))

    def reclaim(self, need: int) -> list[Owner]:
        """Takes leases back, newest first, until `need` pages are free (all of them if that is not enough: KV
        has priority, so no request waits for memory while the trainer holds any); returns those taken."""
        taken = []
        for owner in reversed(self.owners("lease")):
            if self.num_free >= need:
                break
            self.free(owner)
            self.reclaims += 1
            taken.append(owner)
        return taken

    def check_invariants(self) -> None:
        """No page has two owners, used + free = total, the null page is never handed out."""
        owned = [p for pages in self._pages.values() for p in pages]
        assert len(owned) == len(set(owned)), "a page has two owners"
        assert not set(owned) & set(self._free), "a page is both owned and free"
        assert len(owned) + self.num_free == self.capacity, "used + free != total"
        assert NULL_PAGE not in owned and NULL_PAGE not in self._free, "the null page was allocated"
        kinds = {"kv": 0, "lease": 0}
        for owner, pages in self._pages.items():
            kinds[owner.kind] = kinds.get(owner.kind, 0) + len(pages)
        assert kinds == self._by_kind, "page counts per owner kind disagree"
        for owner, pages in self._pages.items():
            assert all(self._owner[p] == owner for p in pages), "page owner records disagree"
            if owner.kind == "kv":
                assert len(pages) <= self.max_pages_per_seq, f"{owner} exceeds max_pages_per_seq"


class Arena:
    """The one owner of the arena: the device buffer, the page table that says who owns each page, and the layout
    that the model, the kernels' callers and the trainer view it through. Programs take the buffer and return it
    through `update`; nothing else stores it."""

    def __init__(self, layout: ArenaLayout, num_pages: int, max_pages_per_seq: int):
        self.layout = layout
        self.table = PageTable(num_pages, layout.page_tokens, max_pages_per_seq)
        self.buffer = layout.zeros(num_pages)  # over a tensor-parallel mesh: split by KV heads

    def update(self, program: Callable[[jax.Array], tuple[jax.Array, T]]) -> T:
        """Runs `program(buffer) -> (buffer, out)`, keeps the buffer it returns (the old one may be donated) and
        returns `out`."""
        self.buffer, out = program(self.buffer)
        return out


def pages_from_memory(layout: ArenaLayout, memory_fraction: float, weight_bytes: int, workspace_bytes: int,
                      devices: Sequence[jax.Device], tensor_parallel: int = 1) -> int:
    """Pages that fit in `memory_fraction` of the smallest memory limit of `devices` after the weights and step
    workspace each device holds (`weight_bytes`, `workspace_bytes`: per device); each holds 1/`tensor_parallel`
    of every page."""
    limits = []
    for device in devices:
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if not limit:
            raise ValueError(f"{device} reports no memory limit; set EngineConfig.cache.num_pages")
        limits.append(limit)
    available = int(min(limits) * memory_fraction) - weight_bytes - workspace_bytes
    return max(available * tensor_parallel // layout.page_bytes, 0)
