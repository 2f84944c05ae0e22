"""The narrow protocol every cache backend implements, and the GCRA rate-limit rule.

A backend stores bytes under keys with a time to live, and runs the rate limiter's
check-and-count atomically (in one event-loop step in memory, in one Lua script in
Redis), so the limit holds across every process that shares the backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import attrs

__all__ = ["CacheBackend", "Publisher", "RateCheck", "RateDecision", "Subscription", "gcra",
           "get_many", "rate_limit_many"]


@attrs.frozen
class RateDecision:
    """Outcome of one rate-limit check (GCRA)."""

    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until one more request would be allowed (0 if allowed)
    reset_after: float  # seconds until the limit is fully replenished


def gcra(
    tat: float | None, now: float, count: int, period: float, cost: int = 1
) -> tuple[RateDecision, float | None]:
    """The Generic Cell Rate Algorithm: ``count`` requests per ``period``, bursts allowed.

    ``tat`` is the stored theoretical arrival time (None when fresh). Returns the
    decision and the new ``tat`` to store (None when the request is refused: nothing
    changes). The Redis backend runs the same arithmetic in Lua.
    """
    interval = period / count
    tat = now if tat is None or tat < now else tat
    new_tat = tat + interval * cost
    allow_at = new_tat - period
    # A request landing exactly on its allow time is admitted despite float rounding.
    if allow_at - now > 1e-9:
        return (
            RateDecision(False, count, 0, allow_at - now, tat - now),
            None,
        )
    remaining = math.floor((period - (new_tat - now)) / interval + 1e-9)
    return RateDecision(True, count, max(0, remaining), 0.0, new_tat - now), new_tat


@runtime_checkable
class CacheBackend(Protocol):
    #: URL scheme this backend serves ("memory", "redis")
    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the backend cannot be reached."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        """Set several keys with one TTL in one round trip."""

    async def delete(self, *keys: str) -> None: ...

    async def rate_limit(self, key: str, count: int, period: float, cost: int = 1) -> RateDecision:
        """Check and count one request against ``count`` per ``period`` atomically."""


class Subscription(Protocol):
    """Messages published on one channel, from the moment the subscription was confirmed."""

    async def receive(self, timeout: float) -> bytes | None:
        """The next message, or None when none came within ``timeout`` seconds.

        Raises ``ConnectionError`` when the connection was lost or had to be made again:
        messages published meanwhile may be missing, so the caller re-checks what it
        waited for.
        """


@runtime_checkable
class Publisher(Protocol):
    """A shared backend that can also tell the other processes sharing it something.

    Optional (Redis has it). The CacheManager writes robot states with it: a robot's
    first state (or one read from the store) never replaces a state another process
    wrote meanwhile, and the robots that ended are announced with the write that caches
    them, so that a process waiting for one run elsewhere hears it at once.
    """

    async def write_many(self, items: Sequence[tuple[str, bytes, float]],
                         only_new: Sequence[tuple[str, bytes, float]],
                         announce: tuple[str, bytes] | None = None) -> int:
        """In one round trip and in this order: set the keys of ``only_new`` that do not
        exist; set ``items``' keys; publish ``announce`` (channel, message). Each
        entry is (key, value, ttl): its key expires after ``ttl`` seconds (one that is 0
        or less, at once). A key appears at most once in a call. Returns how many
        subscribers heard the message."""

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to ``channel``; entered once the server confirmed it."""


async def get_many(backend: CacheBackend, keys: Sequence[str]) -> list[bytes | None]:
    """The values under ``keys``, in order: in one round trip when the backend has
    ``get_many`` (an optional method; Redis has it, as MGET), else with one call each."""
    many = getattr(backend, "get_many", None)
    if many is not None:
        return list(await many(keys))
    return [await backend.get(key) for key in keys]


#: one rate-limit check: (key, count, period) for one request
RateCheck = tuple[str, int, float]


async def rate_limit_many(backend: CacheBackend, checks: Sequence[RateCheck]
                          ) -> list[RateDecision]:
    """Check and count one request per item of ``checks``, in order, as ``rate_limit``
    would one after another: in one round trip when the backend has ``rate_limit_many``
    (an optional method; Redis has it), else with one call each."""
    many = getattr(backend, "rate_limit_many", None)
    if many is not None:
        return list(await many(checks))
    return [await backend.rate_limit(key, count, period) for key, count, period in checks]
