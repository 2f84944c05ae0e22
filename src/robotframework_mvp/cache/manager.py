"""CacheManager: typed, namespaced access to a CacheBackend that never fails a request.

Reads that fail count as misses (the caller falls through to the store), writes that
fail are dropped and counted, and after repeated errors a circuit breaker stops calling
a dead backend until it has had time to recover. TTLs depend on the kind of data.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs
import orjson
from cattrs.preconf.orjson import make_converter

from ..config import CacheConfig
from ..group_commit import GroupCommitter, RoundTrips, SharesRoundTrips
from ..models import JSONObject, Robot
from ..resilience import BreakerPolicy, CircuitBreaker
from .backend import (
    CacheBackend,
    Publisher,
    RateCheck,
    RateDecision,
    get_many,
    rate_limit_many,
)
from .memory import MemoryBackend

__all__ = ["CacheManager"]

log = logging.getLogger(__name__)

#: how long a robot state may wait before it is written to a shared cache
_WRITE_BEHIND_SECONDS = 0.005
#: a write of at most this many robot states means the writer is not busy
_SMALL_WRITE = 8
#: robots to and from a shared cache's JSON: the same document as ``models.converter`` and
#: ``json`` make (datetimes in ISO 8601), in a fifth of the time. Payloads and results are
#: JSON already (checked when they entered): orjson takes them as they are, uncopied.
_ROBOT_JSON = make_converter()
_ROBOT_JSON.register_unstructure_hook_func(
    lambda t: t == JSONObject or t == (JSONObject | None), lambda value: value)


def _without_lease(robot: Robot) -> Robot:
    """A lease token never leaves the store."""
    return robot if robot.lease_token is None else attrs.evolve(robot, lease_token=None)


class CacheManager:
    def __init__(self, backend: CacheBackend, config: CacheConfig) -> None:
        self.backend = backend
        self.config = config
        self.prefix = config.key_prefix
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        # The memory backend holds robots as the immutable objects they are.
        self._in_process = backend if isinstance(backend, MemoryBackend) else None
        #: a shared backend that can publish: robots that end are announced on
        #: ``ended_channel`` (their ids, space-separated) with the write that caches them,
        #: so that processes waiting for them hear it at once (see ``remote_ends``)
        self.publisher = backend if isinstance(backend, Publisher) else None
        self.ended_channel = f"{self.prefix}robots:ended"
        # A shared backend gets robot states written behind the request path: the newest
        # state of each robot waits here (read back by this process) until ``run_writer``
        # serializes them and sends them all in one round trip. A robot that moves on
        # meanwhile (running, then succeeded) is serialized and sent once, in its newest state.
        self._pending: dict[str, Robot] = {}
        #: ids in ``_pending`` whose state must not replace an existing one (set_robots)
        self._pending_new: set[str] = set()
        self._pending_wake: anyio.Event | None = None
        #: set when a robot that ended waits to be written (and announced)
        self._ended_pending = anyio.Event()
        #: robot states written to the shared cache, and the round trips that carried them
        self.state_trips = RoundTrips()
        #: whether the last announcement reached a subscriber (a process waiting)
        self._ends_heard = False
        self._rate_checks = GroupCommitter(self._check_rates, first_turn=False)
        self._robot_reads = GroupCommitter(self._read_many, first_turn=False)
        self.breaker = CircuitBreaker(
            f"cache:{backend.name}",
            BreakerPolicy(failure_rate_threshold=0.5, window_size=20, minimum_calls=5,
                          open_seconds=5.0, half_open_max_calls=1),
        )

    @property
    def status(self) -> str:
        """``ok``, or ``degraded`` while the breaker keeps the backend out of the path."""
        return "ok" if self.breaker.state == "closed" else "degraded"

    def _failed(self, namespace: str, exc: BaseException) -> None:
        self.errors[namespace] += 1
        self.breaker.record_failure()
        log.warning("cache %s failed (%s); continuing without it", namespace, type(exc).__name__)

    async def get_bytes(self, namespace: str, key: str) -> bytes | None:
        return await self._get(namespace, key, self.backend.get)

    async def _get(self, namespace: str, key: str,
                   read: Callable[[str], Awaitable[bytes | None]]) -> bytes | None:
        if not self.breaker.allow():
            self.misses[namespace] += 1
            return None
        try:
            value = await read(f"{self.prefix}{namespace}:{key}")
        except Exception as exc:
            self._failed(namespace, exc)
            self.misses[namespace] += 1
            return None
        self.breaker.record_success()
        if value is None:
            self.misses[namespace] += 1
        else:
            self.hits[namespace] += 1
        return value

    async def set_bytes(self, namespace: str, key: str, value: bytes, ttl: float) -> None:
        if not self.breaker.allow():
            self.errors[namespace] += 1
            return
        try:
            await self.backend.set(f"{self.prefix}{namespace}:{key}", value, ttl)
        except Exception as exc:
            self._failed(namespace, exc)
            return
        self.breaker.record_success()

    async def delete(self, namespace: str, key: str) -> None:
        if namespace == "robot":
            self._pending.pop(key, None)
            self._pending_new.discard(key)
        if not self.breaker.allow():
            self.errors[namespace] += 1
            return
        try:
            await self.backend.delete(f"{self.prefix}{namespace}:{key}")
        except Exception as exc:
            self._failed(namespace, exc)
            return
        self.breaker.record_success()

    async def get_json(self, namespace: str, key: str) -> Any:
        raw = await self.get_bytes(namespace, key)
        return None if raw is None else json.loads(raw)

    async def set_json(self, namespace: str, key: str, value: Any, ttl: float) -> None:
        await self.set_bytes(namespace, key, json.dumps(value).encode(), ttl)

    # -- robots ------------------------------------------------------------------------

    async def get_robot(self, robot_id: str) -> Robot | None:
        if self._in_process is not None:
            # Same process, immutable objects: no need to serialize (the memory backend).
            found = self._in_process.get_object(f"{self.prefix}robot:{robot_id}")
            if found is None:
                self.misses["robot"] += 1
                return None
            self.hits["robot"] += 1
            return _without_lease(found) if isinstance(found, Robot) else None
        pending = self._pending.get(robot_id)
        if pending is not None:
            # Not yet in the shared cache: this process's own newest write (not a hit).
            return _without_lease(pending)
        # Status reads that arrive while one is on its way share the next round trip.
        raw = await self._get("robot", robot_id, self._robot_reads.write)
        if raw is None:
            return None
        try:
            return _ROBOT_JSON.structure(orjson.loads(raw), Robot)
        except Exception:  # an entry from another version: treat as a miss
            return None

    async def set_robot(self, robot: Robot) -> None:
        await self.set_robots([robot])

    async def set_robots(self, robots: Sequence[Robot], *, only_new: bool = False) -> None:
        """Cache robots' current state in one round trip (never their lease tokens).

        ``only_new``: states that must not replace one another process wrote meanwhile:
        a robot's first state (this process just created it) or one read from the store.
        On a shared cache, a worker elsewhere may finish a new robot before this
        process's write behind goes out; its ``succeeded`` must not turn back into
        ``queued`` for ``RFMVP_CACHE_TTL_ROBOT_STATUS``.
        """
        if self._in_process is not None:
            # As they are: get_robot strips a lease token on the way out (rarer than writes).
            for robot in robots:
                self._in_process.set_object(f"{self.prefix}robot:{robot.id}", robot,
                                            self._ttl(robot))
            return
        if self._pending_wake is None:
            await self._write_robots(robots, {r.id for r in robots} if only_new else set())
            return
        pending, pending_new = self._pending, self._pending_new
        for robot in robots:
            if only_new:
                if robot.id in pending and robot.id not in pending_new:
                    continue  # a change made here is newer
                pending_new.add(robot.id)
            else:
                pending_new.discard(robot.id)
                if robot.status.is_terminal and self.publisher is not None:
                    self._ended_pending.set()
            pending[robot.id] = robot
        self._pending_wake.set()

    def _ttl(self, robot: Robot) -> float:
        """A robot still moving is read often; a finished one rarely (and keeps in the store)."""
        config = self.config
        return config.ttl_robot_finished if robot.status.is_terminal \
            else config.ttl_robot_status

    async def _write_robots(self, robots: Sequence[Robot], only_new: set[str]) -> None:
        """Write robot states in one round trip with a ``Publisher`` (each key with its
        own TTL; states in ``only_new`` do not replace existing ones, and the robots that
        ended here are announced on ``ended_channel`` in the same trip), else in one
        round trip per TTL. A flush holds running and ended robots together, whose TTLs
        differ: one trip per TTL had been two script calls for most flushes."""
        if not self.breaker.allow():
            self.errors["robot"] += 1
            return
        items: list[tuple[str, bytes, float]] = []
        new: list[tuple[str, bytes, float]] = []
        ended: list[str] = []
        for robot in robots:
            data = _ROBOT_JSON.unstructure(robot)
            data["lease_token"] = None  # a lease token never leaves the store
            entry = (f"{self.prefix}robot:{robot.id}", orjson.dumps(data), self._ttl(robot))
            if robot.id in only_new:
                new.append(entry)
            else:
                items.append(entry)
                if robot.status.is_terminal:
                    ended.append(robot.id)
        try:
            if self.publisher is None:
                by_ttl: dict[float, list[tuple[str, bytes]]] = {}
                for key, value, ttl in items + new:
                    by_ttl.setdefault(ttl, []).append((key, value))
                for ttl, group in by_ttl.items():
                    await self.backend.set_many(group, ttl)
                    self.state_trips.batches += 1
            else:
                announce = (self.ended_channel, " ".join(ended).encode()) if ended else None
                heard_by = await self.publisher.write_many(items, new, announce)
                self.state_trips.batches += 1
                if announce is not None:
                    self._ends_heard = heard_by > 0
        except Exception as exc:
            self._failed("robot", exc)
            return
        self.state_trips.written += len(robots)
        self.breaker.record_success()

    async def run_writer(self) -> None:
        """Write robot states behind the request path until cancelled (then flush)."""
        self._pending_wake = anyio.Event()
        last_write = 0
        try:
            while True:
                await self._pending_wake.wait()
                # A moment's pause lets a robot's quick successive states (created,
                # running, succeeded) coalesce into one write of the newest. A robot that
                # ended cuts it short while its announcement has listeners (processes
                # waiting for robots run here) and writes are small: nothing more will
                # come for that robot. Under load, writes keep coming a pause apart.
                if self._ends_heard and last_write <= _SMALL_WRITE:
                    with anyio.move_on_after(_WRITE_BEHIND_SECONDS):
                        await self._ended_pending.wait()
                else:
                    await anyio.sleep(_WRITE_BEHIND_SECONDS)  # a cancel scope costs more
                last_write = len(self._pending)
                self._pending_wake = anyio.Event()
                self._ended_pending = anyio.Event()
                # A write under way finishes: cut off, the states it took would be lost
                # and the cache would keep an older one for its TTL.
                with anyio.CancelScope(shield=True):
                    await self._flush_pending()
        finally:
            self._pending_wake = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self._flush_pending()

    async def flush(self) -> None:
        """Write pending robot states to the shared cache now (tests, shutdown)."""
        await self._flush_pending()

    async def _flush_pending(self) -> None:
        if self._pending:
            robots, self._pending = list(self._pending.values()), {}
            only_new, self._pending_new = self._pending_new, set()
            await self._write_robots(robots, only_new)

    # -- rate limits -------------------------------------------------------------------

    async def rate_limit(self, key: str, count: int, period: float) -> RateDecision | None:
        """The shared decision, or None when the backend cannot answer (caller decides).

        On a shared backend, checks that arrive while one is on its way share the next
        round trip: one script call decides them all, in arrival order, as if each had
        been made alone (``rate_limit_many``). One call per request had cost a quarter
        of an API process's throughput on Redis.
        """
        if not self.breaker.allow():
            return None
        check = (f"{self.prefix}rl:{key}", count, period)
        try:
            if self._in_process is not None:
                decision = await self.backend.rate_limit(*check)
            else:
                decision = await self._rate_checks.write(check)
        except Exception as exc:
            self._failed("ratelimit", exc)
            return None
        self.breaker.record_success()
        return decision

    def group_commits(self) -> dict[str, SharesRoundTrips]:
        """The calls to a shared backend that share round trips, by name, for ``/metrics``:
        rate-limit checks, status reads, and robot states written behind."""
        return {"rate_limit_checks": self._rate_checks, "status_reads": self._robot_reads,
                "robot_states": self.state_trips}

    @property
    def pending_states(self) -> int:
        """Robot states waiting for the write behind (a backlog says the cache is slow)."""
        return len(self._pending)

    async def _read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await get_many(self.backend, keys)

    async def _check_rates(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        return await rate_limit_many(self.backend, checks)

    def purge_expired(self) -> int:
        """Drop expired entries of an in-process backend (Redis expires its own)."""
        purge = getattr(self.backend, "purge_expired", None)
        return int(purge()) if callable(purge) else 0

    def stats(self) -> dict[str, Any]:
        namespaces = sorted(set(self.hits) | set(self.misses) | set(self.errors))
        total_hits, total_misses = sum(self.hits.values()), sum(self.misses.values())
        lookups = total_hits + total_misses
        return {
            "backend": self.backend.name,
            "status": self.status,
            "hits": total_hits,
            "misses": total_misses,
            "errors": sum(self.errors.values()),
            "hit_ratio": (total_hits / lookups) if lookups else None,
            "by_namespace": {
                ns: {"hits": self.hits[ns], "misses": self.misses[ns], "errors": self.errors[ns]}
                for ns in namespaces
            },
        }
