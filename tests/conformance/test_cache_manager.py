"""Specification of the CacheManager over every cache backend, and over a failing Redis.

A cache never fails a request: with Redis unreachable reads are misses, writes are
dropped and counted, and the circuit breaker stops calling it. When Redis comes back
(a killed connection, a restart) the same backend object works again.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pytest
import redis
import redis.asyncio
from anyio.from_thread import start_blocking_portal
from hypothesis import given, settings
from hypothesis import strategies as st

from robotframework_mvp.cache.backend import RateDecision
from robotframework_mvp.cache.manager import CacheManager
from robotframework_mvp.cache.redis import RedisBackend
from robotframework_mvp.config import CacheConfig, Settings
from robotframework_mvp.models import (
    ErrorInfo,
    FollowUp,
    Robot,
    RobotStatus,
    converter,
    new_id,
)
from robotframework_mvp.plugins import BuiltinPlugin

pytestmark = pytest.mark.anyio


class CountingRedisBackend(RedisBackend):
    """A real RedisBackend that counts the calls that reach it."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self.calls += 1
        await super().set(key, value, ttl)

    async def delete(self, *keys: str) -> None:
        self.calls += 1
        await super().delete(*keys)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        return await super().get_many(keys)

    async def rate_limit(self, key: str, count: int, period: float, cost: int = 1
                         ) -> RateDecision:
        self.calls += 1
        return await super().rate_limit(key, count, period, cost)

    async def rate_limit_many(self, checks: Sequence[tuple[str, int, float]]
                              ) -> list[RateDecision]:
        self.calls += 1
        return await super().rate_limit_many(checks)

    async def write_many(self, *args: Any) -> int:
        self.calls += 1
        return await super().write_many(*args)


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def a_robot(**changes: Any) -> Robot:
    robot = Robot(
        id=new_id(),
        kind="echo",
        payload={"text": "héllo", "n": 3},
        owner="alice",
        tenant="acme",
        status=RobotStatus.RUNNING,
        module="echo-module",
        progress=0.5,
        attempts=1,
        error=ErrorInfo("Timeout", "took too long"),
        started_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        lease_token="lease-secret-token",
    )
    return attrs.evolve(robot, **changes)


@pytest.fixture
async def manager(
    cache_url: str, redis_prefix: str, anyio_backend: str
) -> AsyncIterator[CacheManager]:
    backend = BuiltinPlugin().cache_backend(cache_url, Settings())
    assert backend is not None
    await backend.open()
    try:
        yield CacheManager(backend, CacheConfig(key_prefix=redis_prefix))
    finally:
        await backend.close()


# --- over every backend -----------------------------------------------------------------


async def test_a_cached_robot_comes_back_equal_but_without_its_lease_token(
    manager: CacheManager,
) -> None:
    robot = a_robot()
    await manager.set_robot(robot)
    cached = await manager.get_robot(robot.id)
    assert cached == attrs.evolve(robot, lease_token=None)
    raw: object = await manager.get_bytes("robot", robot.id)
    assert raw is not None
    if isinstance(raw, bytes):  # a shared backend holds the serialized robot
        assert b"lease-secret-token" not in raw
    else:  # the memory backend holds the immutable object itself, in this process only
        assert isinstance(raw, Robot)
        assert raw.id == robot.id


async def test_a_finished_robot_leaves_the_cache_long_before_one_still_running(
    cache_url: str, redis_prefix: str,
) -> None:
    backend = BuiltinPlugin().cache_backend(cache_url, Settings())
    assert backend is not None
    await backend.open()
    try:
        manager = CacheManager(backend, CacheConfig(
            key_prefix=redis_prefix, ttl_robot_status=60.0, ttl_robot_finished=0.05))
        running = a_robot(lease_token=None)
        finished = a_robot(lease_token=None, status=RobotStatus.SUCCEEDED)
        await manager.set_robots([running, finished])
        assert await manager.get_robot(finished.id) == finished
        await anyio.sleep(0.2)  # four times the finished robot's TTL: it has expired
        assert await manager.get_robot(finished.id) is None
        assert await manager.get_robot(running.id) == running
    finally:
        await backend.close()


async def test_the_manager_counts_hits_and_misses_per_namespace(manager: CacheManager) -> None:
    robot = a_robot(lease_token=None)
    assert await manager.get_robot(robot.id) is None
    await manager.set_robot(robot)
    assert await manager.get_robot(robot.id) == robot
    assert await manager.get_json("stats", "daily") is None

    stats = manager.stats()
    assert (stats["hits"], stats["misses"], stats["errors"]) == (1, 2, 0)
    assert stats["hit_ratio"] == pytest.approx(1 / 3)
    assert stats["by_namespace"]["robot"] == {"hits": 1, "misses": 1, "errors": 0}
    assert stats["by_namespace"]["stats"] == {"hits": 0, "misses": 1, "errors": 0}
    assert stats["status"] == "ok"


async def test_json_entries_and_deletes_go_through_the_prefix(manager: CacheManager) -> None:
    await manager.set_json("choice", "echo", {"module": "m1"}, 60)
    assert await manager.get_json("choice", "echo") == {"module": "m1"}
    assert await manager.backend.get(f"{manager.prefix}choice:echo") is not None
    await manager.delete("choice", "echo")
    assert await manager.get_json("choice", "echo") is None


async def test_rate_limits_through_the_manager_are_shared_decisions(
    manager: CacheManager,
) -> None:
    decisions = [await manager.rate_limit("alice", 3, 60) for _ in range(4)]
    assert [d.allowed if d else None for d in decisions] == [True, True, True, False]


