"""Operations, end to end: alerts reach ``on_alert``, one process leads and leadership
moves when it dies, the leader scores modules from every process's attempts, steps are
traced, and every metric family is documented.

Tests wait on conditions under ``anyio.fail_after``; the bounds are the promises made in
docs/operations.md (a new leader within a few ``RFMVP_LEADER_INTERVAL``).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from robotframework_mvp import Orchestrator, hookimpl, module
from robotframework_mvp.leader import FileLock, RedisLock
from robotframework_mvp.metrics import render_metrics
from robotframework_mvp.performance import OPERATIONS, Alert
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator, test_settings

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
LEADER = {"leader_interval": 0.1}


@module("work", kinds=["work"])
async def work(robot: Any, ctx: Any) -> dict[str, Any]:
    await ctx.progress(50, "half way")
    if robot.payload.get("fail"):
        raise RuntimeError("asked to fail")
    return {"ok": True}


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - polling another object's state
            await anyio.sleep(0.02)


def _leaders(orchs: list[Orchestrator]) -> list[Orchestrator]:
    return [o for o in orchs if o.background.leader.is_leader]


@asynccontextmanager
async def _pair(storage_url: str, **changes: Any) -> AsyncIterator[list[Orchestrator]]:
    async with AsyncExitStack() as stack:
        orchs = [await stack.enter_async_context(Orchestrator(
            test_settings(storage_url, worker={"enabled": False}, background=LEADER,
                          **changes), modules=[work])) for _ in range(2)]
        yield orchs


# -- alerts ------------------------------------------------------------------------------


async def test_an_anomaly_reaches_on_alert_once_and_its_end_once(sqlite_url: str) -> None:
    seen: list[Alert] = []

    class Watcher:
        @hookimpl
        async def on_alert(self, alert: Alert) -> None:
            seen.append(alert)

    async with running_orchestrator(
            work, settings=test_settings(sqlite_url, performance={"alert_min_samples": 20,
                                                               "window_size": 100}),
            plugins=[Watcher()]) as orch:
        for _ in range(100):
            orch.tracker.record("state.create_robot", 4.0)
        await orch.background.alerts_once()  # the baseline
        for _ in range(100):
            orch.tracker.record("state.create_robot", 80.0)
        await orch.background.alerts_once()
        await orch.background.alerts_once()  # still anomalous: nothing new
        assert [(a.key, a.active) for a in seen] == [("latency:state.create_robot", True)]
        text = await render_metrics(orch)
        assert ('rfmvp_alerts_active{key="latency:state.create_robot",kind="latency",'
                'operation="state.create_robot"} 1.0') in text
        health = await orch.health()
        assert health["components"]["alerts"]["active"] == ["latency:state.create_robot"]
        assert health["status"] == "ok"  # an alert does not make the instance degraded

        for _ in range(100):
            orch.tracker.record("state.create_robot", 4.0)
        await orch.background.alerts_once()
        assert [(a.key, a.active) for a in seen] == [("latency:state.create_robot", True),
                                                      ("latency:state.create_robot", False)]
        assert "rfmvp_alerts_active{" not in await render_metrics(orch)


# -- leader election -----------------------------------------------------------------------


async def test_one_of_two_postgres_processes_leads_and_a_killed_leader_is_replaced(
    postgres_url: str,
) -> None:
    import psycopg

    async with _pair(postgres_url) as orchs:
        await _until(lambda: len(_leaders(orchs)) == 1, 5, "a leader")
        assert all(o.background.leader.backend == "postgresql" for o in orchs)
        (old,) = _leaders(orchs)
        # Kill the leader's lock connection from outside, as a dead host or a DBA would.
        async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as c:
            cur = await c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND classid = %s AND objsubid = 2 AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " AND objid::integer = hashtext(current_schema())",
                (0x5246_4D03,))
            assert len(await cur.fetchall()) == 1
        new = next(o for o in orchs if o is not old)
        await _until(lambda: new.background.leader.is_leader, 5, "the other to lead")
        await _until(lambda: not old.background.leader.is_leader, 5, "the old one to stop")
        await anyio.sleep(0.5)  # several rounds: the old one reconnects but cannot take it
        assert _leaders(orchs) == [new]
        assert await new.background.leader.confirm()
        assert (await old.health())["components"]["leader"]["leader"] is False


class Process:
    """An orchestrator in a task of its own, so any one of several can stop first."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.stop = anyio.Event()
        self.stopped = anyio.Event()
        self.orch: Orchestrator | None = None

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with Orchestrator(self.settings, modules=[work]) as orch:
                self.orch = orch
                task_status.started()
                await self.stop.wait()
        finally:
            self.stopped.set()


async def _leadership_moves_when_the_leader_stops(settings: Any, backend: str) -> None:
    processes = [Process(settings), Process(settings)]
    async with anyio.create_task_group() as tg:
        for process in processes:
            await tg.start(process.run)
        orchs = [p.orch for p in processes if p.orch is not None]
        assert all(o.background.leader.backend == backend for o in orchs)
        await _until(lambda: len(_leaders(orchs)) == 1, 5, "a leader")
        await anyio.sleep(0.5)  # several rounds: still exactly one
        assert len(_leaders(orchs)) == 1
        leader = next(p for p in processes if p.orch is _leaders(orchs)[0])
        other = next(p for p in processes if p is not leader)
        assert other.orch is not None
        leader.stop.set()
        await leader.stopped.wait()
        await _until(lambda: other.orch is not None and other.orch.background.leader.is_leader,
                     5, "the other to lead")
        other.stop.set()


async def test_when_the_postgres_leader_stops_another_process_takes_over(
    postgres_url: str,
) -> None:
    await _leadership_moves_when_the_leader_stops(
        test_settings(postgres_url, worker={"enabled": False}, background=LEADER),
        "postgresql")


async def test_with_redis_one_process_leads_and_leadership_moves_when_it_stops(
    tmp_path: Path, redis_url: str, redis_prefix: str,
) -> None:
    await _leadership_moves_when_the_leader_stops(
        test_settings(f"sqlite:///{tmp_path / 'robots.db'}", worker={"enabled": False},
                      background=LEADER, cache={"url": redis_url, "key_prefix": redis_prefix}),
        "redis")


async def test_with_sqlite_processes_share_a_lock_file_and_leadership_moves(
    sqlite_url: str,
) -> None:
    await _leadership_moves_when_the_leader_stops(
        test_settings(sqlite_url, worker={"enabled": False}, background=LEADER), "file")


async def test_a_redis_lock_whose_holder_died_expires_and_passes_on(
    redis_url: str, redis_prefix: str,
) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        key = f"{redis_prefix}leader"
        holder, other = RedisLock(client, key, ttl=0.5), RedisLock(client, key, ttl=0.5)
        assert await holder.hold()
        assert not await other.hold()
        assert await holder.hold()  # extends its own lock
        # The holder dies: it stops extending, and never releases.
        with anyio.fail_after(3):
            while not await other.hold():  # noqa: ASYNC110 - waiting for the TTL
                await anyio.sleep(0.05)
        assert not await holder.check()
        assert not await holder.hold()  # it cannot extend what passed to another
        await holder.release()  # and releasing does not delete the new holder's lock
        assert await other.check()
        await other.release()
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


async def test_a_file_lock_admits_one_holder_and_frees_on_release(tmp_path: Path) -> None:
    path = str(tmp_path / "robots.db.leader")
    a, b = FileLock(path), FileLock(path)
    assert await a.hold()
    assert not await b.hold()
    await a.release()
    assert await b.hold()
    await b.release()


async def test_only_the_leader_cleans_up_and_scores(sqlite_url: str) -> None:
    async with _pair(sqlite_url) as orchs:
        await _until(lambda: len(_leaders(orchs)) == 1, 5, "a leader")
        assert all(o.background.leader.backend == "file" for o in orchs)
        (leader,) = _leaders(orchs)
        follower = next(o for o in orchs if o is not leader)
        for orch in orchs:
            await orch.background.cleanup_once()
            await orch.background.score_once()
        assert follower.background.skipped == {"cleanup": 1, "scores": 1}
        assert leader.background.skipped == {}
        metrics = await render_metrics(follower)
        assert 'rfmvp_leader{backend="file"} 0.0' in metrics
        assert 'rfmvp_background_skipped_total{loop="cleanup"} 1.0' in metrics or \
            "rfmvp_background_skipped_total" in metrics


# -- fleet scoring -------------------------------------------------------------------------


async def test_the_leader_scores_stored_modules_from_every_process_attempts(
    storage_url: str,
) -> None:
    settings = test_settings(storage_url, resilience={"default_max_attempts": 1})
    async with running_orchestrator(work, settings=settings) as orch:
        for i in range(10):
            robot = await orch.process_robot("work", {"fail": i < 4}, api_key=TEST_API_KEY,
                                             timeout=10)
            assert robot.is_terminal
        before = {r.name: r for r in await orch.state.list_modules()}["work"]
        await orch.background.score_fleet_once()
        after = {r.name: r for r in await orch.state.list_modules()}["work"]
        assert after.success_rate == pytest.approx(0.6)
        assert after.latency_ewma_ms is not None
        assert after.score < before.score
        assert after.updated_at == before.updated_at  # staleness stays the processes' own


# -- tracing -------------------------------------------------------------------------------


