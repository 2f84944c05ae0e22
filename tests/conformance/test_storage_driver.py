"""Specification of a storage driver: every driver (SQLite, PostgreSQL) passes this suite.

Each test gets a fresh store (a new SQLite file, or a new PostgreSQL schema), built the
way an application builds it: through the built-in plugin, from a URL.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import anyio.to_thread
import attrs
import psycopg
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import given, settings
from hypothesis import strategies as st

from robotframework_mvp.models import (
    AuditEvent,
    ErrorInfo,
    ExecutionStatus,
    FollowUp,
    ModuleRecord,
    Robot,
    RobotStatus,
    json_bytes,
    new_id,
    utcnow,
)
from robotframework_mvp.security.audit import verify_chain
from robotframework_mvp.state.driver import (
    AUDIT_SLICE,
    Claim,
    Completion,
    CreatesClaimed,
    ProgressReport,
    StorageDriver,
)
from robotframework_mvp.state.queries import load_migrations
from robotframework_mvp.state.sqlite import sqlite_path

pytestmark = pytest.mark.anyio

LEASE = timedelta(seconds=30)


# --- helpers ------------------------------------------------------------------------------


def raw_sql(url: str, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run ``statement`` (``?`` placeholders) on our own connection, behind the driver's back."""
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(sqlite_path(url))) as conn:
            rows = conn.execute(statement, params).fetchall()
            conn.commit()
            return rows
    with psycopg.connect(url, autocommit=True) as pg:
        cur = pg.execute(statement.replace("?", "%s"), params)
        return list(cur.fetchall()) if cur.description else []