async def test_status_reads_arriving_together_share_a_round_trip_and_each_gets_its_robot(
    redis_url: str, redis_prefix: str,
) -> None:
    # What many pollers do: 30 reads at once, of 10 robots and of one never cached.
    writer = CountingRedisBackend(redis_url)
    reader = CountingRedisBackend(redis_url)  # another process: nothing pending locally
    await writer.open()
    await reader.open()
    try:
        robots = [a_robot(lease_token=None) for _ in range(10)]
        await CacheManager(writer, CacheConfig(key_prefix=redis_prefix)).set_robots(robots)
        manager = CacheManager(reader, CacheConfig(key_prefix=redis_prefix))
        wanted = [r.id for r in robots] * 3 + ["never-cached"]
        found: dict[int, Robot | None] = {}

        async def read(i: int) -> None:
            found[i] = await manager.get_robot(wanted[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(wanted)):
                tg.start_soon(read, i)
        by_id = {r.id: r for r in robots}
        assert found == {i: by_id.get(robot_id) for i, robot_id in enumerate(wanted)}
        assert reader.calls <= 2  # the first read, then one for the other 30
        assert (manager.hits["robot"], manager.misses["robot"]) == (30, 1)
    finally:
        await writer.close()
        await reader.close()


async def test_concurrent_rate_limit_checks_share_round_trips_and_admit_exactly_the_limit(
    redis_url: str, redis_prefix: str,
) -> None:
    # 40 requests of one principal at once against 5 a minute: those arriving while a
    # check is on its way go to Redis together, and still exactly 5 get in, each told
    # how many remain as if the checks had been made one after another.
    backend = CountingRedisBackend(redis_url)
    await backend.open()
    try:
        manager = CacheManager(backend, CacheConfig(key_prefix=redis_prefix))
        decisions: list[RateDecision | None] = []

        async def check() -> None:
            decisions.append(await manager.rate_limit("alice", 5, 60))

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(check)
        assert all(d is not None for d in decisions)
        admitted = [d for d in decisions if d is not None and d.allowed]
        refused = [d for d in decisions if d is not None and not d.allowed]
        assert sorted(d.remaining for d in admitted) == [0, 1, 2, 3, 4]
        assert len(refused) == 35
        assert all(d.remaining == 0 and d.retry_after > 0 for d in refused)
        assert backend.calls <= 2  # one round trip for the first, one for the rest
    finally:
        await backend.close()


# --- over a Redis nobody answers ---------------------------------------------------------


@pytest.fixture
async def dead_backend(anyio_backend: str) -> AsyncIterator[CountingRedisBackend]:
    backend = CountingRedisBackend(f"redis://127.0.0.1:{closed_port()}/0")
    await backend.open()  # must not raise: the manager copes with a dead cache
    try:
        yield backend
    finally:
        await backend.close()


async def test_opening_a_backend_on_a_dead_redis_warns_but_ping_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{closed_port()}/0")
    with caplog.at_level("WARNING", logger="robotframework_mvp.cache.redis"):
        await backend.open()
    try:
        assert "not reachable" in caplog.text
        with pytest.raises(redis.ConnectionError):
            await backend.ping()
    finally:
        await backend.close()


async def test_a_dead_redis_reads_as_misses_drops_writes_and_counts_errors(
    dead_backend: CountingRedisBackend,
) -> None:
    manager = CacheManager(dead_backend, CacheConfig())
    assert await manager.get_robot("r1") is None
    await manager.set_robot(a_robot(id="r1"))  # dropped, not raised
    assert await manager.rate_limit("alice", 5, 60) is None  # the caller decides

    stats = manager.stats()
    assert (stats["hits"], stats["misses"]) == (0, 1)
    assert stats["by_namespace"]["robot"]["errors"] == 2
    assert stats["errors"] == 3  # the rate limit's failure counts too
    assert manager.status == "ok"  # three failures are below the breaker's minimum


async def test_the_breaker_opens_on_a_dead_redis_and_stops_calling_it(
    dead_backend: CountingRedisBackend,
) -> None:
    manager = CacheManager(dead_backend, CacheConfig())
    minimum = manager.breaker.policy.minimum_calls
    for i in range(minimum):
        assert manager.status == "ok"
        assert await manager.get_bytes("robot", f"r{i}") is None
    assert manager.status == "degraded"
    assert dead_backend.calls == minimum

    for i in range(20):
        assert await manager.get_bytes("robot", f"again{i}") is None
        await manager.set_bytes("robot", f"again{i}", b"x", 60)
        await manager.delete("robot", f"again{i}")
    assert dead_backend.calls == minimum  # nothing reached the dead backend
    stats = manager.stats()
    assert stats["status"] == "degraded"
    assert stats["misses"] == minimum + 20
    assert stats["errors"] == minimum + 40  # refused writes and deletes are counted


# --- recovery with a real Redis ---------------------------------------------------------


async def set_then_get_until_it_works(manager: CacheManager, key: str) -> int:
    """Write and read back ``key`` until it works (5 s at most); the attempts it took."""
    attempts = 0
    with anyio.fail_after(5):
        while True:
            attempts += 1
            await manager.set_bytes("robot", key, b"value", 60)
            if await manager.get_bytes("robot", key) == b"value":
                return attempts
            await anyio.lowlevel.checkpoint()  # an open breaker answers without awaiting


async def burst(manager: CacheManager, tag: str, width: int = 8) -> None:
    """``width`` concurrent writes then reads (one pooled connection each); all must work."""
    async with anyio.create_task_group() as tg:
        for i in range(width):
            tg.start_soon(manager.set_bytes, "robot", f"{tag}{i}", b"v", 60)
    errors = manager.stats()["errors"]
    got: list[bytes | None] = []

    async def read(i: int) -> None:
        got.append(await manager.get_bytes("robot", f"{tag}{i}"))

    async with anyio.create_task_group() as tg:
        for i in range(width):
            tg.start_soon(read, i)
    assert got == [b"v"] * width
    assert manager.stats()["errors"] == errors


async def test_the_same_backend_works_again_after_redis_kills_its_connections(
    redis_url: str, redis_prefix: str
) -> None:
    name = f"rfmvp-test-{uuid.uuid4().hex[:8]}"
    backend = RedisBackend(redis_url, client_name=name)
    await backend.open()
    admin = redis.asyncio.Redis.from_url(redis_url)
    try:
        manager = CacheManager(backend, CacheConfig(key_prefix=redis_prefix))
        await burst(manager, "before")  # several connections in the pool, soon killed

        killed = {c["id"] for c in await admin.client_list() if c.get("name") == name}
        assert killed, "the backend's connections carry its client name"
        for client_id in killed:
            await admin.client_kill_filter(_id=client_id)

        assert await set_then_get_until_it_works(manager, "after") <= 2
        # Every pooled connection was dead: a burst that needs them all still succeeds.
        await burst(manager, "after")
        assert manager.stats()["errors"] <= 1
        assert manager.status == "ok"
        now_open = {c["id"] for c in await admin.client_list() if c.get("name") == name}
        assert now_open, "it reconnected, under its name"
        assert not now_open & killed
        assert (await backend.rate_limit(f"{redis_prefix}rl", 5, 60)).allowed
    finally:
        await admin.aclose()
        await backend.close()


class PrivateRedis:
    """A throwaway redis-server of our own, which a test may stop and start again."""

    def __init__(self, binary: str) -> None:
        self.port = closed_port()
        self.command = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def wait_for_ping(backend: RedisBackend) -> None:
    with anyio.fail_after(5):
        while True:
            try:
                await backend.ping()
                return
            except redis.ConnectionError:
                await anyio.sleep(0.02)


async def test_the_same_backend_works_again_after_a_redis_restart(
    private_redis: PrivateRedis, anyio_backend: str
) -> None:
    backend = RedisBackend(f"redis://127.0.0.1:{private_redis.port}/0")
    await backend.open()
    try:
        await wait_for_ping(backend)
        manager = CacheManager(backend, CacheConfig())
        await burst(manager, "before")  # several connections in the pool
        assert (await backend.rate_limit("rl", 5, 60)).remaining == 4

        await anyio.to_thread.run_sync(private_redis.stop)
        assert await manager.get_bytes("robot", "before0") is None  # down: a miss
        assert manager.stats()["errors"] == 1

        private_redis.start()
        await wait_for_ping(backend)
        assert await set_then_get_until_it_works(manager, "after") == 1
        await burst(manager, "after")  # every other pooled connection is stale too
        assert manager.stats()["errors"] == 1
        assert manager.status == "ok"
        # The restarted server knows no scripts: EVALSHA falls back to loading it.
        assert (await backend.rate_limit("rl", 5, 60)).remaining == 4
    finally:
        await backend.close()


# --- any robot, through every backend (property) ------------------------------------------

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                       st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
_json_object = st.dictionaries(
    st.text(max_size=8),
    st.recursive(_json_leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
        max_leaves=8),
    max_size=4)
_moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                        timezones=st.just(UTC))
_robots = st.builds(
    Robot, id=st.uuids().map(str), kind=st.text(min_size=1, max_size=10),
    payload=_json_object, owner=st.text(max_size=10), tenant=st.text(max_size=10),
    status=st.sampled_from(RobotStatus), module=st.none() | st.text(max_size=10),
    progress=st.floats(0, 100), progress_message=st.none() | st.text(max_size=20),
    attempts=st.integers(0, 10), result=st.none() | _json_object,
    error=st.none() | st.builds(ErrorInfo, st.text(max_size=10), st.text(max_size=30)),
    created_at=_moments, updated_at=_moments, started_at=st.none() | _moments,
    finished_at=st.none() | _moments, scheduled_at=_moments,
    lease_expires_at=st.none() | _moments, lease_token=st.none() | st.text(max_size=10),
    parent_id=st.none() | st.uuids().map(str),
    on_success=st.none() | st.builds(FollowUp, st.text(min_size=1, max_size=8), _json_object))


