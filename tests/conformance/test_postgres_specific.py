"""What only the PostgreSQL driver promises: replica fallback, surviving dropped
connections, safe error messages, and LISTEN/NOTIFY wake-ups across processes.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, timedelta
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
import anyio.abc
import anyio.to_thread
import psycopg
import pytest

from robotframework_mvp.config import StorageConfig
from robotframework_mvp.errors import ServiceUnavailableError
from robotframework_mvp.models import Robot, RobotStatus, new_id, utcnow
from robotframework_mvp.state.driver import Completion
from robotframework_mvp.state.postgres import _Q, PostgresDriver, _fetchone

pytestmark = pytest.mark.anyio


def with_port(url: str, port: int, password: str | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or ""
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    return urlunsplit(parts._replace(netloc=f"{auth}{parts.hostname}:{port}"))


def closed_port() -> int:
    """A local TCP port nobody listens on (connections are refused at once)."""
    return 1


def make_robot(**changes: Any) -> Robot:
    fields: dict[str, Any] = {
        "id": new_id(), "kind": "ocr", "payload": {"n": 1}, "owner": "alice",
        "tenant": "acme", "status": RobotStatus.QUEUED, "module": "ocr-fast",
        "scheduled_at": utcnow() - timedelta(seconds=1),
    }
    fields.update(changes)
    return Robot(**fields)


@pytest.fixture
async def open_driver(
    postgres_url: str, anyio_backend: str
) -> AsyncIterator[Callable[..., Any]]:
    """Opens (and later closes) drivers on this test's schema; the first one migrates."""
    opened: list[PostgresDriver] = []

    async def build(**config: Any) -> PostgresDriver:
        driver = PostgresDriver(postgres_url, StorageConfig(url=postgres_url, **config))
        await driver.open()
        opened.append(driver)
        if len(opened) == 1:
            await driver.migrate()
        return driver

    try:
        yield build
    finally:
        for driver in opened:
            await driver.close()


def terminate_sessions(url: str, application_name: str) -> int:
    """pg_terminate_backend every session of one driver; wait until they are gone."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND application_name = %s",
            (application_name,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


# --- plans that last -------------------------------------------------------------------------


def _as_prepared(query: str) -> tuple[str, list[str]]:
    """``query`` with its ``%(name)s`` parameters as ``$1``, ``$2``..., and the names."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)[sb]", number, query), names


@pytest.mark.parametrize("name", ["claim_robots", "reassign_queued_robots",
                                  "fail_queued_robots"])
async def test_a_queue_statement_planned_on_an_empty_table_changes_rows_by_id(
    open_driver: Callable[..., Any], postgres_url: str, name: str,
) -> None:
    """psycopg prepares these statements, and PostgreSQL keeps the generic plan it made
    for them; a fresh deployment makes it while the robots table is empty. That plan must
    still change the robots its CTE locked by their id (robots_pkey), not walk the whole
    queue (robots_queue) for each of them: at 20,000 queued robots, claims took 20-200 ms
    each until the next ANALYZE. (The statements that change running robots by lease
    token may still walk the running ones, a set bounded by the workers' slots, and they
    must keep their status test: see docs/performance.md.)"""
    await open_driver()  # migrated, empty
    query, names = _as_prepared(_Q[name])
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE queued_statement AS {query}")
        conn.execute("BEGIN")
        try:
            rows = conn.execute(
                "EXPLAIN (COSTS OFF) EXECUTE queued_statement("
                + ", ".join("NULL" for _ in names) + ")").fetchall()
        finally:
            conn.execute("ROLLBACK")
    plan = "\n".join(row[0] for row in rows)
    assert "Index Scan using robots_pkey on robots r" in plan, plan
    assert "robots_queue on robots r" not in plan, plan


# --- read replica -------------------------------------------------------------------------