async def run_sql(url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    return await anyio.to_thread.run_sync(raw_sql, url, statement, params)


def make_robot(**changes: Any) -> Robot:
    fields: dict[str, Any] = {
        "id": new_id(),
        "kind": "ocr",
        "payload": {"document": "invoice.pdf"},
        "owner": "alice",
        "tenant": "acme",
        "status": RobotStatus.QUEUED,
        "module": "ocr-fast",
        "scheduled_at": utcnow() - timedelta(seconds=1),
    }
    fields.update(changes)
    return Robot(**fields)


async def create(driver: StorageDriver, *robots: Robot) -> list[Robot]:
    created = await driver.create_robots(robots)
    assert all(new for _, new in created)
    return [robot for robot, _ in created]


async def claim(
    driver: StorageDriver,
    module: str = "ocr-fast",
    *,
    limit: int = 10,
    now: datetime | None = None,
    lease_expires_at: datetime | None = None,
    worker: str = "worker-1",
) -> list[Claim]:
    now = now or utcnow()
    return await driver.claim_robots(
        module=module, limit=limit, worker=worker, now=now,
        lease_expires_at=lease_expires_at or now + LEASE,
    )


async def claim_one(driver: StorageDriver, robot: Robot, **kwargs: Any) -> Claim:
    claims = await claim(driver, robot.module or "ocr-fast", **kwargs)
    assert [c.robot.id for c in claims] == [robot.id]
    return claims[0]


def completion(c: Claim, status: RobotStatus, **changes: Any) -> Completion:
    fields: dict[str, Any] = {
        "robot_id": c.robot.id,
        "lease_token": c.execution.id,
        "status": status,
        "execution_status": "succeeded" if status is RobotStatus.SUCCEEDED else "failed",
        "finished_at": utcnow(),
        "duration_ms": 12.5,
    }
    fields.update(changes)
    return Completion(**fields)


async def stored(driver: StorageDriver, robot_id: str) -> Robot:
    robot = await driver.get_robot(robot_id)
    assert robot is not None
    return robot


def audit_event(n: int, **changes: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "ts": utcnow(), "principal": "alice", "action": "robots.create",
        "target": f"robot-{n}", "outcome": "accepted", "client": "10.0.0.1",
        "request_id": f"req-{n}", "details": {"n": n, "kind": "ocr", "note": "héllo ✓"},
    }
    fields.update(changes)
    return AuditEvent(**fields)


def ids(robots: Sequence[Robot]) -> list[str]:
    return [r.id for r in robots]


# --- schema -------------------------------------------------------------------------------


async def test_migrate_again_applies_nothing(driver: StorageDriver) -> None:
    assert await driver.migrate() == []


async def test_migrations_run_at_once_by_many_processes_apply_the_schema_once(
    storage_url: str, new_driver: Callable[[], StorageDriver],
) -> None:
    drivers = [new_driver() for _ in range(4)]
    results: list[list[int]] = []
    try:
        for d in drivers:
            await d.open()

        async def migrate(d: StorageDriver) -> None:
            results.append(await d.migrate())

        async with anyio.create_task_group() as tg:
            for d in drivers:
                tg.start_soon(migrate, d)
        versions = [v for v, _, _ in load_migrations(
            "sqlite" if storage_url.startswith("sqlite") else "postgres")]
        assert sorted(v for applied in results for v in applied) == versions
        rows = await run_sql(storage_url, "SELECT version FROM schema_migrations")
        assert sorted(r[0] for r in rows) == versions
        await create(drivers[0], make_robot())
    finally:
        for d in drivers:
            await d.close()


# --- creating and reading robots ----------------------------------------------------------


async def test_a_created_robot_reads_back_with_every_field(driver: StorageDriver) -> None:
    robot = make_robot(
        kind="mail.read",
        payload={
            "subject": "Grüße aus Köln — 日本語 🤖",
            "nested": {"list": [1, 2.5, None, True, {"deep": ["x", {"y": -7}]}], "empty": {}},
            "quote": "it's \"quoted\" \\ backslash",
        },
        owner="bob",
        tenant="globex",
        module="mail",
        priority=7,
        max_attempts=5,
        idempotency_key="order-42",
    )
    [(created, new)] = await driver.create_robots([robot])
    assert new
    assert created == robot
    assert await driver.get_robot(robot.id) == robot


async def test_a_batch_stores_every_field_even_numbers_beyond_64_bits(
    driver: StorageDriver,
) -> None:
    """PostgreSQL sends a batch as one JSON document (orjson, which refuses integers
    beyond 64 bits: then the standard library's encoder); every field must come back."""
    at = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
    robots = [
        make_robot(payload={"big": 2**70, "neg": -(2**65), "f": 0.1}, created_at=at,
                   updated_at=at, scheduled_at=at + timedelta(microseconds=1),
                   on_success=FollowUp("notify", {"r": "$parent.result"}),
                   parent_id=new_id(), parent_trigger="on_success"),
        make_robot(payload={"plain": "ascii"}, idempotency_key="k-" + new_id()),
    ]
    created = await driver.create_robots(robots)
    assert [(r, new) for r, new in created] == [(r, True) for r in robots]
    assert [await driver.get_robot(r.id) for r in robots] == robots


async def test_an_unknown_robot_reads_as_none(driver: StorageDriver) -> None:
    assert await driver.get_robot(new_id()) is None


async def test_one_robot_is_stored_for_50_concurrent_submissions_with_one_idempotency_key(
    driver: StorageDriver,
) -> None:
    results: list[tuple[Robot, bool]] = []

    async def submit() -> None:
        results.extend(await driver.create_robots([make_robot(idempotency_key="same-key")]))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(submit)

    listed = await driver.list_robots(tenant="acme", status=None, kind=None, limit=100,
                                      before_id=None)
    assert len(listed) == 1
    assert len(results) == 50
    assert {robot.id for robot, _ in results} == {listed[0].id}
    assert sum(new for _, new in results) == 1


async def test_the_same_idempotency_key_from_two_owners_makes_two_robots(
    driver: StorageDriver,
) -> None:
    a = make_robot(owner="alice", idempotency_key="k")
    b = make_robot(owner="bob", idempotency_key="k")
    assert [new for _, new in await driver.create_robots([a])] == [True]
    assert [new for _, new in await driver.create_robots([b])] == [True]
    assert await driver.get_robot(a.id) == a
    assert await driver.get_robot(b.id) == b


async def test_a_batch_stores_each_new_robot_and_returns_the_stored_one_for_a_known_key(
    driver: StorageDriver,
) -> None:
    first = make_robot(idempotency_key="k1")
    await create(driver, first)
    again = make_robot(idempotency_key="k1")
    fresh = make_robot(idempotency_key="k2")
    plain = make_robot()
    created = await driver.create_robots([again, fresh, plain])
    assert [(r.id, new) for r, new in created] == [
        (first.id, False), (fresh.id, True), (plain.id, True)
    ]
    assert await driver.get_robot(again.id) is None


async def test_a_batch_naming_one_idempotency_key_twice_stores_one_robot_for_both(
    driver: StorageDriver,
) -> None:
    """Submissions of one robot each share a write (group commit): two of them may carry
    the same key, and must get what two separate writes would give them."""
    first = make_robot(idempotency_key="k")
    second = make_robot(idempotency_key="k")
    created = await driver.create_robots([first, second])
    assert [(r.id, new) for r, new in created] == [(first.id, True), (first.id, False)]
    assert await driver.get_robot(second.id) is None


@contextlib.contextmanager
def _driver_in_portal(
    new_driver: Callable[[], StorageDriver],
) -> Iterator[tuple[BlockingPortal, StorageDriver]]:
    """An open, migrated driver on an event loop of its own, for a Hypothesis property:
    ``@given`` runs its examples synchronously, each through ``portal.call``."""
    with start_blocking_portal() as portal:
        driver = new_driver()
        portal.call(driver.open)
        try:
            portal.call(driver.migrate)
            yield portal, driver
        finally:
            portal.call(driver.close)


_submissions = st.lists(
    st.tuples(st.sampled_from(["alice", "bob"]), st.sampled_from([None, "k1", "k2", "k3"])),
    min_size=1, max_size=8)


async def _create_twins(driver: StorageDriver, specs: list[tuple[str, str | None]],
                        stored_first: list[tuple[str, str]]) -> None:
    """The same submissions twice, under fresh keys: once as one batch, once one by one."""
    run = new_id()

    def build(twin: str, owner: str, key: str | None) -> Robot:
        return make_robot(owner=owner, tenant=owner,
                          idempotency_key=None if key is None else f"{run}{twin}{key}")

    def shape(inputs: list[Robot], got: list[tuple[Robot, bool]]) -> list[Any]:
        position = {r.id: i for i, r in enumerate(inputs)}
        return [(position.get(r.id, f"{r.owner} stored first"), new) for r, new in got]

    for twin in ("a", "b"):
        for owner, key in stored_first:
            await create(driver, build(twin, owner, key))
    batch = [build("a", owner, key) for owner, key in specs]
    one_by_one = [build("b", owner, key) for owner, key in specs]
    got_batch = list(await driver.create_robots(batch))
    got_single = [(await driver.create_robots([r]))[0] for r in one_by_one]
    assert shape(batch, got_batch) == shape(one_by_one, got_single)


def test_create_robots_in_one_batch_stores_what_one_by_one_would(
    new_driver: Callable[[], StorageDriver],
) -> None:
    """Submissions made one at a time share a write (group commit), so any mix of owners
    and idempotency keys, repeated in the batch or stored before, must come out of one
    batch exactly as out of separate writes: the same robots new, the same ones found."""
    with _driver_in_portal(new_driver) as (portal, driver):

        @settings(max_examples=25, deadline=None)
        @given(specs=_submissions, stored_first=st.lists(
            st.tuples(st.sampled_from(["alice", "bob"]), st.sampled_from(["k1", "k2"])),
            max_size=2, unique=True))
        def check(specs: list[tuple[str, str | None]],
                  stored_first: list[tuple[str, str]]) -> None:
            portal.call(_create_twins, driver, specs, stored_first)

        check()


async def test_list_robots_filters_by_tenant_status_and_kind(driver: StorageDriver) -> None:
    a = make_robot(tenant="acme", kind="ocr")
    b = make_robot(tenant="acme", kind="mail")
    c = make_robot(tenant="globex", kind="ocr")
    d = make_robot(tenant="acme", kind="ocr", status=RobotStatus.PENDING)
    await create(driver, a, b, c, d)

    async def listed(**filters: Any) -> set[str]:
        args: dict[str, Any] = {"tenant": None, "status": None, "kind": None, "limit": 50,
                                "before_id": None}
        args.update(filters)
        return {r.id for r in await driver.list_robots(**args)}

    assert await listed() == {a.id, b.id, c.id, d.id}
    assert await listed(tenant="acme") == {a.id, b.id, d.id}
    assert await listed(tenant="acme", kind="ocr") == {a.id, d.id}
    assert await listed(tenant="acme", kind="ocr", status=RobotStatus.QUEUED) == {a.id}
    assert await listed(status=RobotStatus.PENDING) == {d.id}
    assert await listed(tenant="initech") == set()


async def test_list_robots_is_newest_first_and_pages_without_repeats_or_gaps(
    driver: StorageDriver,
) -> None:
    robots = [make_robot() for _ in range(23)]
    await create(driver, *robots)
    pages: list[list[str]] = []
    before: str | None = None
    while True:
        page = await driver.list_robots(tenant="acme", status=None, kind=None, limit=5,
                                        before_id=before)
        if not page:
            break
        assert len(page) <= 5
        pages.append(ids(page))
        before = page[-1].id
    seen = [i for page in pages for i in page]
    assert seen == sorted((r.id for r in robots), reverse=True)
    assert [len(p) for p in pages] == [5, 5, 5, 5, 3]


# --- claims -------------------------------------------------------------------------------


async def test_concurrent_claimers_claim_each_robot_exactly_once(driver: StorageDriver) -> None:
    robots = [make_robot() for _ in range(200)]
    await create(driver, *robots)
    claimed: list[str] = []

    async def claimer(n: int) -> None:
        while batch := await claim(driver, limit=7, worker=f"worker-{n}"):
            claimed.extend(c.robot.id for c in batch)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(claimer, n)

    assert len(claimed) == 200
    assert set(claimed) == set(ids(robots))
    assert await claim(driver) == []


async def test_claim_takes_only_robots_of_its_module(driver: StorageDriver) -> None:
    mine = make_robot(module="ocr-fast")
    other = make_robot(module="ocr-slow")
    await create(driver, mine, other)
    assert [c.robot.id for c in await claim(driver, "ocr-fast")] == [mine.id]
    assert (await stored(driver, other.id)).status is RobotStatus.QUEUED


async def test_claim_takes_higher_priority_first_then_the_longest_waiting(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    low_old = make_robot(priority=0, scheduled_at=now - timedelta(minutes=10))
    high_new = make_robot(priority=5, scheduled_at=now - timedelta(seconds=1))
    high_old = make_robot(priority=5, scheduled_at=now - timedelta(minutes=5))
    low_new = make_robot(priority=0, scheduled_at=now - timedelta(seconds=2))
    await create(driver, low_old, high_new, high_old, low_new)
    first = await claim(driver, limit=3, now=now)
    assert [c.robot.id for c in first] == [high_old.id, high_new.id, low_old.id]
    assert [c.robot.id for c in await claim(driver, now=now)] == [low_new.id]


async def test_claim_leaves_robots_that_are_not_due_yet(driver: StorageDriver) -> None:
    now = utcnow()
    later = make_robot(scheduled_at=now + timedelta(seconds=60))
    await create(driver, later)
    assert await claim(driver, now=now) == []
    assert [c.robot.id for c in await claim(driver, now=now + timedelta(seconds=61))] == [
        later.id
    ]


async def test_claim_takes_at_most_limit_robots(driver: StorageDriver) -> None:
    await create(driver, *[make_robot() for _ in range(5)])
    assert len(await claim(driver, limit=3)) == 3
    assert len(await claim(driver, limit=3)) == 2


async def test_claim_charges_an_attempt_and_records_an_execution_under_the_lease_token(
    driver: StorageDriver,
) -> None:
    robot = make_robot()
    await create(driver, robot)
    now = utcnow()
    c = await claim_one(driver, robot, now=now, worker="worker-7")
    assert c.robot.status is RobotStatus.RUNNING
    assert c.robot.attempts == 1
    assert c.robot.lease_token == c.execution.id
    assert c.robot.lease_expires_at == now + LEASE
    assert c.robot.started_at == now
    assert (c.execution.robot_id, c.execution.module, c.execution.attempt) == (
        robot.id, "ocr-fast", 1)
    assert (c.execution.status, c.execution.worker) == (ExecutionStatus.RUNNING, "worker-7")
    assert await stored(driver, robot.id) == c.robot
    assert await driver.list_executions(robot.id) == [c.execution]


async def test_a_robot_created_claimed_is_stored_running_under_its_lease_with_its_execution(
    driver: StorageDriver,
) -> None:
    assert isinstance(driver, CreatesClaimed)  # both built-in drivers can
    robot = make_robot(on_success=FollowUp("notify", {"r": "$parent.result"}))
    now = utcnow()
    c = await driver.create_and_claim(robot, worker="worker-7", now=now,
                                      lease_expires_at=now + LEASE)
    assert c is not None
    assert (c.robot.id, c.robot.status, c.robot.attempts) == (robot.id, RobotStatus.RUNNING, 1)
    assert (c.robot.payload, c.robot.on_success) == (robot.payload, robot.on_success)
    assert c.robot.lease_token == c.execution.id
    assert (c.robot.lease_expires_at, c.robot.started_at) == (now + LEASE, now)
    assert (c.execution.status, c.execution.worker, c.execution.attempt) == (
        ExecutionStatus.RUNNING, "worker-7", 1)
    assert await stored(driver, robot.id) == c.robot
    assert await driver.list_executions(robot.id) == [c.execution]
    assert await claim(driver) == []  # nobody else can take it
    done = await driver.complete(completion(c, RobotStatus.SUCCEEDED, result={"ok": 1}))
    assert done is not None
    assert done.status is RobotStatus.SUCCEEDED


async def test_creating_claimed_an_id_that_exists_writes_nothing(driver: StorageDriver) -> None:
    assert isinstance(driver, CreatesClaimed)
    robot = make_robot()
    await create(driver, robot)
    now = utcnow()
    again = attrs.evolve(robot, payload={"other": True})
    assert await driver.create_and_claim(again, worker="w", now=now,
                                         lease_expires_at=now + LEASE) is None
    assert await stored(driver, robot.id) == robot
    assert await driver.list_executions(robot.id) == []


async def test_robots_created_claimed_together_are_each_claimed_or_skipped_alone(
    driver: StorageDriver,
) -> None:
    """``create_and_claim_many`` (both built-in drivers have it): robots submitted one at
    a time to a worker with free slots share one write; an id that exists is skipped."""
    existing = make_robot()
    await create(driver, existing)
    robots = [make_robot(), attrs.evolve(existing, payload={"other": True}), make_robot()]
    now = utcnow()
    claims = await driver.create_and_claim_many(  # type: ignore[attr-defined]
        robots, worker="w", now=now, lease_expires_at=now + LEASE)
    assert [None if c is None else c.robot.id for c in claims] == [
        robots[0].id, None, robots[2].id]
    assert await stored(driver, existing.id) == existing
    for c in (claims[0], claims[2]):
        assert c is not None
        assert (c.robot.status, c.robot.attempts, c.robot.lease_token) == (
            RobotStatus.RUNNING, 1, c.execution.id)
        assert await stored(driver, c.robot.id) == c.robot
        assert await driver.list_executions(c.robot.id) == [c.execution]
    assert claims[0] is not None
    assert claims[2] is not None
    assert claims[0].execution.id != claims[2].execution.id


async def test_lease_tokens_are_time_ordered_uuid7_as_the_fleet_scoring_reads_them(
    driver: StorageDriver,
) -> None:
    from robotframework_mvp.background import execution_id_floor

    assert isinstance(driver, CreatesClaimed)
    floor = execution_id_floor(utcnow() - timedelta(seconds=1))
    await create(driver, *[make_robot() for _ in range(5)])
    now = utcnow()
    direct = await driver.create_and_claim(make_robot(), worker="w", now=now,
                                           lease_expires_at=now + LEASE)
    assert direct is not None
    tokens = [c.execution.id for c in await claim(driver)] + [direct.execution.id]
    assert len(tokens) == 6
    assert all(t >= floor and t[14] == "7" and len(t) == 36 for t in tokens), tokens


async def test_every_claim_gets_a_different_lease_token(driver: StorageDriver) -> None:
    await create(driver, *[make_robot() for _ in range(10)])
    tokens = [c.execution.id for c in await claim(driver)]
    assert len(set(tokens)) == 10


# --- progress and completion --------------------------------------------------------------


async def test_progress_never_goes_down(driver: StorageDriver) -> None:
    robot = make_robot()
    await create(driver, robot)
    c = await claim_one(driver, robot)
    token = c.execution.id
    up = await driver.update_progress(robot.id, token, 60, "most of it", utcnow())
    assert up is not None
    assert (up.progress, up.progress_message) == (60, "most of it")
    down = await driver.update_progress(robot.id, token, 30, "late report", utcnow())
    assert down is not None
    assert down.progress == 60
    assert (await stored(driver, robot.id)).progress == 60


async def test_progress_under_a_wrong_lease_token_changes_nothing(driver: StorageDriver) -> None:
    robot = make_robot()
    await create(driver, robot)
    await claim_one(driver, robot)
    assert await driver.update_progress(robot.id, "not-my-lease", 50, "x", utcnow()) is None
    assert (await stored(driver, robot.id)).progress == 0


async def test_complete_under_a_wrong_lease_token_changes_nothing(driver: StorageDriver) -> None:
    robot = make_robot()
    await create(driver, robot)
    c = await claim_one(driver, robot)
    stolen = attrs.evolve(c.execution, id="not-my-lease")
    assert await driver.complete(
        completion(attrs.evolve(c, execution=stolen), RobotStatus.SUCCEEDED, result={"x": 1})
    ) is None
    assert await stored(driver, robot.id) == c.robot
    assert [e.status for e in await driver.list_executions(robot.id)] == [
        ExecutionStatus.RUNNING
    ]


async def test_complete_many_writes_each_completion_under_its_own_lease(
    driver: StorageDriver,
) -> None:
    robots = [make_robot() for _ in range(5)]
    await create(driver, *robots)
    claims = {c.robot.id: c for c in await claim(driver, limit=5)}
    assert len(claims) == 5
    ordered = [claims[r.id] for r in robots]
    stolen = attrs.evolve(ordered[2], execution=attrs.evolve(ordered[2].execution,
                                                             id="not-my-lease"))
    batch = [completion(c, RobotStatus.SUCCEEDED, result={"i": i})
             for i, c in enumerate(ordered)]
    batch[2] = completion(stolen, RobotStatus.SUCCEEDED, result={"i": 2})
    batch[4] = completion(ordered[4], RobotStatus.FAILED, error=ErrorInfo("Boom", "no"))
    done = await driver.complete_many(batch)
    assert [None if d is None else d.status for d in done] == [
        RobotStatus.SUCCEEDED, RobotStatus.SUCCEEDED, None, RobotStatus.SUCCEEDED,
        RobotStatus.FAILED]
    assert [d.result for d in done[:2] if d is not None] == [{"i": 0}, {"i": 1}]
    # The lost lease changed nothing: that robot is still running under its claim.
    assert (await stored(driver, robots[2].id)).status is RobotStatus.RUNNING
    assert await driver.complete_many([]) == []


async def test_complete_with_success_stores_the_result_and_ends_the_execution(
    driver: StorageDriver,
) -> None:
    robot = make_robot()
    await create(driver, robot)
    c = await claim_one(driver, robot)
    finished = utcnow()
    done = await driver.complete(completion(
        c, RobotStatus.SUCCEEDED, result={"text": "Σ total", "pages": [1, 2]},
        finished_at=finished, duration_ms=42.0,
    ))
    assert done is not None
    assert done.status is RobotStatus.SUCCEEDED
    assert done.result == {"text": "Σ total", "pages": [1, 2]}
    assert (done.progress, done.finished_at) == (100, finished)
    assert (done.lease_token, done.lease_expires_at) == (None, None)
    assert await stored(driver, robot.id) == done
    [execution] = await driver.list_executions(robot.id)
    assert (execution.status, execution.finished_at, execution.duration_ms) == (
        ExecutionStatus.SUCCEEDED, finished, 42.0)


@pytest.mark.parametrize("status", [RobotStatus.SUCCEEDED, RobotStatus.FAILED,
                                    RobotStatus.QUEUED])
async def test_a_completion_after_progress_returns_exactly_what_is_stored(
    driver: StorageDriver, status: RobotStatus,
) -> None:
    robot = make_robot(payload={"text": "Σ", "nested": {"n": [1, 2.5, None]}},
                       on_success=FollowUp("notify", {}))
    await create(driver, robot)
    c = await claim_one(driver, robot)
    progressed = await driver.update_progress(robot.id, c.execution.id, 40.0, "half", utcnow())
    assert progressed is not None
    retry_at = utcnow() + timedelta(seconds=30) if status is RobotStatus.QUEUED else None
    done = await driver.complete(completion(
        c, status, scheduled_at=retry_at,
        result={"ok": [1, "ü"]} if status is RobotStatus.SUCCEEDED else None,
        error=None if status is RobotStatus.SUCCEEDED else ErrorInfo("Boom", "no")))
    assert done is not None
    assert done == await stored(driver, robot.id)
    assert (done.status, done.progress_message) == (status, "half")
    assert done.progress == (100 if status is RobotStatus.SUCCEEDED else 40.0)


async def test_payloads_and_results_keep_every_json_value_exactly(driver: StorageDriver) -> None:
    # Integers beyond 64 bits (orjson alone would read them as floats), escapes and
    # characters outside ASCII, through every path that writes or reads them.
    odd: dict[str, Any] = {"big": 2**70, "negative": -(2**65), "u64": 2**64 - 1,
                           "float": 0.1, "text": 'Σ ü \u2028 "q" \\', "deep": [1, {"x": None}]}
    robot = make_robot(payload=odd)
    await create(driver, robot)
    c = await claim_one(driver, robot)
    assert c.robot.payload == odd
    done = await driver.complete(completion(c, RobotStatus.SUCCEEDED, result=odd))
    assert done is not None
    assert done.result == odd
    stored_robot = await stored(driver, robot.id)
    assert (stored_robot.payload, stored_robot.result) == (odd, odd)
    assert type(stored_robot.payload["big"]) is int

    now = utcnow()
    alone = make_robot(payload=odd)
    created = await driver.create_and_claim(alone, worker="w", now=now,
                                            lease_expires_at=now + LEASE)
    assert created is not None
    assert (await stored(driver, alone.id)).payload == odd


async def test_what_a_write_returns_shows_as_json_exactly_as_the_stored_robot(
    driver: StorageDriver,
) -> None:
    # A whole-number progress is still a float: the HTTP answer to a submission (the
    # robot a write returned) and a later GET (the robot read back) must show the same
    # JSON, ``100.0`` in both and never ``100`` in one of them.
    def shown(robot: Robot | None) -> bytes:
        assert robot is not None
        return json_bytes(robot.to_dict())

    robot = make_robot(max_attempts=1)
    await create(driver, robot)
    c = await claim_one(driver, robot)
    progressed = await driver.update_progress(robot.id, c.execution.id, 40, "half", utcnow())
    assert shown(progressed) == shown(await stored(driver, robot.id))
    assert isinstance(progressed.progress, float)
    done = await driver.complete(completion(c, RobotStatus.SUCCEEDED, result={"n": 1}))
    assert shown(done) == shown(await stored(driver, robot.id))
    assert isinstance(done.progress, float)

    failing = make_robot(max_attempts=1)
    await create(driver, failing)
    failed = await claim_one(driver, failing)
    await driver.complete(completion(failed, RobotStatus.FAILED, error=ErrorInfo("x", "y")))
    requeued = await driver.requeue_robot(failing.id, utcnow(), 1)
    assert shown(requeued) == shown(await stored(driver, failing.id))


async def test_complete_back_to_queued_schedules_the_retry_and_clears_the_lease(
    driver: StorageDriver,
) -> None:
    robot = make_robot()
    await create(driver, robot)
    now = utcnow()
    c = await claim_one(driver, robot, now=now)
    retry_at = now + timedelta(seconds=60)
    error = ErrorInfo("timeout", "the partner API did not answer")
    queued = await driver.complete(completion(
        c, RobotStatus.QUEUED, execution_status="failed", error=error,
        scheduled_at=retry_at, module="ocr-slow",
    ))
    assert queued is not None
    assert queued.status is RobotStatus.QUEUED
    assert (queued.scheduled_at, queued.module, queued.error) == (retry_at, "ocr-slow", error)
    assert (queued.lease_token, queued.lease_expires_at, queued.finished_at) == (None, None, None)
    [execution] = await driver.list_executions(robot.id)
    assert (execution.status, execution.error) == (ExecutionStatus.FAILED, error)
    assert await claim(driver, "ocr-slow", now=now) == []
    again = await claim(driver, "ocr-slow", now=retry_at)
    assert [(a.robot.id, a.robot.attempts) for a in again] == [(robot.id, 2)]


async def test_a_succeeded_robot_can_never_be_cancelled(driver: StorageDriver) -> None:
    robot = make_robot()
    await create(driver, robot)
    c = await claim_one(driver, robot)
    done = await driver.complete(completion(c, RobotStatus.SUCCEEDED, result={}))
    assert await driver.cancel_robot(robot.id, utcnow()) is None
    assert await stored(driver, robot.id) == done


async def test_a_cancelled_robot_is_never_completed(driver: StorageDriver) -> None:
    robot = make_robot()
    await create(driver, robot)
    c = await claim_one(driver, robot)
    cancelled = await driver.cancel_robot(robot.id, utcnow())
    assert cancelled is not None
    for status in (RobotStatus.SUCCEEDED, RobotStatus.FAILED, RobotStatus.QUEUED):
        assert await driver.complete(completion(c, status, result={"late": True})) is None
    assert await stored(driver, robot.id) == cancelled


async def test_cancel_a_queued_robot(driver: StorageDriver) -> None:
    robot = make_robot()
    await create(driver, robot)
    now = utcnow()
    cancelled = await driver.cancel_robot(robot.id, now)
    assert cancelled is not None
    assert (cancelled.status, cancelled.finished_at) == (RobotStatus.CANCELLED, now)
    assert cancelled.error is not None
    assert cancelled.error.type == "cancelled"
    assert await claim(driver) == []
    assert await driver.cancel_robot(robot.id, now) is None


async def test_cancel_a_running_robot_ends_its_execution_and_the_worker_loses_its_lease(
    driver: StorageDriver,
) -> None:
    robot = make_robot()
    await create(driver, robot)
    c = await claim_one(driver, robot)
    cancelled = await driver.cancel_robot(robot.id, utcnow())
    assert cancelled is not None
    assert (cancelled.status, cancelled.lease_token) == (RobotStatus.CANCELLED, None)
    [execution] = await driver.list_executions(robot.id)
    assert execution.status is ExecutionStatus.CANCELLED
    assert execution.finished_at is not None
    token = c.execution.id
    assert await driver.update_progress(robot.id, token, 90, "still going", utcnow()) is None
    assert await driver.renew_leases([(robot.id, token)], utcnow() + LEASE) == set()
    assert await driver.complete(completion(c, RobotStatus.SUCCEEDED, result={})) is None
    assert await stored(driver, robot.id) == cancelled


async def test_cancel_an_unknown_robot_returns_none(driver: StorageDriver) -> None:
    assert await driver.cancel_robot(new_id(), utcnow()) is None


# --- leases -------------------------------------------------------------------------------


async def test_renew_leases_extends_and_returns_only_the_leases_still_held(
    driver: StorageDriver,
) -> None:
    a, b, c = make_robot(), make_robot(), make_robot()
    await create(driver, a, b, c)
    claims = {x.robot.id: x for x in await claim(driver)}
    await driver.complete(completion(claims[c.id], RobotStatus.SUCCEEDED, result={}))
    later = utcnow() + timedelta(minutes=5)
    held = await driver.renew_leases(
        [(a.id, claims[a.id].execution.id), (b.id, "someone-elses-lease"),
         (c.id, claims[c.id].execution.id), (new_id(), "no-such-robot")],
        later,
    )
    assert held == {a.id}
    assert (await stored(driver, a.id)).lease_expires_at == later
    assert (await stored(driver, b.id)).lease_expires_at == claims[b.id].robot.lease_expires_at
    assert await driver.renew_leases([], later) == set()


async def test_release_hands_robots_back_without_charging_the_attempt(
    driver: StorageDriver,
) -> None:
    a, b = make_robot(), make_robot()
    await create(driver, a, b)
    claims = await claim(driver)
    now = utcnow()
    leases = [(x.robot.id, x.execution.id) for x in claims]
    assert await driver.release_robots([*leases, (new_id(), "nobody")], now) == 2
    for robot in (a, b):
        back = await stored(driver, robot.id)
        assert (back.status, back.attempts, back.lease_token) == (RobotStatus.QUEUED, 0, None)
        [execution] = await driver.list_executions(robot.id)
        assert execution.status is ExecutionStatus.RELEASED
        assert execution.finished_at == now
    assert await driver.release_robots(leases, now) == 0
    again = await claim(driver, now=now)
    assert sorted(x.robot.attempts for x in again) == [1, 1]


async def test_the_reaper_requeues_a_robot_whose_lease_expired_while_attempts_remain(
    driver: StorageDriver,
) -> None:
    robot = make_robot(max_attempts=2)
    await create(driver, robot)
    now = utcnow()
    c = await claim_one(driver, robot, now=now, lease_expires_at=now + timedelta(seconds=1))
    assert await driver.reap_expired_leases(now) == []
    reaped = await driver.reap_expired_leases(now + timedelta(seconds=2))
    assert [(r.id, r.status, r.lease_token) for r in reaped] == [
        (robot.id, RobotStatus.QUEUED, None)]
    [execution] = await driver.list_executions(robot.id)
    assert execution.status is ExecutionStatus.LOST
    assert await driver.complete(completion(c, RobotStatus.SUCCEEDED, result={})) is None
    again = await claim_one(driver, robot, now=now + timedelta(seconds=2))
    assert again.robot.attempts == 2


async def test_the_reaper_fails_a_robot_whose_lease_expired_on_its_last_attempt(
    driver: StorageDriver,
) -> None:
    robot = make_robot(max_attempts=1)
    await create(driver, robot)
    now = utcnow()
    await claim_one(driver, robot, now=now, lease_expires_at=now + timedelta(seconds=1))
    later = now + timedelta(seconds=2)
    [reaped] = await driver.reap_expired_leases(later)
    assert (reaped.status, reaped.finished_at) == (RobotStatus.FAILED, later)
    assert reaped.error is not None
    assert reaped.error.type == "lease_expired"
    assert await stored(driver, robot.id) == reaped
    [execution] = await driver.list_executions(robot.id)
    assert (execution.status, execution.error) == (ExecutionStatus.LOST, reaped.error)
    assert await driver.reap_expired_leases(later) == []


async def test_requeue_puts_a_failed_robot_back_with_more_attempts(driver: StorageDriver) -> None:
    robot = make_robot(max_attempts=1)
    await create(driver, robot)
    c = await claim_one(driver, robot)
    await driver.complete(completion(c, RobotStatus.FAILED, error=ErrorInfo("boom", "bad")))
    now = utcnow()
    requeued = await driver.requeue_robot(robot.id, now, 2)
    assert requeued is not None
    assert (requeued.status, requeued.max_attempts, requeued.error, requeued.finished_at) == (
        RobotStatus.QUEUED, 3, None, None)
    assert await driver.requeue_robot(robot.id, now, 2) is None
    again = await claim_one(driver, robot, now=now)
    assert again.robot.attempts == 2


async def test_next_due_at_is_the_earliest_queued_robot_of_the_modules(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    soon = make_robot(module="a", scheduled_at=now + timedelta(seconds=5))
    later = make_robot(module="a", scheduled_at=now + timedelta(seconds=50))
    earliest_elsewhere = make_robot(module="b", scheduled_at=now + timedelta(seconds=1))
    await create(driver, soon, later, earliest_elsewhere)
    assert await driver.next_due_at(["a"]) == soon.scheduled_at
    assert await driver.next_due_at(["a", "b"]) == earliest_elsewhere.scheduled_at
    assert await driver.next_due_at(["c"]) is None


# --- modules ------------------------------------------------------------------------------


async def test_upsert_modules_stores_then_replaces_module_records(driver: StorageDriver) -> None:
    now = utcnow()
    ocr = ModuleRecord(name="ocr", kinds=("ocr", "scan"), capacity=4)
    mail = ModuleRecord(name="mail", kinds=("mail.read",), capacity=2, health="healthy",
                        last_check_at=now, score=0.8, success_rate=0.95, latency_ewma_ms=12.5,
                        circuit_state="closed", load=1)
    await driver.upsert_modules([ocr, mail], now)

    def stored(records: list[ModuleRecord]) -> list[ModuleRecord]:
        # The store stamps each record with the write time it was given.
        for record in records:
            assert record.updated_at is not None
            assert abs((record.updated_at - now).total_seconds()) < 0.001
        return [attrs.evolve(r, updated_at=None) for r in records]

    assert stored(await driver.list_modules()) == [mail, ocr]
    sick = attrs.evolve(ocr, health="unhealthy", circuit_state="open", score=0.1, load=3,
                        max_attempts=5)
    await driver.upsert_modules([sick], now)
    assert stored(await driver.list_modules()) == [mail, sick]


# --- audit --------------------------------------------------------------------------------


async def test_the_audit_trail_is_a_hash_chain_that_verifies(driver: StorageDriver) -> None:
    first = await driver.append_audit([audit_event(1), audit_event(2)])
    second = await driver.append_audit([audit_event(3, principal=None, target=None,
                                                    client=None, details={})])
    assert first[0].prev_hash is None
    assert first[1].prev_hash == first[0].hash
    assert second[0].prev_hash == first[1].hash
    records = await driver.list_audit(after_seq=0, limit=100)
    assert [event for _, event in records] == [*first, *second]
    assert verify_chain(records, anchor=None) is None
    tail = await driver.list_audit(after_seq=records[0][0], limit=1)
    assert tail == [records[1]]


async def test_a_tampered_audit_record_breaks_the_chain(
    driver: StorageDriver, storage_url: str
) -> None:
    await driver.append_audit([audit_event(n) for n in range(5)])
    records = await driver.list_audit(after_seq=0, limit=100)
    victim = records[2][0]
    await run_sql(storage_url, "UPDATE audit_log SET outcome = 'refused' WHERE seq = ?", victim)
    assert verify_chain(await driver.list_audit(after_seq=0, limit=100), anchor=None) == victim


async def test_concurrent_audit_appends_keep_one_unbroken_chain(driver: StorageDriver) -> None:
    async def append(n: int) -> None:
        await driver.append_audit([audit_event(n * 10 + i) for i in range(3)])

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(append, n)
    records = await driver.list_audit(after_seq=0, limit=1000)
    assert len(records) == 24
    assert verify_chain(records, anchor=None) is None


async def test_batches_of_several_slices_chain_and_read_back_as_written(
    driver: StorageDriver,
) -> None:
    """A flush under load carries hundreds of records, chained a slice at a time
    (``driver.AUDIT_SLICE``); concurrent ones too. The chain links across every slice and
    every batch, and each record reads back as written, details included."""
    details = {"kind": "échantillon", "b": [1, 2.5, None], "a": {"z": True}}

    async def append(n: int) -> list[AuditEvent]:
        return await driver.append_audit([audit_event(n * 1000 + i, details=details)
                                          for i in range(AUDIT_SLICE * 2 + 7)])

    first = await append(0)
    async with anyio.create_task_group() as tg:
        for n in range(1, 4):
            tg.start_soon(append, n)
    records = await driver.list_audit(after_seq=0, limit=10_000)
    assert len(records) == 4 * (AUDIT_SLICE * 2 + 7)
    assert [event for _, event in records[:len(first)]] == first
    assert verify_chain(records, anchor=None) is None
    assert all(event.details == details for _, event in records)


async def test_two_processes_appending_in_turn_keep_one_unbroken_chain(
    driver: StorageDriver, new_driver: Callable[[], StorageDriver],
) -> None:
    """Each driver links a batch after the last record it saw; another process may have
    appended since, and the chain must still link up."""
    other = new_driver()
    await other.open()
    try:
        for n in range(4):
            await driver.append_audit([audit_event(n * 10 + i) for i in range(2)])
            await other.append_audit([audit_event(n * 10 + 5)])
    finally:
        await other.close()
    records = await driver.list_audit(after_seq=0, limit=1000)
    assert len(records) == 12
    assert verify_chain(records, anchor=None) is None


# --- statistics and retention -------------------------------------------------------------


async def test_count_robots_and_queue_stats(driver: StorageDriver) -> None:
    now = utcnow()
    await create(
        driver,
        make_robot(kind="ocr", scheduled_at=now - timedelta(seconds=30)),
        make_robot(kind="ocr", scheduled_at=now - timedelta(seconds=10)),
        make_robot(kind="mail", module="mail", scheduled_at=now + timedelta(seconds=60)),
        make_robot(kind="mail", module="mail", status=RobotStatus.PENDING),
    )
    await claim(driver, limit=1, now=now)
    assert await driver.count_robots() == {
        ("ocr", "running"): 1, ("ocr", "queued"): 1, ("mail", "queued"): 1,
        ("mail", "pending"): 1,
    }
    due, oldest = await driver.queue_stats(now)
    assert due == 1
    assert oldest == pytest.approx(10, abs=0.01)
    assert await driver.queue_stats(now - timedelta(hours=1)) == (0, None)


async def test_purge_deletes_only_robots_that_finished_before_the_cutoff(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    old_done, new_done, old_waiting = make_robot(), make_robot(), make_robot()
    await create(driver, old_done, new_done)
    claims = {c.robot.id: c for c in await claim(driver, now=now)}
    await driver.complete(completion(claims[old_done.id], RobotStatus.SUCCEEDED, result={},
                                     finished_at=now - timedelta(days=40)))
    await driver.complete(completion(claims[new_done.id], RobotStatus.SUCCEEDED, result={},
                                     finished_at=now))
    await create(driver, attrs.evolve(old_waiting, created_at=now - timedelta(days=90)))
    await driver.append_audit([audit_event(1, ts=now - timedelta(days=40)),
                               audit_event(2, ts=now)])

    assert await driver.purge(now - timedelta(days=30)) == 1
    assert await driver.get_robot(old_done.id) is None
    assert await driver.list_executions(old_done.id) == []
    assert (await stored(driver, new_done.id)).status is RobotStatus.SUCCEEDED
    assert (await stored(driver, old_waiting.id)).status is RobotStatus.QUEUED
    # Audit records have a retention of their own (purge_audit, see test_api_keys.py).
    assert [e.request_id for _, e in await driver.list_audit(after_seq=0, limit=10)] == [
        "req-1", "req-2"]
    assert await driver.purge(now - timedelta(days=30)) == 0


# --- complete_many is complete, one by one (property) ---------------------------------------

# Text as a module may return it: no NUL (Module.run refuses one; PostgreSQL cannot hold it).
# Results as a module hands them over: Module.run refuses a NUL and a lone surrogate.
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                max_size=8)
_json_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                         st.floats(allow_nan=False, allow_infinity=False, width=32), _text)
_outcomes = st.fixed_dictionaries({
    "status": st.sampled_from([RobotStatus.SUCCEEDED, RobotStatus.FAILED, RobotStatus.QUEUED,
                               RobotStatus.TIMED_OUT]),
    "result": st.one_of(st.none(), st.dictionaries(_text, _json_values, max_size=3)),
    "stale": st.booleans(),
    "move": st.booleans(),
    "followup": st.booleans(),
    "duration_ms": st.floats(0, 1e6, allow_nan=False),
    # the completion carries the robot as claimed (the worker's do), or not
    "claimed": st.booleans(),
    # a progress report under the lease before the robot ends; its message as the worker
    # hands it over (worker.storable_text: no NUL, no lone surrogate)
    "progress": st.one_of(st.none(), st.tuples(st.floats(0, 100), st.one_of(
        st.none(), st.text(st.characters(blacklist_categories=("Cs",),
                                         blacklist_characters="\x00"), max_size=8)))),
})


async def _complete_twins(driver: StorageDriver, outcomes: list[dict[str, Any]],
                          repeat: int | None) -> None:
    """Two identical groups of robots; one ends through complete_many, the other through
    complete, one at a time; both must end alike (robots, returns, executions, children),
    and each robot returned must be the robot stored."""
    now = utcnow()
    module = f"m-{new_id()}"
    twins = [[make_robot(module=module, scheduled_at=now - timedelta(seconds=1),
                         created_at=now, updated_at=now) for _ in outcomes] for _ in range(2)]
    for group in twins:
        await create(driver, *group)
    claims = {c.robot.id: c for c in await claim(driver, module, limit=2 * len(outcomes),
                                                  now=now)}
    assert len(claims) == 2 * len(outcomes)
    for group in twins:
        for robot, spec in zip(group, outcomes, strict=True):
            if spec["progress"] is not None:
                percent, message = spec["progress"]
                assert await driver.update_progress(
                    robot.id, claims[robot.id].execution.id, percent, message,
                    now + timedelta(seconds=1)) is not None

    def completions(group: list[Robot]) -> list[Completion]:
        batch = []
        for robot, spec in zip(group, outcomes, strict=True):
            c = claims[robot.id]
            if spec["stale"]:
                c = attrs.evolve(c, execution=attrs.evolve(c.execution, id=new_id()))
            status = spec["status"]
            child = make_robot(parent_id=robot.id, parent_trigger="on_success",
                               status=RobotStatus.QUEUED) \
                if spec["followup"] and status.is_terminal else None
            batch.append(Completion(
                robot_id=robot.id, lease_token=c.execution.id, status=status,
                execution_status="succeeded" if status is RobotStatus.SUCCEEDED else "failed",
                finished_at=now + timedelta(seconds=2), duration_ms=spec["duration_ms"],
                result=spec["result"] if status is RobotStatus.SUCCEEDED else None,
                error=None if status is RobotStatus.SUCCEEDED else ErrorInfo("Boom", "ünïcode"),
                scheduled_at=now + timedelta(seconds=60) if status is RobotStatus.QUEUED
                else None,
                module="elsewhere" if spec["move"] and status is RobotStatus.QUEUED else None,
                followup=child, claimed=c.robot if spec["claimed"] else None))
        return batch

    batched, single = completions(twins[0]), completions(twins[1])
    if repeat is not None:  # the same robot twice in a batch: once stale, once current
        twice = attrs.evolve(batched[repeat], lease_token=new_id(), followup=None)
        batched.insert(0, twice)
        single.insert(0, attrs.evolve(single[repeat], lease_token=new_id(), followup=None))
    got_batched = await driver.complete_many(batched)
    got_single = [await driver.complete(c) for c in single]

    def same(a: Robot | None, b: Robot | None) -> bool:
        if a is None or b is None:
            return a is b
        return attrs.evolve(a, id="x", lease_token=None) == \
            attrs.evolve(b, id="x", lease_token=None)

    assert [r is None for r in got_batched] == [r is None for r in got_single]
    assert all(same(a, b) for a, b in zip(got_batched, got_single, strict=True))
    # Each robot as returned is the robot stored, every field (the second of a robot
    # that is twice in the batch is the one that ended it).
    for got in got_batched[1 if repeat is not None else 0:] + got_single[
            1 if repeat is not None else 0:]:
        if got is not None:
            assert got == await stored(driver, got.id)
    for a, b, ca, cb in zip(twins[0], twins[1], batched[-len(outcomes):],
                            single[-len(outcomes):], strict=True):
        assert same(await stored(driver, a.id), await stored(driver, b.id))
        assert [(e.status, e.duration_ms, e.error, e.finished_at)
                for e in await driver.list_executions(a.id)] == \
            [(e.status, e.duration_ms, e.error, e.finished_at)
             for e in await driver.list_executions(b.id)]
        if ca.followup is not None:
            assert cb.followup is not None
            assert (await driver.get_robot(ca.followup.id) is None) == \
                (await driver.get_robot(cb.followup.id) is None)


async def test_a_retry_without_a_new_due_time_keeps_its_own_and_is_not_finished(
    driver: StorageDriver,
) -> None:
    """Back to queued with no ``scheduled_at``: the robot keeps the due time it had and has
    no ``finished_at``, alone or in a batch with a terminal completion."""
    robots = [make_robot() for _ in range(3)]
    await create(driver, *robots)
    claims = {c.robot.id: c for c in await claim(driver, limit=3)}
    retry_alone, retry_batched, done = (claims[r.id] for r in robots)
    assert await driver.complete(completion(retry_alone, RobotStatus.QUEUED)) is not None
    await driver.complete_many([completion(retry_batched, RobotStatus.QUEUED,
                                           claimed=retry_batched.robot),
                                completion(done, RobotStatus.SUCCEEDED, claimed=done.robot)])
    for c in (retry_alone, retry_batched):
        robot = await stored(driver, c.robot.id)
        assert (robot.status, robot.finished_at, robot.scheduled_at) == (
            RobotStatus.QUEUED, None, c.robot.scheduled_at)
    assert (await stored(driver, done.robot.id)).finished_at is not None


def test_complete_many_ends_robots_as_completing_them_one_by_one(
    new_driver: Callable[[], StorageDriver],
) -> None:
    """A batch goes through set-based SQL; it must end each robot as ``complete`` does:
    any mix of outcomes, results, retries moved to another module, follow-ups, lost
    leases, and the same robot twice in a batch."""
    with _driver_in_portal(new_driver) as (portal, driver):

        @settings(max_examples=25, deadline=None)
        @given(outcomes=st.lists(_outcomes, min_size=1, max_size=6), data=st.data())
        def check(outcomes: list[dict[str, Any]], data: st.DataObject) -> None:
            repeat = data.draw(st.one_of(st.none(), st.integers(0, len(outcomes) - 1)))
            portal.call(_complete_twins, driver, outcomes, repeat)

        check()


# --- progress reports in a batch ------------------------------------------------------------


def _batch_progress(driver: StorageDriver) -> Any:
    """The driver's batch method, or one at a time (a driver may lack the batch)."""
    many = getattr(driver, "update_progress_many", None)
    if many is not None:
        return many

    async def one_by_one(reports: Sequence[ProgressReport], now: datetime) -> list[Any]:
        return [await driver.update_progress(r.robot_id, r.lease_token, r.progress,
                                             r.message, now) for r in reports]

    return one_by_one


async def test_a_batch_of_progress_reports_is_stored_each_under_its_own_lease(
    driver: StorageDriver,
) -> None:
    robots = [make_robot() for _ in range(4)]
    await create(driver, *robots)
    claims = {c.robot.id: c for c in await claim(driver, limit=4)}
    c0, c1, c2, c3 = (claims[r.id] for r in robots)
    await driver.update_progress(c1.robot.id, c1.execution.id, 80, "far along", utcnow())
    done = await _batch_progress(driver)([
        ProgressReport(c0.robot.id, c0.execution.id, 25, "a quarter"),
        ProgressReport(c1.robot.id, c1.execution.id, 40, "back?"),  # never goes down
        ProgressReport(c2.robot.id, "not-my-lease", 90, "stolen"),
        ProgressReport(c3.robot.id, c3.execution.id, 100, None),
    ], utcnow())
    assert [None if r is None else (r.progress, r.progress_message) for r in done] == [
        (25, "a quarter"), (80, "back?"), None, (100, None)]
    assert (await stored(driver, c2.robot.id)).progress == 0
    assert [(await stored(driver, r.id)).progress for r in robots] == [25, 80, 0, 100]
    # the same robot twice in a batch: both reports apply, the higher progress stays
    twice = await _batch_progress(driver)([
        ProgressReport(c0.robot.id, c0.execution.id, 60, "sixty"),
        ProgressReport(c0.robot.id, c0.execution.id, 50, "fifty")], utcnow())
    assert [r.progress for r in twice if r is not None] == [60, 60]
    assert (await stored(driver, c0.robot.id)).progress_message == "fifty"