def test_any_robot_comes_back_from_every_cache_as_it_went_in_without_its_lease(
    cache_url: str, redis_prefix: str,
) -> None:
    """Shared caches hold robots as JSON, read by other processes (and versions): the
    document must be the robot's own JSON (``converter`` + ``json``) and read back equal."""
    with start_blocking_portal() as portal:
        backend = BuiltinPlugin().cache_backend(cache_url, Settings())
        assert backend is not None
        portal.call(backend.open)
        try:
            manager = CacheManager(backend, CacheConfig(key_prefix=redis_prefix))

            @settings(max_examples=60, deadline=None)
            @given(robot=_robots)
            def check(robot: Robot) -> None:
                portal.call(manager.set_robot, robot)
                assert portal.call(manager.get_robot, robot.id) == \
                    attrs.evolve(robot, lease_token=None)
                raw = portal.call(manager.get_bytes, "robot", robot.id)
                if isinstance(raw, bytes):
                    expected = converter.unstructure(robot) | {"lease_token": None}
                    assert json.loads(raw) == json.loads(json.dumps(expected))

            check()
        finally:
            portal.call(backend.close)


class GatedRedisBackend(RedisBackend):
    """A real RedisBackend whose batch writes wait until the test opens the gate."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.writing = anyio.Event()
        self.gate = anyio.Event()

    async def write_many(self, items: Sequence[tuple[str, bytes, float]],
                         only_new: Sequence[tuple[str, bytes, float]],
                         announce: tuple[str, bytes] | None = None) -> int:
        self.writing.set()
        await self.gate.wait()
        return await super().write_many(items, only_new, announce)


async def test_stopping_the_writer_mid_write_still_stores_the_newest_state(
    redis_url: str, redis_prefix: str,
) -> None:
    """States are written behind the request path; when the process stops during such a
    write, the write finishes: cut off, the cache would keep the robot's older state (say
    ``running`` for a robot that succeeded) for its TTL, for every process to read."""
    backend = GatedRedisBackend(redis_url)
    await backend.open()
    try:
        manager = CacheManager(backend, CacheConfig(key_prefix=redis_prefix))
        robot = a_robot(status=RobotStatus.SUCCEEDED)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(manager.run_writer)
                await anyio.wait_all_tasks_blocked()
                await manager.set_robot(robot)
                await backend.writing.wait()
                tg.cancel_scope.cancel()  # the process stops mid-write
                backend.gate.set()
        reader = CacheManager(RedisBackend(redis_url), CacheConfig(key_prefix=redis_prefix))
        await reader.backend.open()
        try:
            cached = await reader.get_robot(robot.id)
        finally:
            await reader.backend.close()
        assert cached is not None
        assert cached.status is RobotStatus.SUCCEEDED
    finally:
        await backend.close()


# --- states written by several processes (Redis) -----------------------------------------


@pytest.fixture
async def two_processes(
    redis_url: str, redis_prefix: str, anyio_backend: str
) -> AsyncIterator[tuple[CacheManager, CacheManager]]:
    """Two managers on one Redis and prefix: an API process and a worker process."""
    backends = [RedisBackend(redis_url), RedisBackend(redis_url)]
    for backend in backends:
        await backend.open()
    try:
        yield (CacheManager(backends[0], CacheConfig(key_prefix=redis_prefix)),
               CacheManager(backends[1], CacheConfig(key_prefix=redis_prefix)))
    finally:
        for backend in backends:
            await backend.close()


@asynccontextmanager
async def writing_behind(manager: CacheManager) -> AsyncIterator[None]:
    """The manager's writer running, as in an orchestrator: robot states wait in it."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(manager.run_writer)
        await anyio.wait_all_tasks_blocked()
        yield
        tg.cancel_scope.cancel()