async def test_reads_fall_back_to_the_write_pool_when_the_replica_is_unreachable(
    postgres_url: str, open_driver: Callable[..., Any]
) -> None:
    driver = await open_driver(read_url=with_port(postgres_url, closed_port()), timeout=2.0)
    robot = make_robot()
    await driver.create_robots([robot])
    assert await driver.get_robot(robot.id) == robot
    listed = await driver.list_robots(tenant="acme", status=None, kind=None, limit=10,
                                      before_id=None)
    assert [r.id for r in listed] == [robot.id]
    assert await driver.count_robots() == {("ocr", "queued"): 1}
    assert driver.read_fallbacks >= 3


async def test_reads_use_a_working_replica_without_falling_back(
    postgres_url: str, open_driver: Callable[..., Any]
) -> None:
    driver = await open_driver(read_url=postgres_url)
    robot = make_robot()
    await driver.create_robots([robot])
    assert await driver.get_robot(robot.id) == robot
    assert driver.read_fallbacks == 0


# --- which pooled connection a call gets ---------------------------------------------------


async def _backend_pid(driver: PostgresDriver) -> int:
    async def pid(conn: Any) -> int:
        row = await (await conn.execute("SELECT pg_backend_pid() AS pid")).fetchone()
        return int(row["pid"])

    return await driver._write(pid)


async def test_calls_one_after_another_stay_on_the_connection_returned_last(
    open_driver: Callable[..., Any],
) -> None:
    # A lone caller (one robot submitted, then awaited) must meet a warm server process,
    # not go round every pooled connection: that cost 0.2 ms a statement (the pool's doc).
    driver = await open_driver(pool_min_size=4, pool_max_size=4)
    in_use: set[int] = set()
    held = anyio.Event()

    async def hold(conn: Any) -> None:
        in_use.add(conn.info.backend_pid)
        if len(in_use) == 4:
            held.set()
        await held.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(driver._write, hold)
    assert len(in_use) == 4  # four at once still get four connections

    pids = [await _backend_pid(driver) for _ in range(8)]
    assert len(set(pids)) == 1, pids


async def test_the_pool_figures_count_the_time_connections_are_lent_out(
    open_driver: Callable[..., Any],
) -> None:
    # psycopg_pool counts usage_ms only in its connection() context manager, which the
    # driver does not use (it costs 14 us a call): the driver counts it instead.
    driver = await open_driver(pool_min_size=1, pool_max_size=1)
    before = driver.pool_stats()["write"]["usage_ms"]
    await driver._write(lambda conn: conn.execute("SELECT pg_sleep(0.08)"))
    figures = driver.pool_stats()["write"]
    assert figures["usage_ms"] - before >= 80
    assert figures["pool_available"] == 1  # and the connection went back


async def test_pooled_sessions_speak_utc_whatever_the_server_zone(
    postgres_url: str, open_driver: Callable[..., Any],
) -> None:
    # In the server's zone, even Etc/UTC, every timestamp read needs a conversion.
    # The fixture's URL ends with its search_path option: add the zone to that option.
    assert "options=" in postgres_url
    zoned = postgres_url + quote(" -ctimezone=Asia/Tokyo")
    driver = PostgresDriver(zoned, StorageConfig(url=zoned))
    await driver.open()
    try:
        robot = make_robot()
        await (await open_driver()).create_robots([robot])

        async def zone(conn: Any) -> str:
            row = await (await conn.execute("SHOW TimeZone")).fetchone()
            return str(row["TimeZone"])

        assert await driver._write(zone) == "UTC"
        stored = await driver.get_robot(robot.id)
        assert stored is not None
        assert stored.created_at.tzinfo is UTC
        assert stored.created_at == robot.created_at
    finally:
        await driver.close()


async def test_a_call_cancelled_mid_statement_gives_its_connection_back(
    open_driver: Callable[..., Any],
) -> None:
    driver = await open_driver(pool_min_size=1, pool_max_size=1)
    with anyio.move_on_after(0.2) as scope:
        await driver._write(lambda conn: conn.execute("SELECT pg_sleep(30)"))
    assert scope.cancelled_caught
    # The only connection is usable again at once: nothing waits out the pool timeout.
    with anyio.fail_after(5):
        robot = make_robot()
        await driver.create_robots([robot])
        assert await driver.get_robot(robot.id) == robot
    assert driver.pool_stats()["write"]["pool_size"] == 1


