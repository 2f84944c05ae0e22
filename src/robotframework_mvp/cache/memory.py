"""In-memory cache backend: bounded LRU with a time to live per entry (one process)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cachetools import TLRUCache

from .backend import RateDecision, gcra

__all__ = ["MemoryBackend"]


def _expires(_key: str, value: tuple[Any, float], now: float) -> float:
    return now + value[1]


class MemoryBackend:
    name = "memory"

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: TLRUCache[str, tuple[bytes, float]] = TLRUCache(
            maxsize=max_entries, ttu=_expires, timer=time.monotonic
        )
        # Rate-limit state lives apart from cached data so evicting data never resets a limit.
        self._tats: TLRUCache[str, tuple[float, float]] = TLRUCache(
            maxsize=max_entries, ttu=_expires, timer=time.monotonic
        )

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._tats.clear()

    async def ping(self) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._entries[key] = (value, ttl)

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        for key, value in items:
            self._entries[key] = (value, ttl)

    def get_object(self, key: str) -> object | None:
        """An in-process object stored by ``set_object`` (never serialized)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def set_object(self, key: str, value: object, ttl: float) -> None:
        self._entries[key] = (value, ttl)  # type: ignore[assignment]

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._entries.pop(key, None)

    def purge_expired(self) -> int:
        """Drop entries past their TTL now (reads skip them anyway); how many went."""
        before = len(self._entries) + len(self._tats)
        self._entries.expire()
        self._tats.expire()
        return before - len(self._entries) - len(self._tats)

    async def rate_limit(self, key: str, count: int, period: float, cost: int = 1) -> RateDecision:
        # No await between read and write: atomic on the event loop.
        now = time.monotonic()
        stored = self._tats.get(key)
        decision, new_tat = gcra(None if stored is None else stored[0], now, count, period, cost)
        if new_tat is not None:
            self._tats[key] = (new_tat, max(new_tat - now, 0.001))
        return decision