async def cached_status(manager: CacheManager, robot_id: str) -> RobotStatus | None:
    cached = await manager.get_robot(robot_id)
    return None if cached is None else cached.status


@pytest.mark.parametrize("behind", [False, True], ids=["written-at-once", "written-behind"])
async def test_a_new_robots_first_state_never_replaces_what_another_process_wrote(
    two_processes: tuple[CacheManager, CacheManager], behind: bool,
) -> None:
    """The API process caches a robot it created as queued, behind the request path; a
    worker elsewhere may finish it first. Its ``succeeded`` must stay: read back as
    ``queued`` it would be wrong for RFMVP_CACHE_TTL_ROBOT_STATUS (30 s)."""
    api, worker = two_processes
    robot = a_robot(status=RobotStatus.QUEUED, attempts=0, lease_token=None)
    succeeded = attrs.evolve(robot, status=RobotStatus.SUCCEEDED, attempts=1)
    if behind:
        async with writing_behind(api):
            await api.set_robots([robot], only_new=True)  # waits in the writer
            await worker.set_robots([succeeded])
            await api.flush()
    else:
        await worker.set_robots([succeeded])
        await api.set_robots([robot], only_new=True)
    assert await cached_status(api, robot.id) is RobotStatus.SUCCEEDED


async def test_a_change_made_here_replaces_a_first_state_still_waiting_to_be_written(
    two_processes: tuple[CacheManager, CacheManager],
) -> None:
    api, _ = two_processes
    robot = a_robot(status=RobotStatus.QUEUED, attempts=0, lease_token=None)
    running = attrs.evolve(robot, status=RobotStatus.RUNNING, attempts=1)
    async with writing_behind(api):
        await api.set_robots([robot], only_new=True)
        await api.set_robots([running])
        await api.set_robots([robot], only_new=True)  # a late read: older than the change
        await api.flush()
    assert await cached_status(api, robot.id) is RobotStatus.RUNNING