async def test_one_row_statements_share_a_cursor_that_outlives_failed_and_cancelled_ones(
    open_driver: Callable[..., Any],
) -> None:
    # A new cursor a statement costs 52k instructions (its own adapters and dumpers), so
    # the one-row statements of the latency path run on the connection's kept cursor.
    driver = await open_driver(pool_min_size=1, pool_max_size=1)
    robot = make_robot()
    await driver.create_robots([robot])
    kept: list[Any] = []

    async def note_kept_cursor(conn: Any) -> None:
        kept.append(conn.kept_cursor())

    await driver._write(note_kept_cursor)
    assert await driver.get_robot(robot.id) == robot
    await driver._write(note_kept_cursor)
    assert kept[0] is kept[1]

    # A statement that fails on it, and one cancelled on it, leave the next one working.
    with pytest.raises(psycopg.errors.DivisionByZero):
        await driver._write(lambda conn: _fetchone(conn, "SELECT 1 / 0 AS n"))
    assert await driver.get_robot(robot.id) == robot
    with anyio.move_on_after(0.2) as scope:
        await driver._write(lambda conn: _fetchone(conn, "SELECT pg_sleep(30) AS n"))
    assert scope.cancelled_caught
    with anyio.fail_after(5):
        assert await driver.get_robot(robot.id) == robot


async def test_a_transaction_left_open_by_a_call_is_rolled_back_not_committed(
    open_driver: Callable[..., Any],
) -> None:
    driver = await open_driver(pool_min_size=1, pool_max_size=1)
    robot = make_robot()

    async def insert_and_leave_open(conn: Any) -> None:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO robots (id, kind, payload, owner, tenant, status, "
                           "max_attempts, created_at, updated_at, scheduled_at) "
                           "VALUES (%s, 'k', '{}', 'o', 't', 'queued', 1, now(), now(), now())",
                           [robot.id])

    async def transaction_status(conn: Any) -> psycopg.pq.TransactionStatus:
        return conn.info.transaction_status  # type: ignore[no-any-return]

    await driver._write(insert_and_leave_open)
    assert await driver._write(transaction_status) == psycopg.pq.TransactionStatus.IDLE
    assert await driver.get_robot(robot.id) is None


# --- dropped connections and dead servers -------------------------------------------------


async def test_calls_succeed_after_the_server_terminated_every_pooled_connection(
    postgres_url: str, open_driver: Callable[..., Any]
) -> None:
    driver = await open_driver(pool_min_size=3)
    robot = make_robot()
    await driver.create_robots([robot])
    killed = await anyio.to_thread.run_sync(
        terminate_sessions, postgres_url, driver.application_name
    )
    assert killed >= 1
    assert await driver.get_robot(robot.id) == robot

    await anyio.to_thread.run_sync(terminate_sessions, postgres_url, driver.application_name)
    now = utcnow()
    [claim] = await driver.claim_robots(module="ocr-fast", limit=5, worker="w", now=now,
                                        lease_expires_at=now + timedelta(seconds=30))
    assert claim.robot.id == robot.id


async def test_a_create_retried_after_its_insert_committed_returns_the_robot_as_created(
    open_driver: Callable[..., Any],
) -> None:
    # What a retry sees when the first attempt committed but its connection died before
    # the answer arrived: the robot is there under our own id, so it is ours.
    driver = await open_driver()
    robot = make_robot(idempotency_key="order-1")
    assert await driver.create_robots([robot]) == [(robot, True)]
    assert await driver.create_robots([robot]) == [(robot, True)]
    other = make_robot(idempotency_key="order-1")
    assert await driver.create_robots([other]) == [(robot, False)]


