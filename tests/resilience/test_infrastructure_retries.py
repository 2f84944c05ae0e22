"""Infrastructure retries: transient store errors are retried (tenacity), bad input never."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg.errors
import pytest
from psycopg_pool import PoolTimeout

from robotframework_mvp.config import StorageConfig
from robotframework_mvp.state.postgres import PostgresDriver, is_transient

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]


@pytest.fixture
async def driver(postgres_url: str) -> AsyncIterator[PostgresDriver]:
    built = PostgresDriver(postgres_url, StorageConfig(url=postgres_url))
    await built.open()
    try:
        yield built
    finally:
        await built.close()


async def test_a_killed_session_is_retried_on_a_fresh_connection(driver: PostgresDriver) -> None:
    calls = 0

    async def once_killed(conn: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        cur = await conn.execute("SELECT 42 AS answer")
        row = await cur.fetchone()
        return int(row["answer"])

    assert await driver._write(once_killed) == 42
    assert calls == 2
    assert driver.availability.breaker.state.value == "closed", "the server was up"
    assert driver.availability.probes == 1


async def test_bad_input_is_never_retried(driver: PostgresDriver) -> None:
    calls = 0

    async def divide(conn: Any) -> None:
        nonlocal calls
        calls += 1
        await conn.execute("SELECT 1 / 0")

    with pytest.raises(psycopg.errors.DivisionByZero):
        await driver._write(divide)
    assert calls == 1
    assert driver.availability.breaker.state.value == "closed", "the server answered"


@pytest.mark.parametrize(("error", "transient"), [
    (psycopg.errors.AdminShutdown("terminating connection"), True),
    (psycopg.errors.SerializationFailure("could not serialize"), True),
    (psycopg.errors.DeadlockDetected("deadlock"), True),
    (psycopg.OperationalError("server closed the connection unexpectedly"), True),
    (psycopg.errors.UniqueViolation("duplicate key"), False),
    (psycopg.errors.DivisionByZero("division by zero"), False),
    (psycopg.errors.CheckViolation("check"), False),
    (PoolTimeout("couldn't get a connection after 10.00 sec"), False),
    (ValueError("not a store error"), False),
])
def test_only_transient_errors_are_retryable(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient
