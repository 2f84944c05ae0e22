"""Work that runs later, on a schedule or in a chain, through a real Orchestrator.

Each test states one promise of docs/scheduling.md; the storage-parametrized ones hold on
SQLite and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest

from robotframework_mvp import (
    FollowUp,
    MisfirePolicy,
    Module,
    NotFoundError,
    Orchestrator,
    PermanentError,
    Robot,
    RobotStatus,
    StaticKey,
    SubmitRequest,
    ValidationError,
    module,
)
from robotframework_mvp.models import utcnow
from robotframework_mvp.testing import TEST_API_KEY, TEST_PRINCIPAL, test_settings

pytestmark = pytest.mark.anyio

BOB_KEY = "bob-key-1a2b3c4d5e6f"
ROOT_KEY = "root-key-0a9b8c7d6e5f"
KEYS = (StaticKey(TEST_PRINCIPAL, TEST_API_KEY), StaticKey("bob", BOB_KEY),
        StaticKey("root", ROOT_KEY))


@module("echo", kinds=["echo"])
async def echo(robot: Robot, ctx: Any) -> dict[str, Any]:
    if robot.payload.get("fail"):
        raise PermanentError("asked to fail")
    return {"echo": robot.payload, "total": 42, "started": utcnow().isoformat()}


@asynccontextmanager
async def orchestrator(url: str, *modules: Module, **changes: Any
                       ) -> AsyncIterator[Orchestrator]:
    settings = test_settings(url, **changes).with_changes(
        security={"api_keys": KEYS, "admin_principals": ("root",)})
    async with Orchestrator(settings, modules=modules or (echo,)) as orch:
        yield orch


async def wait_until(orch: Orchestrator, robot_id: str, timeout: float = 10.0) -> Robot:
    robot = await orch.state.get_robot(robot_id, fresh=True)
    assert robot is not None
    return await orch._wait_until_terminal(robot, timeout)


async def children_of(orch: Orchestrator, parent_id: str) -> list[Robot]:
    robots = await orch.state.list_robots(tenant=None, limit=500)
    return [r for r in robots if r.parent_id == parent_id]


async def wait_for_children(orch: Orchestrator, parent_id: str) -> list[Robot]:
    with anyio.fail_after(10):
        # The worker writes the child with the parent's completion: poll the store.
        while not (children := await children_of(orch, parent_id)):  # noqa: ASYNC110
            await anyio.sleep(0.05)
    return children


# -- delayed robots --------------------------------------------------------------------------


async def test_a_robot_with_run_at_waits_queued_and_runs_at_its_time(storage_url: str) -> None:
    async with orchestrator(storage_url) as orch:
        run_at = utcnow() + timedelta(seconds=1)
        robot = await orch.submit("echo", {}, api_key=TEST_API_KEY, run_at=run_at)
        assert robot.status is RobotStatus.QUEUED
        assert robot.scheduled_at == run_at
        done = await wait_until(orch, robot.id)
        assert done.status is RobotStatus.SUCCEEDED
        assert done.started_at is not None
        assert done.started_at >= run_at
        assert done.result is not None
        assert datetime.fromisoformat(done.result["started"]) >= run_at


async def test_run_at_in_the_past_means_now_and_naive_or_both_are_refused(
    sqlite_url: str,
) -> None:
    async with orchestrator(sqlite_url) as orch:
        before = utcnow()
        robot = await orch.submit("echo", {}, api_key=TEST_API_KEY,
                                  run_at=before - timedelta(days=2))
        assert robot.scheduled_at >= before
        with pytest.raises(ValidationError) as naive:
            await orch.submit("echo", {}, api_key=TEST_API_KEY, run_at=datetime(2031, 1, 1))
        assert naive.value.path == "$.run_at"
        with pytest.raises(ValidationError) as both:
            await orch.submit("echo", {}, api_key=TEST_API_KEY, delay=5,
                              run_at=utcnow() + timedelta(seconds=5))
        assert both.value.path == "$.run_at"
        delayed = await orch.submit("echo", {}, api_key=TEST_API_KEY, delay=30)
        assert delayed.scheduled_at >= before + timedelta(seconds=30)


async def test_a_waiting_robot_can_be_cancelled_and_never_runs(storage_url: str) -> None:
    async with orchestrator(storage_url) as orch:
        robot = await orch.submit("echo", {}, api_key=TEST_API_KEY, delay=0.5)
        cancelled = await orch.cancel(robot.id, api_key=TEST_API_KEY)
        assert cancelled.status is RobotStatus.CANCELLED
        await anyio.sleep(1.0)
        assert await orch.executions(robot.id, api_key=TEST_API_KEY) == []


async def test_robots_list_by_due_time_across_pages(storage_url: str) -> None:
    async with orchestrator(storage_url, worker={"enabled": False}) as orch:
        base = utcnow() + timedelta(hours=1)
        offsets = [50, 10, 40, 10, 30, 20]
        ids = {}
        for i, minutes in enumerate(offsets):
            robot = await orch.submit("echo", {"i": i}, api_key=TEST_API_KEY,
                                      run_at=base + timedelta(minutes=minutes))
            ids[robot.id] = robot.scheduled_at
        await orch.submit("echo", {}, api_key=BOB_KEY, run_at=base)  # another tenant
        seen: list[Robot] = []
        cursor = None
        while True:
            page = await orch.list(api_key=TEST_API_KEY, order="due", limit=4, cursor=cursor)
            seen.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert [r.id for r in seen] == sorted(ids, key=lambda i: (ids[i], i))
        with pytest.raises(ValidationError):
            await orch.list(api_key=TEST_API_KEY, order="due", cursor="not-a-cursor")
        with pytest.raises(ValidationError):
            await orch.list(api_key=TEST_API_KEY, order="oldest")


# -- schedules -------------------------------------------------------------------------------


async def test_a_schedule_fires_one_robot_per_due_time_at_its_due_time(
    storage_url: str,
) -> None:
    async with orchestrator(storage_url) as orch:
        schedule = await orch.add_schedule("echo", {"tick": True}, cron="* * * * * *",
                                           api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            while len(await orch.driver.list_schedule_fires(schedule.id, 10)) < 3:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await orch.pause_schedule(schedule.id, api_key=TEST_API_KEY)
        fires = await orch.driver.list_schedule_fires(schedule.id, 100)
        dues = sorted(f.due_at for f in fires)
        assert dues == [dues[0] + timedelta(seconds=i) for i in range(len(dues))]
        for f in fires:
            assert not f.late
            assert (f.fired_at - f.due_at).total_seconds() < 0.9
            robot = await orch.state.get_robot(f.robot_id, fresh=True)
            assert robot is not None
            assert (robot.schedule_id, robot.owner, robot.payload) == \
                (schedule.id, TEST_PRINCIPAL, {"tick": True})
            assert robot.scheduled_at == f.due_at


async def test_schedules_belong_to_a_tenant(sqlite_url: str) -> None:
    async with orchestrator(sqlite_url) as orch:
        mine = await orch.add_schedule("echo", {}, cron="0 9 * * mon-fri",
                                       timezone="Europe/Paris", api_key=TEST_API_KEY,
                                       misfire_policy="run_once")
        assert (mine.owner, mine.tenant, mine.misfire_policy) == \
            (TEST_PRINCIPAL, TEST_PRINCIPAL, MisfirePolicy.RUN_ONCE)
        assert mine.next_due_at > utcnow()
        for call in (orch.get_schedule, orch.pause_schedule, orch.resume_schedule,
                     orch.remove_schedule):
            with pytest.raises(NotFoundError):
                await call(mine.id, api_key=BOB_KEY)
        assert (await orch.list_schedules(api_key=BOB_KEY)).items == []
        assert [s.id for s in (await orch.list_schedules(api_key=ROOT_KEY)).items] == [mine.id]
        assert (await orch.pause_schedule(mine.id, api_key=TEST_API_KEY)).paused
        assert not (await orch.resume_schedule(mine.id, api_key=TEST_API_KEY)).paused
        await orch.remove_schedule(mine.id, api_key=TEST_API_KEY)
        with pytest.raises(NotFoundError):
            await orch.get_schedule(mine.id, api_key=TEST_API_KEY)
        await anyio.sleep(0.1)  # the audit log flushes every 10 ms in tests
        actions = [e.action for _, e in await orch.driver.list_audit(after_seq=0, limit=100)]
        for action in ("schedules.add", "schedules.get", "schedules.pause", "schedules.resume",
                       "schedules.remove", "schedules.list"):
            assert action in actions


@pytest.mark.parametrize(("field", "value", "path"), [
    ("cron", "* * *", "$.cron"), ("timezone", "Nowhere/Land", "$.timezone"),
    ("misfire_policy", "sometimes", "$.misfire_policy"), ("misfire_limit", 0, "$.misfire_limit"),
    ("kind", "unknown-kind", "$.kind"),
])
async def test_a_bad_schedule_is_refused_naming_the_field(
    sqlite_url: str, field: str, value: Any, path: str,
) -> None:
    arguments: dict[str, Any] = {"kind": "echo", "cron": "* * * * *"}
    arguments[field] = value
    kind = arguments.pop("kind")
    async with orchestrator(sqlite_url) as orch:
        with pytest.raises(ValidationError) as caught:
            await orch.add_schedule(kind, {}, api_key=TEST_API_KEY, **arguments)
        assert caught.value.path == path


async def test_a_resumed_schedule_owes_nothing_for_its_pause(sqlite_url: str) -> None:
    async with orchestrator(sqlite_url, background={"scheduler_enabled": False}) as orch:
        schedule = await orch.add_schedule("echo", {}, cron="* * * * * *",
                                           api_key=TEST_API_KEY, paused=True,
                                           misfire_policy="run_all")
        await anyio.sleep(2.2)
        resumed = await orch.resume_schedule(schedule.id, api_key=TEST_API_KEY)
        assert resumed.last_due_at >= schedule.last_due_at + timedelta(seconds=2)
        await orch.scheduler.fire_due_once()
        assert await orch.driver.list_schedule_fires(schedule.id, 10) == []


# -- transactional submission (PostgreSQL) ---------------------------------------------------


async def test_a_robot_submitted_in_a_committed_transaction_exists_and_runs(
    postgres_url: str,
) -> None:
    async with orchestrator(postgres_url) as orch:
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
            await conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text)")
            await conn.commit()
            async with conn.transaction():
                await conn.execute("INSERT INTO orders (item) VALUES ('book')")
                robot = await orch.submit("echo", {"order": "book"}, api_key=TEST_API_KEY,
                                          connection=conn)
                # Not visible to anyone else before the commit.
                assert await orch.state.get_robot(robot.id, fresh=True) is None
        done = await wait_until(orch, robot.id)
        assert done.status is RobotStatus.SUCCEEDED
        await anyio.sleep(0.1)
        audit = [e for _, e in await orch.driver.list_audit(after_seq=0, limit=100)
                 if e.target == robot.id and e.action == "robots.submit"]
        assert [e.outcome for e in audit] == ["created_in_transaction"]


async def test_a_robot_submitted_in_a_rolled_back_transaction_leaves_nothing_behind(
    postgres_url: str,
) -> None:
    async with orchestrator(postgres_url) as orch:
        async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
            await conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, item text)")
            await conn.commit()
            await conn.execute("INSERT INTO orders (item) VALUES ('book')")
            robot = await orch.submit("echo", {}, api_key=TEST_API_KEY, connection=conn,
                                      idempotency_key="order-1")
            await conn.rollback()  # the application changed its mind
            assert await (await conn.execute("SELECT count(*) FROM orders")).fetchone() == (0,)
        await anyio.sleep(0.3)
        assert await orch.state.get_robot(robot.id, fresh=True) is None
        assert await orch.driver.count_robots() == {}
        again = await orch.submit("echo", {}, api_key=TEST_API_KEY, idempotency_key="order-1")
        assert again.id != robot.id  # the key was never taken


async def test_transactional_submission_needs_postgresql(sqlite_url: str) -> None:
    async with orchestrator(sqlite_url) as orch:
        with pytest.raises(ValidationError, match="PostgreSQL"):
            await orch.submit("echo", {}, api_key=TEST_API_KEY, connection=object())


# -- chains ----------------------------------------------------------------------------------


async def test_a_success_starts_on_success_with_the_parents_result(storage_url: str) -> None:
    async with orchestrator(storage_url) as orch:
        parent = await orch.submit(
            "echo", {"doc": 1}, api_key=TEST_API_KEY,
            on_success={"kind": "echo", "payload": {"total": "$parent.result.total",
                                                    "from": "$parent.id"}},
            on_failure={"kind": "echo", "payload": {"never": True}})
        assert parent.on_success == FollowUp("echo", {"total": "$parent.result.total",
                                                      "from": "$parent.id"})
        done = await wait_until(orch, parent.id)
        assert done.status is RobotStatus.SUCCEEDED
        (child,) = await wait_for_children(orch, parent.id)
        assert (child.parent_trigger, child.owner, child.tenant) == \
            ("on_success", parent.owner, parent.tenant)
        assert child.payload == {"total": 42, "from": parent.id}
        finished = await wait_until(orch, child.id)
        assert finished.status is RobotStatus.SUCCEEDED


async def test_a_failure_starts_on_failure_with_the_error(storage_url: str) -> None:
    async with orchestrator(storage_url) as orch:
        parent = await orch.submit_many([SubmitRequest(
            kind="echo", payload={"fail": True},
            on_failure={"kind": "echo", "payload": {"why": "$parent.error"}})],
            api_key=TEST_API_KEY)
        done = await wait_until(orch, parent[0].id)
        assert done.status is RobotStatus.FAILED
        children = await wait_for_children(orch, parent[0].id)
        assert children[0].payload == {"why": {"type": "PermanentError",
                                               "message": "asked to fail"}}
        assert children[0].parent_trigger == "on_failure"


async def test_a_cancelled_robot_starts_no_follow_up(sqlite_url: str) -> None:
    async with orchestrator(sqlite_url) as orch:
        parent = await orch.submit("echo", {}, api_key=TEST_API_KEY, delay=30,
                                   on_failure={"kind": "echo", "payload": {}})
        await orch.cancel(parent.id, api_key=TEST_API_KEY)
        await anyio.sleep(0.2)
        assert await children_of(orch, parent.id) == []


async def test_a_robot_failed_by_the_reaper_still_starts_on_failure(sqlite_url: str) -> None:
    async with orchestrator(sqlite_url, worker={"enabled": False}) as orch:
        parent = await orch.submit("echo", {}, api_key=TEST_API_KEY,
                                   on_failure={"kind": "echo", "payload": {"e": "$parent.error"}})
        now = utcnow()
        claims = await orch.driver.claim_robots(module="echo", limit=1, worker="gone", now=now,
                                                lease_expires_at=now - timedelta(seconds=1))
        assert len(claims) == 1
        # Each expired lease costs an attempt; the last one fails the robot.
        for _ in range(parent.max_attempts):
            await orch.background.reap_once()
            robot = await orch.state.get_robot(parent.id, fresh=True)
            assert robot is not None
            if robot.is_terminal:
                break
            now = utcnow()
            await orch.driver.claim_robots(module="echo", limit=1, worker="gone", now=now,
                                           lease_expires_at=now - timedelta(seconds=1))
        assert robot.status is RobotStatus.FAILED
        (child,) = await children_of(orch, parent.id)
        assert child.payload["e"]["type"] == "lease_expired"
        await orch.background.reap_once()  # nothing more
        assert len(await children_of(orch, parent.id)) == 1


async def test_a_follow_up_of_an_unknown_kind_is_refused_at_submission(sqlite_url: str) -> None:
    async with orchestrator(sqlite_url) as orch:
        with pytest.raises(ValidationError) as caught:
            await orch.submit("echo", {}, api_key=TEST_API_KEY,
                              on_success={"kind": "nope", "payload": {}})
        assert caught.value.path == "$.on_success.kind"