async def test_states_written_behind_go_in_one_round_trip_each_with_its_own_ttl(
    redis_url: str, redis_prefix: str,
) -> None:
    """A flush holds running robots, ended ones (a far shorter TTL) and first states: one
    script call for all of them, not one per TTL (the backend's conformance tests check
    that each key gets its own expiry)."""
    backend = CountingRedisBackend(redis_url)
    await backend.open()
    try:
        manager = CacheManager(backend, CacheConfig(key_prefix=redis_prefix))
        assert manager.config.ttl_robot_status != manager.config.ttl_robot_finished
        running, finished, first = (
            a_robot(lease_token=None),
            a_robot(lease_token=None, status=RobotStatus.SUCCEEDED),
            a_robot(lease_token=None, status=RobotStatus.QUEUED, attempts=0))
        before = backend.calls
        async with writing_behind(manager):
            await manager.set_robots([running, finished])
            await manager.set_robots([first], only_new=True)
            await manager.flush()
        assert backend.calls - before == 1
        for robot in (running, finished, first):
            assert await manager.get_robot(robot.id) == robot
    finally:
        await backend.close()


class PlainSharedBackend:
    """A shared cache backend with only the CacheBackend methods (no Publisher), as a
    third-party plugin may be: Redis underneath, counting the set_many calls by TTL."""

    name = "plain"

    def __init__(self, url: str) -> None:
        self.redis = RedisBackend(url)
        self.set_many_ttls: list[float] = []

    async def open(self) -> None:
        await self.redis.open()

    async def close(self) -> None:
        await self.redis.close()

    async def ping(self) -> None:
        await self.redis.ping()

    async def get(self, key: str) -> bytes | None:
        return await self.redis.get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self.redis.set(key, value, ttl)

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        self.set_many_ttls.append(ttl)
        await self.redis.set_many(items, ttl)

    async def delete(self, *keys: str) -> None:
        await self.redis.delete(*keys)

    async def rate_limit(self, key: str, count: int, period: float, cost: int = 1
                         ) -> RateDecision:
        return await self.redis.rate_limit(key, count, period, cost)


async def test_a_shared_backend_without_publisher_gets_one_set_many_per_ttl(
    redis_url: str, redis_prefix: str,
) -> None:
    backend = PlainSharedBackend(redis_url)
    await backend.open()
    try:
        manager = CacheManager(backend, CacheConfig(key_prefix=redis_prefix))
        assert manager.publisher is None
        running = a_robot(lease_token=None)
        finished = a_robot(lease_token=None, status=RobotStatus.SUCCEEDED)
        async with writing_behind(manager):
            await manager.set_robots([running, finished, a_robot(lease_token=None)])
            await manager.flush()
        config = manager.config
        assert sorted(backend.set_many_ttls) == sorted(
            [config.ttl_robot_status, config.ttl_robot_finished])
        assert await manager.get_robot(running.id) == running
        assert await manager.get_robot(finished.id) == finished
        trips = manager.group_commits()["robot_states"]
        assert (trips.batches, trips.written) == (2, 3)
    finally:
        await backend.close()


async def test_the_write_behind_counts_its_round_trips_and_the_states_it_holds(
    two_processes: tuple[CacheManager, CacheManager],
) -> None:
    # For /metrics: rfmvp_shared_round_trips{kind="robot_states"} and
    # rfmvp_cache_robot_states_pending (a backlog says the cache is slow).
    manager, _ = two_processes
    robots = [a_robot(lease_token=None) for _ in range(3)]
    async with writing_behind(manager):
        await manager.set_robots(robots)
        await manager.set_robots([attrs.evolve(robots[0], status=RobotStatus.SUCCEEDED)])
        assert manager.pending_states == 3  # the newest state of each robot
        await manager.flush()
        assert manager.pending_states == 0
    trips = manager.group_commits()["robot_states"]
    assert (trips.batches, trips.written) == (1, 3)


async def test_robots_that_end_are_announced_with_their_write_and_reads_are_not(
    two_processes: tuple[CacheManager, CacheManager],
) -> None:
    api, worker = two_processes
    assert api.publisher is not None
    ended = a_robot(status=RobotStatus.SUCCEEDED)
    failed = a_robot(status=RobotStatus.FAILED)
    async with api.publisher.subscribe(api.ended_channel) as subscription:
        await worker.set_robots([a_robot(status=RobotStatus.RUNNING)])  # not ended
        await worker.set_robots([a_robot(status=RobotStatus.SUCCEEDED)], only_new=True)  # read
        await worker.set_robots([ended, failed])
        with anyio.fail_after(5):
            message = await subscription.receive(5)
        assert message is not None
        assert sorted(message.decode().split()) == sorted([ended.id, failed.id])
        assert await subscription.receive(0.05) is None  # nothing else was announced
