"""Graceful degradation, each case breaking a real dependency with a fault proxy or by
killing our own server-side sessions (never the shared servers themselves)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import anyio
import pytest
from killers import REDIS_URL, kill_redis_clients, terminate_backends
from proxy import FaultProxy

from robotframework_mvp import (
    ModuleContext,
    Robot,
    RobotStatus,
    ServiceUnavailableError,
    SubmitRequest,
    module,
)
from robotframework_mvp.errors import StoreUnavailableError
from robotframework_mvp.http import HttpApi
from robotframework_mvp.metrics import render_metrics
from robotframework_mvp.models import ExecutionStatus
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator, test_settings

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@module("echo", capacity=10)
async def echo(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"echo": robot.payload}


async def eventually(condition: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(interval)


def cache_hits(orch: Orchestrator) -> int:
    return int(orch.cache.stats()["hits"])


# -- Redis -----------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_gone_mid_run_requests_keep_succeeding_and_the_cache_comes_back(
    sqlite_url: str, redis_proxy: FaultProxy, redis_prefix: str,
) -> None:
    settings = test_settings(sqlite_url, cache={"url": redis_proxy.url(REDIS_URL),
                                                "key_prefix": redis_prefix})
    async with running_orchestrator(echo, settings=settings) as orch:
        first = await orch.process_robot("echo", {"n": 0}, api_key=TEST_API_KEY, timeout=10)
        await orch.cache.flush()  # states are written behind; make this one land now
        hits = cache_hits(orch)
        assert (await orch.get(first.id, api_key=TEST_API_KEY)).status is RobotStatus.SUCCEEDED
        assert cache_hits(orch) == hits + 1, "the status came from Redis"

        redis_proxy.down()  # Redis "stops": refused, and its connections dropped
        for n in range(1, 21):
            robot = await orch.process_robot("echo", {"n": n}, api_key=TEST_API_KEY,
                                             timeout=10)
            assert robot.status is RobotStatus.SUCCEEDED
            # Each state goes to Redis now, not whenever the writer wakes: robots run fast
            # enough for its 5 ms batches to fold all 20 into too few writes to judge by.
            await orch.cache.flush()
            assert (await orch.get(robot.id, api_key=TEST_API_KEY)).result == {"echo": {"n": n}}
        assert orch.cache.status == "degraded", "the cache's breaker keeps Redis out"
        health = await HttpApi(orch).health()
        assert health.status == 200
        assert health.body["status"] == "degraded"
        assert health.body["components"]["cache"]["status"] == "degraded"
        assert health.body["components"]["cache"]["circuit"]["state"] in ("open", "half_open")
        assert health.body["components"]["store"]["status"] == "ok"

        redis_proxy.resume()
        # Without a restart: the breaker lets a trial through after its open period, the
        # client reconnects, and reads are served from Redis again.
        async def cached_again() -> bool:
            robot = await orch.process_robot("echo", {}, api_key=TEST_API_KEY, timeout=10)
            await orch.cache.flush()
            before = cache_hits(orch)
            await orch.get(robot.id, api_key=TEST_API_KEY)
            return cache_hits(orch) == before + 1

        await eventually(cached_again, 20, "reads from Redis again", interval=0.25)
        assert orch.cache.status == "ok"
        assert (await orch.health())["components"]["cache"]["status"] == "ok"
        assert redis_proxy.accepted >= 2, "the client reconnected through the proxy"


@pytest.mark.redis
async def test_killed_redis_connections_are_replaced_without_a_restart(
    sqlite_url: str, redis_prefix: str,
) -> None:
    name = f"rfmvp_{redis_prefix.split(':')[1]}"
    settings = test_settings(sqlite_url, cache={"url": f"{REDIS_URL}?client_name={name}",
                                                "key_prefix": redis_prefix})
    async with running_orchestrator(echo, settings=settings) as orch:
        robot = await orch.process_robot("echo", {}, api_key=TEST_API_KEY, timeout=10)
        await orch.cache.flush()
        assert await kill_redis_clients(name) >= 1
        for _ in range(5):
            assert (await orch.get(robot.id, api_key=TEST_API_KEY)).id == robot.id
        hits = cache_hits(orch)
        await orch.get(robot.id, api_key=TEST_API_KEY)
        assert cache_hits(orch) == hits + 1


# -- the read replica ------------------------------------------------------------------


async def test_an_unreachable_replica_moves_reads_to_the_write_pool_and_back(
    postgres_url: str, pg_proxy: FaultProxy,
) -> None:
    settings = test_settings(postgres_url, storage={"read_url": pg_proxy.url(postgres_url),
                                                    "replica_retry_seconds": 0.3})
    async with running_orchestrator(echo, settings=settings) as orch:
        robot = await orch.process_robot("echo", {}, api_key=TEST_API_KEY, timeout=10)
        driver: Any = orch.driver
        assert pg_proxy.accepted >= 1, "the read pool goes through the proxy"
        assert driver.read_fallbacks == 0

        pg_proxy.down()
        for _ in range(10):
            page = await orch.list(api_key=TEST_API_KEY)
            assert [r.id for r in page.items] == [robot.id]
            executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
            assert len(executions) == 1
        assert driver.read_fallbacks >= 10
        health = await orch.health()
        read_pool = health["components"]["store"]["read_pool"]
        assert read_pool["state"] in ("open", "half_open")
        assert read_pool["fallbacks"] >= 10
        assert health["components"]["store"]["status"] == "degraded"
        assert health["status"] == "degraded"
        metrics = await render_metrics(orch)
        assert "rfmvp_store_read_fallbacks_total" in metrics
        assert 'rfmvp_circuit_state{name="store:read",state="closed"} 0.0' in metrics

        pg_proxy.resume()

        async def back() -> bool:
            await orch.list(api_key=TEST_API_KEY)
            return bool(driver.read_breaker.state.value == "closed")

        await eventually(back, 20, "reads from the replica again", interval=0.1)
        fallbacks = driver.read_fallbacks
        for _ in range(5):
            await orch.list(api_key=TEST_API_KEY)
        assert driver.read_fallbacks == fallbacks, "reads use the replica again"
        assert (await orch.health())["components"]["store"]["status"] == "ok"


# -- PostgreSQL sessions killed mid-run ---------------------------------------------------


async def test_killed_postgres_sessions_mid_run_lose_and_duplicate_no_robot(
    postgres_url: str,
) -> None:
    successes: Counter[str] = Counter()

    @module("tally", capacity=10, max_attempts=10)
    async def tally(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        await anyio.sleep(0.005 * (hash(robot.id) % 5))
        successes[robot.id] += 1
        return {}

    settings = test_settings(postgres_url, worker={"lease_seconds": 2.0},
                             background={"reaper_interval": 0.2})
    async with running_orchestrator(tally, settings=settings) as orch:
        name = orch.driver.application_name  # type: ignore[attr-defined]
        robots = await orch.submit_many([SubmitRequest(kind="tally", payload={"i": i})
                                         for i in range(300)], api_key=TEST_API_KEY)
        ids = {r.id for r in robots}
        kills = 0

        async def terminal() -> bool:
            try:
                counts = await orch.driver.count_robots()
            except ServiceUnavailableError:
                return False
            return counts.get(("tally", "succeeded"), 0) == len(ids)

        with anyio.fail_after(60):
            while not await terminal():
                kills += await terminate_backends(name)
                await anyio.sleep(0.1)
        print("KILLS", kills, orch.driver.availability.probes, orch.driver.pool_stats())
        assert kills >= 5, "the sessions were killed while robots ran"
        assert set(successes) == ids, "no robot lost"
        assert max(successes.values()) == 1, "no robot ran to success twice"
        for robot_id in list(ids)[:50]:
            robot = await orch.state.get_robot(robot_id, fresh=True)
            assert robot is not None
            executions = await orch.state.list_executions(robot_id)
            charged = [e for e in executions if e.status is not ExecutionStatus.RELEASED]
            assert len(charged) == robot.attempts
        # The pool recovered: a new robot runs at once.
        after = await orch.process_robot("tally", {}, api_key=TEST_API_KEY, timeout=10)
        assert after.status is RobotStatus.SUCCEEDED


# -- PostgreSQL down -------------------------------------------------------------------


async def test_postgres_down_fails_submissions_fast_with_503_and_work_resumes_after(
    postgres_url: str, pg_proxy: FaultProxy,
) -> None:
    settings = test_settings(pg_proxy.url(postgres_url), storage={"breaker_open_seconds": 0.5})
    async with running_orchestrator(echo, settings=settings) as orch:
        api = HttpApi(orch)
        before = await orch.process_robot("echo", {"n": 0}, api_key=TEST_API_KEY, timeout=10)
        assert before.status is RobotStatus.SUCCEEDED

        pg_proxy.down()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            await orch.submit("echo", {"n": 1}, api_key=TEST_API_KEY)
        assert time.monotonic() - started < 3.0, "a down store fails fast"
        assert isinstance(caught.value, ServiceUnavailableError)
        assert caught.value.status == 503
        assert "the store is unavailable" in caught.value.message
        assert "retry later" in caught.value.message

        # While the breaker is open, every call fails at once.
        for n in range(5):
            started = time.monotonic()
            response = await api.submit_robot(
                json.dumps({"kind": "echo", "payload": {"n": n}}).encode(),
                {"X-API-Key": TEST_API_KEY}, "127.0.0.1")
            assert time.monotonic() - started < 3.0
            assert response.status == 503
            assert response.body["error"]["type"] == "service_unavailable"
            assert "the store is unavailable" in response.body["error"]["message"]
            assert int(response.headers["Retry-After"]) >= 1
        health = await api.health()
        assert health.status == 503
        assert health.body["components"]["store"]["status"] == "down"
        ready = await api.ready()
        assert ready.status == 503
        metrics = await api.metrics()
        assert metrics.status == 200, "metrics still answer, without the store's figures"
        assert 'rfmvp_circuit_state{name="store:write",state="closed"} 0.0' in metrics.body

        pg_proxy.resume()

        async def accepted() -> Robot | None:
            try:
                return await orch.submit("echo", {"n": "after"}, api_key=TEST_API_KEY)
            except ServiceUnavailableError:
                return None

        robot = await eventually(accepted, 15, "submissions to be accepted again", 0.1)
        done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=15)
        assert done.status is RobotStatus.SUCCEEDED
        assert (await api.health()).status == 200
        # Nothing was half-written: only the robots before and after the outage exist.
        counts = await orch.driver.count_robots()
        assert sum(counts.values()) == 2
        assert counts == {("echo", "succeeded"): 2}


async def test_postgres_unreachable_without_an_answer_still_fails_within_the_probe_timeout(
    postgres_url: str, pg_proxy: FaultProxy,
) -> None:
    """Packets dropped instead of refused: the probe gives up after 2 s, not the pool
    after RFMVP_STORAGE_TIMEOUT (10 s)."""
    settings = test_settings(pg_proxy.url(postgres_url), storage={"breaker_open_seconds": 5})
    async with running_orchestrator(echo, settings=settings) as orch:
        await orch.process_robot("echo", {}, api_key=TEST_API_KEY, timeout=10)
        pg_proxy.pause(hang=True)
        pg_proxy.sever()
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await orch.submit("echo", {}, api_key=TEST_API_KEY)
        assert time.monotonic() - started < 3.5
        started = time.monotonic()
        health = await HttpApi(orch).health()
        assert health.status == 503
        assert time.monotonic() - started < 0.5, "while open, the store fails at once"
        pg_proxy.resume()
        pg_proxy.sever()  # drop the hanging connections