async def test_each_step_is_an_opentelemetry_span_named_after_its_operation(
    sqlite_url: str,
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        async with running_orchestrator(work, settings=test_settings(sqlite_url)) as orch:
            robot = await orch.process_robot("work", {}, api_key=TEST_API_KEY, timeout=10)
            assert robot.status == "succeeded"
        spans = exporter.get_finished_spans()
        names = {span.name for span in spans}
        assert set(OPERATIONS) <= names, names
        process = next(s for s in spans if s.name == "module.process")
        assert process.attributes is not None
        assert process.attributes["rfmvp.operation"] == "module.process"
    finally:
        exporter.clear()
        exporter.shutdown()


# -- metrics -------------------------------------------------------------------------------


async def test_every_metric_family_emitted_is_documented_in_operations_md(
    postgres_url: str,
) -> None:
    doc = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    async with running_orchestrator(work, settings=test_settings(postgres_url)) as orch:
        await orch.process_robot("work", {}, api_key=TEST_API_KEY, timeout=10)
        for _ in range(60):
            orch.tracker.record("state.create_robot", 1.0)
        await orch.background.alerts_once()
        text = await render_metrics(orch)
    families = re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE)
    assert "rfmvp_store_pool" in families
    assert "rfmvp_leader" in families
    missing = [name for name in families if f"`{name}`" not in doc]
    assert not missing, f"docs/operations.md does not document: {missing}"


async def test_the_metrics_show_how_many_calls_each_shared_round_trip_served(
    sqlite_url: str,
) -> None:
    async with running_orchestrator(work, settings=test_settings(sqlite_url)) as orch:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(functools.partial(
                    orch.process_robot, "work", {}, api_key=TEST_API_KEY, timeout=10))
        text = await render_metrics(orch)

    def shared(family: str, kind: str) -> float:
        found = re.search(rf'^{family}_total{{kind="{kind}"}} (\S+)$', text, re.MULTILINE)
        assert found is not None, f"{family} {kind} missing"
        return float(found.group(1))

    completed = shared("rfmvp_shared_round_trip_items", "completions")
    assert completed == 20  # each robot's completion, once
    assert 1 <= shared("rfmvp_shared_round_trips", "completions") <= completed
    for kind in ("progress", "submissions", "submissions_claimed", "rate_limit_checks",
                 "status_reads", "stored_key_reads"):
        assert shared("rfmvp_shared_round_trips", kind) <= shared(
            "rfmvp_shared_round_trip_items", kind)


async def test_a_held_up_event_loop_shows_in_the_loop_lag_metrics(sqlite_url: str) -> None:
    async with running_orchestrator(work, settings=test_settings(
            sqlite_url, background={"loop_lag_interval": 0.005})) as orch:
        await _until(lambda: orch.loop_lag.samples >= 2, 5, "the monitor's first samples")
        before = orch.loop_lag.samples
        time.sleep(0.06)  # noqa: ASYNC251 - a callback that holds the loop for 60 ms
        await _until(lambda: orch.loop_lag.samples > before, 5, "a sample after the hold")
        text = await render_metrics(orch)
    worst = re.search(r'^rfmvp_event_loop_lag_recent_seconds\{quantile="1"\} (\S+)$', text,
                      flags=re.MULTILINE)
    assert worst is not None
    assert float(worst.group(1)) >= 0.055  # the 60 ms less the interval
    count = re.search(r"^rfmvp_event_loop_lag_seconds_count (\S+)$", text, flags=re.MULTILINE)
    assert count is not None
    assert float(count.group(1)) >= 3


# -- stopping ------------------------------------------------------------------------------


async def test_a_background_round_under_way_at_the_stop_finishes_on_an_open_store(
    storage_url: str,
) -> None:
    """Stopping the orchestrator lets a background round end instead of cutting it off
    mid-statement (on PostgreSQL, psycopg then cancels the query on the server and closes
    the connection); the store stays open until it has."""
    entered = anyio.Event()
    finished: list[int] = []

    async with Orchestrator(test_settings(storage_url, worker={"enabled": False},
                                          background={"reaper_interval": 0.01}),
                            modules=[work]) as orch:
        async def slow_reap() -> list[Any]:
            entered.set()
            await anyio.sleep(0.3)  # the stop arrives meanwhile
            finished.append(len(await orch.state.list_modules()))
            return []

        orch.state.reap_expired_leases = slow_reap  # type: ignore[method-assign]
        with anyio.fail_after(5):
            await entered.wait()
    assert finished == [1]  # its read after the stop was answered: "work" is registered


async def test_a_background_round_that_does_not_end_is_cut_off_after_the_grace(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from robotframework_mvp import background

    monkeypatch.setattr(background, "ROUND_GRACE_SECONDS", 0.2)
    entered = anyio.Event()
    cut_off: list[bool] = []

    with anyio.fail_after(5):  # the stop does not wait for it beyond the grace
        async with Orchestrator(test_settings(sqlite_url, worker={"enabled": False},
                                              background={"reaper_interval": 0.01}),
                                modules=[work]) as orch:
            async def stuck_reap() -> list[Any]:
                entered.set()
                try:
                    await anyio.sleep_forever()
                except anyio.get_cancelled_exc_class():
                    cut_off.append(True)
                    raise
                return []  # pragma: no cover - never reached

            orch.state.reap_expired_leases = stuck_reap  # type: ignore[method-assign]
            await entered.wait()
    assert cut_off == [True]
    assert "still going 0.2 s after the stop; cutting them off" in caplog.text