async def test_an_unreachable_server_is_reported_as_unavailable_without_the_password(
    postgres_url: str, anyio_backend: str
) -> None:
    url = with_port(postgres_url, closed_port(), password="s3cr3t-Pa55")
    driver = PostgresDriver(url, StorageConfig(url=url, timeout=1.0))
    with pytest.raises(ServiceUnavailableError) as info:
        await driver.open()
    message = str(info.value)
    assert "s3cr3t-Pa55" not in message
    assert "s3cr3t-Pa55" not in repr(info.value.to_dict())
    assert f":{closed_port()}/" in message
    await driver.close()


async def test_calls_on_a_closed_driver_are_reported_as_unavailable(
    open_driver: Callable[..., Any],
) -> None:
    driver = await open_driver()
    await driver.close()
    with pytest.raises(ServiceUnavailableError):
        await driver.get_robot(new_id())
    await driver.close()  # closing twice is fine


# --- LISTEN / NOTIFY ----------------------------------------------------------------------


class Wakeups:
    """Counts ``on_notify`` calls; ``next()`` waits at most one second for the next one."""

    def __init__(self) -> None:
        self.send, self.receive = anyio.create_memory_object_stream[None](math.inf)

    def __call__(self) -> None:
        self.send.send_nowait(None)

    async def next(self, timeout: float = 1.0) -> None:
        with anyio.fail_after(timeout):
            await self.receive.receive()


@pytest.fixture
async def listening(
    open_driver: Callable[..., Any],
) -> AsyncIterator[tuple[PostgresDriver, PostgresDriver, Wakeups]]:
    """A listening driver, another driver (another process) that writes, and the wake-ups."""
    listener = await open_driver()
    writer = await open_driver()
    wakeups = Wakeups()
    async with anyio.create_task_group() as tg:
        await tg.start(listener.listen, wakeups)
        yield listener, writer, wakeups
        tg.cancel_scope.cancel()


async def test_listen_wakes_within_a_second_when_another_process_creates_a_robot(
    listening: tuple[PostgresDriver, PostgresDriver, Wakeups],
) -> None:
    _, writer, wakeups = listening
    await writer.create_robots([make_robot()])
    await wakeups.next()


async def test_listen_wakes_on_every_path_that_puts_a_robot_back_in_the_queue(
    listening: tuple[PostgresDriver, PostgresDriver, Wakeups],
) -> None:
    _, writer, wakeups = listening
    robot = make_robot(max_attempts=5)
    await writer.create_robots([robot])
    await wakeups.next()

    async def claim(lease: float = 30) -> str:
        now = utcnow()
        [c] = await writer.claim_robots(module="ocr-fast", limit=1, worker="w", now=now,
                                        lease_expires_at=now + timedelta(seconds=lease))
        return c.execution.id

    token = await claim()
    await writer.complete(Completion(
        robot_id=robot.id, lease_token=token, status=RobotStatus.QUEUED,
        execution_status="failed", finished_at=utcnow(), duration_ms=1.0,
        scheduled_at=utcnow(),
    ))
    await wakeups.next()

    token = await claim()
    assert await writer.release_robots([(robot.id, token)], utcnow()) == 1
    await wakeups.next()

    await claim(lease=-1)
    assert [r.status for r in await writer.reap_expired_leases(utcnow())] == [
        RobotStatus.QUEUED]
    await wakeups.next()

    token = await claim()
    await writer.complete(Completion(
        robot_id=robot.id, lease_token=token, status=RobotStatus.FAILED,
        execution_status="failed", finished_at=utcnow(), duration_ms=1.0,
    ))
    assert await writer.requeue_robot(robot.id, utcnow(), 1) is not None
    await wakeups.next()


async def test_listen_reconnects_after_its_connection_is_terminated(
    postgres_url: str, listening: tuple[PostgresDriver, PostgresDriver, Wakeups],
) -> None:
    listener, writer, wakeups = listening
    await anyio.to_thread.run_sync(terminate_sessions, postgres_url, listener.application_name)
    # Notifications sent while it was away are lost, so it wakes once on reconnecting...
    await wakeups.next(timeout=5)
    # ...and then hears new robots again.
    await writer.create_robots([make_robot()])
    await wakeups.next()
