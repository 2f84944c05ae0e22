"""In-memory cache backend: bounded LRU with a time to live per entry (one process).

Entries carry their own deadline and expire lazily: a read of an expired entry misses and
drops it, ``purge_expired`` drops the rest, and the LRU bound evicts what nobody reads.
``cachetools.TLRUCache`` keeps a heap of deadlines instead and cost 4 us a write (six
times ``LRUCache``), twice per robot on the worker's path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cachetools import Cache, LRUCache

from .backend import RateDecision, gcra

__all__ = ["MemoryBackend"]


#: a value and the ``time.monotonic()`` at which it expires
_Entry = tuple[Any, float]


class MemoryBackend:
    name = "memory"

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: LRUCache[str, _Entry] = LRUCache(maxsize=max_entries)
        # Rate-limit state lives apart from cached data so evicting data never resets a limit.
        self._tats: LRUCache[str, _Entry] = LRUCache(maxsize=max_entries)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._tats.clear()

    async def ping(self) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = _live(self._entries, key)
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._entries[key] = (value, time.monotonic() + ttl)

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        expires = time.monotonic() + ttl
        entries = self._entries
        for key, value in items:
            entries[key] = (value, expires)

    def get_object(self, key: str) -> object | None:
        """An in-process object stored by ``set_object`` (never serialized)."""
        value: object | None = _live(self._entries, key)
        return value

    def set_object(self, key: str, value: object, ttl: float) -> None:
        self._entries[key] = (value, time.monotonic() + ttl)

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def purge_expired(self) -> int:
        """Drop entries past their TTL now (reads skip them anyway); how many went."""
        return _purge(self._entries) + _purge(self._tats)

    async def rate_limit(self, key: str, count: int, period: float, cost: int = 1) -> RateDecision:
        # No await between read and write: atomic on the event loop.
        now = time.monotonic()
        stored: float | None = _live(self._tats, key, now)
        decision, new_tat = gcra(stored, now, count, period, cost)
        if new_tat is not None:
            self._tats[key] = (new_tat, now + max(new_tat - now, 0.001))
        return decision


def _live(entries: LRUCache[str, _Entry], key: str, now: float | None = None) -> Any:
    """The value under ``key``, or None if there is none or it has expired (then dropped)."""
    entry = entries.get(key)
    if entry is None:
        return None
    if entry[1] <= (time.monotonic() if now is None else now):
        entries.pop(key, None)
        return None
    return entry[0]


def _purge(entries: LRUCache[str, _Entry]) -> int:
    """Drop the expired entries; how many went. Reads them without marking them used."""
    now = time.monotonic()
    expired = [key for key in list(entries) if Cache.__getitem__(entries, key)[1] <= now]
    for key in expired:
        entries.pop(key, None)
    return len(expired)
