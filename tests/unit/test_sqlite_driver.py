"""What is particular to the SQLite driver (the conformance suite covers the rest).

It decodes robot rows by column position, so it must refuse a robots table whose columns
are not the ones its migrations make, and a SQLite without RETURNING. It runs small
writes on the event loop, so those must never wait there for another process's lock, and
the WAL must still be checkpointed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from robotframework_mvp.errors import ConfigError, ServiceUnavailableError
from robotframework_mvp.models import Robot, RobotStatus, new_id, utcnow
from robotframework_mvp.state import sqlite as sqlite_driver
from robotframework_mvp.state.sqlite import ROBOT_COLUMNS, SQLiteDriver

pytestmark = pytest.mark.anyio


async def test_migrated_robots_table_has_the_columns_rows_are_decoded_by(
        tmp_path: Path) -> None:
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    await driver.open()
    try:
        await driver.migrate()
    finally:
        await driver.close()
    with sqlite3.connect(tmp_path / "robots.db") as conn:
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(robots)"))
    assert columns == ROBOT_COLUMNS
    reopened = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    await reopened.open()  # and opens again without complaint
    await reopened.close()


async def test_a_robots_table_with_other_columns_is_refused_with_what_to_do(
        tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "robots.db") as conn:
        conn.execute("CREATE TABLE robots (id TEXT PRIMARY KEY, status TEXT, kind TEXT)")
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    with pytest.raises(ConfigError, match=r"rfmvp migrate.*found id, status, kind"):
        await driver.open()
    with pytest.raises(ServiceUnavailableError, match="not open"):  # nothing left open
        await driver.get_robot("r-1")


async def test_a_sqlite_without_returning_is_refused_with_the_version_needed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sqlite_driver.sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite_driver.sqlite3, "sqlite_version", "3.31.1")
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    with pytest.raises(ConfigError, match=r"SQLite 3\.31\.1 is too old.*3\.35\.0 or newer"):
        await driver.open()


def _robot() -> Robot:
    return Robot(id=new_id(), kind="ocr", payload={"n": 1}, owner="alice", tenant="acme",
                 status=RobotStatus.QUEUED, module="ocr-fast",
                 scheduled_at=utcnow() - timedelta(seconds=1))


@asynccontextmanager
async def _driver_while_another_connection_writes(
        tmp_path: Path) -> AsyncIterator[tuple[SQLiteDriver, sqlite3.Connection]]:
    """An open, migrated driver, and another connection (process) that holds the write
    lock (``BEGIN IMMEDIATE``) until the test commits it."""
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    await driver.open()
    try:
        await driver.migrate()
        other = sqlite3.connect(tmp_path / "robots.db", isolation_level=None,
                                check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield driver, other
        finally:
            other.close()
    finally:
        await driver.close()


async def test_a_small_write_waits_off_the_loop_while_another_process_holds_the_lock(
        tmp_path: Path) -> None:
    async with _driver_while_another_connection_writes(tmp_path) as (driver, other):
        created: list[Robot] = []

        async def create() -> None:
            [(robot, _)] = await driver.create_robots([_robot()])
            created.append(robot)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(create)
                await wait_all_tasks_blocked()  # the loop runs on while the write waits
                assert created == []
                await anyio.to_thread.run_sync(other.execute, "COMMIT")
        assert await driver.get_robot(created[0].id) == created[0]


async def test_small_writes_on_the_loop_still_get_the_wal_checkpointed(
        tmp_path: Path) -> None:
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    await driver.open()
    try:
        await driver.migrate()
        for _ in range(1500):
            await driver.create_robots([_robot()])
        # Checkpointed along the way, the WAL was rewound and reused; never checkpointed,
        # it would hold every page of all 1,500 commits (about 10 each). Checkpoints stay
        # small (a few hundred pages, about 1 ms): the writes on the loop wait for each.
        assert (tmp_path / "robots.db-wal").stat().st_size < 1000 * 4096
    finally:
        await driver.close()


async def test_a_small_write_waiting_for_thread_writes_is_not_starved_by_more_of_them(
        tmp_path: Path) -> None:
    """Thread writes submitted back to back (a stream of submissions) must let a small
    write that waits for them (a completion on the loop) go between two of them."""
    async with _driver_while_another_connection_writes(tmp_path) as (driver, other):
        written: list[int] = []
        small_done_after: list[int] = []

        async def stream_of_batches() -> None:
            for n in range(20):  # each batch is too large for the loop: a thread write
                await driver.create_robots([_robot() for _ in range(12)])
                written.append(n)

        async def small_write() -> None:
            await driver.create_robots([_robot()])
            small_done_after.append(len(written))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream_of_batches)
                await wait_all_tasks_blocked()  # its first batch waits for the lock
                tg.start_soon(small_write)
                await wait_all_tasks_blocked()  # the small write waits for that batch
                await anyio.to_thread.run_sync(other.execute, "COMMIT")
        assert small_done_after == [1]  # right after the batch it waited for
        assert len(written) == 20
