"""The in-memory cache backend's own promises: bounded size, lazy expiry, purging."""

from __future__ import annotations

import anyio
import pytest

from robotframework_mvp.cache.memory import MemoryBackend

pytestmark = pytest.mark.anyio


async def _expire(backend: MemoryBackend, marker_ttl: float) -> None:
    """Wait until an entry set now with ``marker_ttl`` has expired (reads say so)."""
    backend.set_object("marker", 1, marker_ttl)
    with anyio.fail_after(2):
        while True:
            if backend.get_object("marker") is None:
                return
            await anyio.sleep(0.01)


async def test_purge_drops_expired_entries_and_keeps_live_ones() -> None:
    backend = MemoryBackend(max_entries=100)
    for i in range(5):
        await backend.set(f"short{i}", b"x", 0.02)
    await backend.set("long", b"stays", 60)
    await backend.rate_limit("caller", count=10, period=0.02)  # its state lives 20 ms
    await _expire(backend, 0.02)
    assert backend.purge_expired() == 5 + 1  # the five short entries and the limit state
    assert backend.purge_expired() == 0
    assert await backend.get("long") == b"stays"


async def test_the_least_recently_read_entry_is_evicted_first_even_after_a_purge() -> None:
    backend = MemoryBackend(max_entries=3)
    for name in ("a", "b", "c"):
        await backend.set(name, name.encode(), 60)
    assert await backend.get("a") == b"a"  # b is now the least recently used
    assert backend.purge_expired() == 0  # looking for expired entries uses none of them
    await backend.set("d", b"d", 60)
    assert await backend.get("b") is None
    assert [await backend.get(k) for k in ("a", "c", "d")] == [b"a", b"c", b"d"]


async def test_an_expired_entry_reads_as_missing_before_any_purge() -> None:
    backend = MemoryBackend(max_entries=10)
    backend.set_object("robot", object(), 0.02)
    await _expire(backend, 0.02)
    assert backend.get_object("robot") is None
