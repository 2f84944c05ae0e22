"""PostgreSQL storage driver: many processes on many machines share one database.

It owns two psycopg 3 connection pools: a write pool on the primary and, when
``StorageConfig.read_url`` is set, a read pool (a replica) that falls back to the write
pool while it is down. Every robot transition is one conditional SQL statement (CTEs
that write keep the robot and its execution in step), which PostgreSQL runs as one
transaction in one round trip; the few multi-statement steps (migrations, audit appends)
use explicit transactions. Claims use ``FOR UPDATE SKIP LOCKED``; statements that queue
work ``pg_notify`` a channel named after the schema, which ``listen`` turns into wake-ups.

Retries: a transient error (lost connection, server shutdown, serialization failure,
deadlock) is retried a few times. That is safe because nothing here applies twice: a
conditional write whose first attempt did commit finds its ``WHERE`` false the second
time and returns None (or 0), just as if another worker had won; ``create_robots``
recognises its own ids; ``append_audit`` checks whether its previous attempt committed.
The one lossy case is a claim that committed while its connection died: those robots
stay ``running`` under leases nobody holds until the reaper requeues them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout, TooManyRequests

from ..config import RateLimit, StorageConfig
from ..errors import ConfigError, ConflictError, ServiceUnavailableError, ValidationError
from ..models import (
    ApiKey,
    AuditEvent,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    MisfirePolicy,
    ModuleRecord,
    Robot,
    RobotStatus,
    Schedule,
    json_bytes,
    json_loads,
    new_id,
)
from ..resilience import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    backoff_delay,
    infrastructure_retrying,
)
from .availability import PROBE_TIMEOUT, StoreAvailability
from .driver import (
    Claim,
    Completion,
    ProgressReport,
    ScheduleFire,
    chain_audit_in_slices,
    check_claimable,
    claim_of,
    created_claim,
    ended_robot,
    ended_robots,
    followup_from_json,
    followups_json,
    set_based,
)
from .queries import load_migrations, load_queries

__all__ = ["PostgresDriver", "describe_url", "is_transient"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class PooledConnection(psycopg.AsyncConnection[DictRow]):
    """A pooled connection that keeps one cursor for the one-row statements it runs.

    ``conn.execute`` makes a cursor a statement, and each new cursor builds its own
    adapters map and dumpers: about 52k instructions of the 325k that psycopg spent on
    a create-claimed insert (callgrind, docs/performance.md). The latency path is such
    statements (a robot created claimed, its completion), so ``_fetchone`` and
    ``create_and_claim`` run them on this kept cursor instead. It holds one row's result
    until the connection's next one-row statement; the many-row reads keep cursors of
    their own.
    """

    _kept: psycopg.AsyncCursor[DictRow] | None = None

    def kept_cursor(self) -> psycopg.AsyncCursor[DictRow]:
        cursor = self._kept
        if cursor is None or cursor.closed:
            cursor = self._kept = self.cursor()
        return cursor


Connection = PooledConnection


class MostRecentFirstPool(AsyncConnectionPool[Connection]):
    """A psycopg pool that hands out the connection returned last (LIFO).

    psycopg_pool hands out the connection idle longest (FIFO), so sequential calls go
    round all its connections. Each then meets a server process gone cold: on a 2-core
    machine a one-row claim took 0.59-0.61 ms through a pool of four or eight
    connections, against 0.37-0.40 ms through a pool of one (docs/performance.md). Most
    recent first keeps a lone caller on one warm connection. Under load every connection
    is busy and the order does not matter; when load falls, the connections left at the
    back go idle and psycopg's ``max_idle`` closes them, as SQLAlchemy's ``pool_use_lifo``
    does.

    psycopg_pool has no option for this. Its ready connections are a deque that it
    takes from the left and returns to on the right; turning the deque one step right
    before it takes puts the newest first and leaves the others in their order.
    A test in ``tests/conformance/test_postgres_specific.py`` fails if a psycopg_pool
    release changes that.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: milliseconds connections spent lent out (``PostgresDriver._once`` counts them:
        #: psycopg_pool counts ``usage_ms`` only in ``connection()``, which it does not use)
        self.usage_ms = 0

    async def _get_ready_connection(self, timeout: float | None) -> Connection | None:
        self._pool.rotate(1)
        return await super()._get_ready_connection(timeout)


Pool = MostRecentFirstPool

_Q = load_queries("postgres")
#: first key of our advisory locks (the second is a hash of the schema name)
_MIGRATION_LOCK = 0x5246_4D01
_AUDIT_LOCK = 0x5246_4D02
#: longest a read waits for a replica connection before using the primary instead
_REPLICA_WAIT = 1.0
#: a LISTEN connection checks itself this often (a silent network drop shows up then)
_LISTEN_KEEPALIVE = 30.0
_LISTEN_BACKOFF = (0.1, 10.0)
_TRANSIENT_ERRORS = (
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.AdminShutdown,
    psycopg.errors.CrashShutdown,
    psycopg.errors.CannotConnectNow,
)
#: the pool use of a call no breaker watches (the read pool)
_NOT_WATCHED: contextlib.nullcontext[None] = contextlib.nullcontext()
_LEASE_EXPIRED = ErrorInfo(
    "lease_expired", "the worker running this robot stopped renewing its lease (it died or froze)"
)


def is_transient(exc: BaseException) -> bool:
    """Whether trying again on a fresh connection may succeed.

    Pool timeouts are not: the pool has already waited its full timeout.
    """
    if isinstance(exc, PoolTimeout | PoolClosed | TooManyRequests):
        return False
    if isinstance(exc, _TRANSIENT_ERRORS):
        return True
    if isinstance(exc, psycopg.OperationalError):
        # No SQLSTATE: the server never answered (connection lost); class 08: connection.
        return exc.sqlstate is None or exc.sqlstate.startswith("08")
    return False


def describe_url(url: str) -> str:
    """``postgresql://user@host:port/db``: what to show of a URL (never a password)."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unparsable URL)"
    user = params.get("user")
    host = params.get("host") or "localhost"
    port = params.get("port") or "5432"
    return f"postgresql://{f'{user}@' if user else ''}{host}:{port}/{params.get('dbname') or ''}"


def _parse_url(url: str, variable: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(url)
    except psycopg.Error:
        # Never echo the URL: it may hold a password.
        raise ConfigError(
            f"{variable} is not a valid PostgreSQL URL; use postgresql://USER@HOST:PORT/DB"
        ) from None


def _schema_of(url: str) -> str | None:
    options = str(conninfo_to_dict(url).get("options") or "")
    match = re.search(r"search_path\s*=\s*([\w$]+)", options)
    return match.group(1) if match else None


def _identifier(text: str, limit: int = 63) -> str:
    """``text`` as a lower-case identifier within PostgreSQL's 63-byte limit."""
    name = re.sub(r"[^a-z0-9_]", "_", text.lower())
    if len(name) > limit:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = f"{name[: limit - 9]}_{digest}"
    return name


def _utc(value: datetime) -> datetime:
    # psycopg gives timestamptz in the session's time zone; the model speaks UTC. Pooled
    # sessions are in UTC (``_configure``): the value comes back as it is, at no cost.
    return value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _error(value: dict[str, Any] | None) -> ErrorInfo | None:
    return None if value is None else ErrorInfo(type=value["type"], message=value["message"])


def _error_jsonb(error: ErrorInfo | None) -> Jsonb | None:
    return None if error is None else Jsonb({"type": error.type, "message": error.message})


def robot_from_row(row: DictRow) -> Robot:
    return Robot(
        id=row["id"],
        kind=row["kind"],
        payload=row["payload"],
        owner=row["owner"],
        tenant=row["tenant"],
        status=RobotStatus(row["status"]),
        module=row["module"],
        progress=row["progress"],
        progress_message=row["progress_message"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        priority=row["priority"],
        idempotency_key=row["idempotency_key"],
        result=row["result"],
        error=_error(row["error"]),
        created_at=_utc(row["created_at"]),
        updated_at=_utc(row["updated_at"]),
        started_at=_utc_or_none(row["started_at"]),
        finished_at=_utc_or_none(row["finished_at"]),
        scheduled_at=_utc(row["scheduled_at"]),
        lease_expires_at=_utc_or_none(row["lease_expires_at"]),
        lease_token=row["lease_token"],
        parent_id=row["parent_id"],
        parent_trigger=row["parent_trigger"],
        schedule_id=row["schedule_id"],
        on_success=followup_from_json(row["followups"], "on_success"),
        on_failure=followup_from_json(row["followups"], "on_failure"),
    )


def schedule_from_row(row: DictRow) -> Schedule:
    return Schedule(
        id=row["id"], owner=row["owner"], tenant=row["tenant"], cron=row["cron"],
        timezone=row["timezone"], kind=row["kind"], payload=row["payload"],
        misfire_policy=MisfirePolicy(row["misfire_policy"]),
        last_due_at=_utc(row["last_due_at"]), next_due_at=_utc(row["next_due_at"]),
        priority=row["priority"], misfire_limit=row["misfire_limit"], paused=row["paused"],
        created_at=_utc(row["created_at"]), updated_at=_utc(row["updated_at"]),
    )


def _robot_columns(robots: Sequence[Robot]) -> dict[str, Any]:
    """``insert_robots``' array parameters (one array per column)."""
    return {
        "ids": [r.id for r in robots],
        "kinds": [r.kind for r in robots],
        "payloads": [Jsonb(r.payload) for r in robots],
        "owners": [r.owner for r in robots],
        "tenants": [r.tenant for r in robots],
        "statuses": [str(r.status) for r in robots],
        "modules": [r.module for r in robots],
        "max_attempts": [r.max_attempts for r in robots],
        "priorities": [r.priority for r in robots],
        "idempotency_keys": [r.idempotency_key for r in robots],
        "created_at": [r.created_at for r in robots],
        "updated_at": [r.updated_at for r in robots],
        "scheduled_at": [r.scheduled_at for r in robots],
        "parent_ids": [r.parent_id for r in robots],
        "parent_triggers": [r.parent_trigger for r in robots],
        "schedule_ids": [r.schedule_id for r in robots],
        "followups": [None if (j := followups_json(r)) is None else Jsonb(j) for r in robots],
    }


def _completion_rows(completions: Sequence[Completion]) -> Jsonb:
    """``complete_robots``' batch: one JSON array of rows, by orjson (as ``_robot_rows``)."""
    rows = []
    for c in completions:
        child = c.followup
        rows.append([
            c.robot_id, c.lease_token, str(c.status), str(c.execution_status), c.result,
            None if c.error is None else {"type": c.error.type, "message": c.error.message},
            c.finished_at, float(c.duration_ms), c.scheduled_at, c.module,
            *([None] * 6 if child is None else [
                child.id, child.kind, child.payload, child.module, child.max_attempts,
                child.parent_trigger]),
        ])
    return Jsonb(rows, dumps=json_bytes)


def _robot_rows(robots: Sequence[Robot]) -> Jsonb:
    """``insert_robots``' one parameter: the robots as a JSON array of rows, by orjson
    (``json_bytes``: 1.2 us a robot, against 4.5 us for psycopg to adapt one array per
    column), aware datetimes in ISO 8601 with their offset, to the microsecond."""
    return Jsonb([
        [r.id, r.kind, r.payload, r.owner, r.tenant, str(r.status), r.module,
         r.max_attempts, r.priority, r.idempotency_key, r.created_at, r.updated_at,
         r.scheduled_at, r.parent_id, r.parent_trigger, r.schedule_id, followups_json(r)]
        for r in robots], dumps=json_bytes)


class _Executor(Protocol):
    """A pooled connection, or a cursor on a caller's connection (transactional submit)."""

    async def execute(self, query: str, params: dict[str, Any] | None = None
                      ) -> psycopg.AsyncCursor[DictRow]: ...


class _CursorConnection:
    def __init__(self, cursor: psycopg.AsyncCursor[DictRow]) -> None:
        self.cursor = cursor

    async def execute(self, query: str, params: dict[str, Any] | None = None
                      ) -> psycopg.AsyncCursor[DictRow]:
        return await self.cursor.execute(query, params)


async def _insert_robots(conn: _Executor, robots: Sequence[Robot], channel: str | None
                         ) -> list[tuple[Robot, bool]]:
    """Insert robots on ``conn`` (in whatever transaction it is in); see create_robots."""
    params = {"robots": _robot_rows(robots), "channel": channel}
    cur = await conn.execute(_Q["insert_robots"], params)
    inserted = {row["id"] for row in await cur.fetchall()}
    by_id: dict[str, DictRow] = {}
    by_key: dict[tuple[str, str], DictRow] = {}
    if len(inserted) < len(robots):
        # A separate statement: its snapshot sees rows that concurrent submissions
        # committed while our insert waited on them.
        skipped = [r for r in robots if r.id not in inserted]
        keyed = [r for r in skipped if r.idempotency_key is not None]
        cur = await conn.execute(_Q["get_stored_robots"], {
            "ids": [r.id for r in skipped],
            "owners": [r.owner for r in keyed],
            "idempotency_keys": [r.idempotency_key for r in keyed],
        })
        for row in await cur.fetchall():
            by_id[row["id"]] = row
            if row["idempotency_key"] is not None:
                by_key[(row["owner"], row["idempotency_key"])] = row
    out: list[tuple[Robot, bool]] = []
    for robot in robots:
        if robot.id in inserted:
            out.append((robot, True))  # stored exactly as given
        elif robot.id in by_id:
            # Our own id: an earlier attempt of this call committed it.
            out.append((robot_from_row(by_id[robot.id]), True))
        elif robot.idempotency_key is not None and (
            stored := by_key.get((robot.owner, robot.idempotency_key))
        ) is not None:
            out.append((robot_from_row(stored), False))
        else:  # the conflicting robot vanished between the statements (purged)
            raise ServiceUnavailableError("robot creation raced a deletion; retry it")
    return out


def _execution_from_row(row: DictRow) -> Execution:
    return Execution(
        id=row["id"],
        robot_id=row["robot_id"],
        module=row["module"],
        attempt=row["attempt"],
        status=ExecutionStatus(row["status"]),
        worker=row["worker"],
        started_at=_utc(row["started_at"]),
        finished_at=_utc_or_none(row["finished_at"]),
        duration_ms=row["duration_ms"],
        error=_error(row["error"]),
    )


async def _fetchall(conn: Connection, query: str, params: dict[str, Any] | None = None
                    ) -> list[DictRow]:
    cur = await conn.execute(query, params)
    return await cur.fetchall()


async def _fetchone(conn: Connection, query: str, params: dict[str, Any] | None = None
                    ) -> DictRow | None:
    cur = await conn.kept_cursor().execute(query, params)
    return await cur.fetchone()


def _claimed_robot_params(robot: Robot, worker: str, now: datetime,
                         lease_expires_at: datetime, lease_token: str) -> dict[str, Any]:
    check_claimable([robot])
    followups = followups_json(robot)
    return {
        "id": robot.id, "kind": robot.kind, "payload": Jsonb(robot.payload),
        "owner": robot.owner, "tenant": robot.tenant, "module": robot.module,
        "max_attempts": robot.max_attempts, "priority": robot.priority,
        "created_at": robot.created_at, "now": now, "scheduled_at": robot.scheduled_at,
        "lease_expires_at": lease_expires_at, "parent_id": robot.parent_id,
        "parent_trigger": robot.parent_trigger, "schedule_id": robot.schedule_id,
        "followups": None if followups is None else Jsonb(followups), "worker": worker,
        "lease_token": lease_token,
    }


def _claimed_robot_rows(robots: Sequence[Robot], lease_tokens: Sequence[str]) -> Jsonb:
    """``insert_claimed_robots``' batch: one JSON array of rows, by orjson."""
    check_claimable(robots)
    return Jsonb([
        [r.id, r.kind, r.payload, r.owner, r.tenant, r.module, r.max_attempts, r.priority,
         r.created_at, r.scheduled_at, r.parent_id, r.parent_trigger, r.schedule_id,
         followups_json(r), token]
        for r, token in zip(robots, lease_tokens, strict=True)], dumps=json_bytes)


def _created_claim(robot: Robot, inserted: bool, lease_token: str, worker: str,
                   now: datetime, lease_expires_at: datetime) -> Claim | None:
    """The claim ``insert_claimed_robot`` made; None: the id existed (a retried call
    whose first try committed), nothing was written."""
    if not inserted:
        return None
    return created_claim(robot, lease_token=lease_token, worker=worker, now=now,
                         lease_expires_at=lease_expires_at)


class PostgresDriver:
    """StorageDriver on PostgreSQL (psycopg 3 async pools)."""

    name = "postgresql"
    #: every write waits on the network, so calls that arrive meanwhile join the next one
    #: anyway: a lone write need not give them a turn of the loop first (GroupCommitter)
    writes_wait_on_network = True

    def __init__(self, url: str, config: StorageConfig) -> None:
        self.url = url
        self.config = config
        #: what messages and logs show of the URL
        self.safe_url = describe_url(url)
        params = _parse_url(url, "RFMVP_STORAGE_URL")
        read_params = _parse_url(config.read_url, "RFMVP_STORAGE_READ_URL") if config.read_url \
            else {}
        self._passwords = {str(p.get("password") or "") for p in (params, read_params)} - {""}
        schema = _schema_of(url)
        #: names this driver's sessions in pg_stat_activity (the URL's own name wins)
        self.application_name: str = str(
            params.get("application_name") or _identifier(f"rfmvp_{schema}" if schema else "rfmvp")
        )
        #: reads served by the write pool because the read pool was failing
        self.read_fallbacks = 0
        self.channel: str | None = None
        #: PostgreSQL backend pids of this driver's pooled connections
        self._own_backends: set[int] = set()
        self._pool: Pool | None = None
        self._read_pool: Pool | None = None
        #: the write side: fail fast with 503 while PostgreSQL cannot be reached
        self.availability = StoreAvailability(
            "store:write", self.safe_url, self._probe,
            open_seconds=config.breaker_open_seconds, on_recover=self._renew_write_pool)
        #: the read replica: open means reads go to the write pool
        self._replica_reason = "unknown"
        self.read_breaker = CircuitBreaker(
            "store:read",
            BreakerPolicy(failure_rate_threshold=1.0, window_size=1, minimum_calls=1,
                          open_seconds=config.replica_retry_seconds, half_open_max_calls=1),
            on_change=self._replica_changed)

    # -- connections -------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "row_factory": dict_row,
            "application_name": self.application_name,
            "connect_timeout": max(2, int(self.config.timeout + 0.999)),
            # Prepare a statement on its second use on a connection (psycopg's default is
            # the sixth): the flow's statements are few and planning them is most of their
            # cost while a fresh pool warms up (1-2 ms each for the claim and completion).
            "prepare_threshold": 1,
        }

    def _new_pool(self, url: str, *, min_size: int, max_size: int, name: str) -> Pool:
        return MostRecentFirstPool(
            url,
            connection_class=PooledConnection,
            kwargs=self._connect_kwargs(),
            min_size=min(min_size, max_size),
            max_size=max_size,
            timeout=self.config.timeout,
            name=name,
            configure=self._configure,
            open=False,
        )

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Each new pooled connection: UTC, JSON by orjson, and its server process noted.

        In a UTC session psycopg gives timestamptz values in ``datetime.UTC``, which the
        model speaks (``_utc`` then returns them as they are): in the server's zone, even
        ``Etc/UTC``, each took 0.6 us to convert, six a robot read. JSON columns (payloads,
        results) are read with ``json_loads`` and written with ``json_bytes``: orjson, with
        ``json`` where orjson would differ; psycopg's default, ``json``, cost a claimed
        robot's payload and a completed robot's result 2-3 us each. The server process is
        noted for ``listen``.
        """
        await conn.execute("SET TIME ZONE 'UTC'")
        set_json_loads(json_loads, conn)
        set_json_dumps(json_bytes, conn)
        self._own_backends.add(conn.info.backend_pid)

    def _scrub(self, text: str) -> str:
        for password in self._passwords:
            text = text.replace(password, "***")
        return text

    def _unavailable(self, exc: BaseException, doing: str = "") -> ServiceUnavailableError:
        text = str(exc).strip()
        reason = self._scrub(text.splitlines()[0] if text else type(exc).__name__)
        return ServiceUnavailableError(
            f"PostgreSQL at {self.safe_url} is unavailable{doing}: {reason}. "
            "Check that the server is running and reachable, and RFMVP_STORAGE_URL."
        )

    async def _connect_error(self, url: str) -> str:
        """Why connecting fails, for the message of a pool that never filled."""
        with anyio.move_on_after(min(self.config.timeout, 5.0)):
            try:
                conn = await psycopg.AsyncConnection.connect(url, **self._connect_kwargs())
            except psycopg.Error as exc:
                return self._scrub(str(exc).strip().splitlines()[0])
            await conn.close()
            return "connections were not ready in time"
        return "connecting timed out"

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = self._new_pool(self.url, min_size=self.config.pool_min_size,
                              max_size=self.config.pool_max_size, name="rfmvp-write")
        try:
            await pool.open(wait=True, timeout=self.config.timeout)
        except PoolTimeout:
            reason = await self._connect_error(self.url)
            raise ServiceUnavailableError(
                f"cannot connect to PostgreSQL at {self.safe_url} within "
                f"{self.config.timeout:g} s: {reason}. Check that the server is running and "
                "reachable, and RFMVP_STORAGE_URL."
            ) from None
        self._pool = pool
        try:
            row = await self._run(pool, lambda c: _fetchone(c, _Q["current_schema"]))
        except BaseException:
            await self.close()
            raise
        schema = None if row is None else row["schema"]
        self.channel = _identifier(f"rfmvp_robots_{schema or 'public'}")
        if self.config.read_url:
            await self._open_read_pool(self.config.read_url)

    async def _probe(self) -> None:
        """One fresh, direct connection and ``SELECT 1``: is the server reachable now?"""
        kwargs = self._connect_kwargs()
        kwargs["connect_timeout"] = max(2, int(PROBE_TIMEOUT))
        conn = await psycopg.AsyncConnection.connect(self.url, **kwargs)
        try:
            await conn.execute("SELECT 1")
        finally:
            with anyio.CancelScope(shield=True):
                await conn.close()

    async def _renew_write_pool(self) -> None:
        """After an outage: a fresh write pool (the old one may be deep in its reconnection
        backoff, with no connection for seconds after the server is back)."""
        old = self._pool
        if old is None:
            return
        pool = self._new_pool(self.url, min_size=self.config.pool_min_size,
                              max_size=self.config.pool_max_size, name="rfmvp-write")
        await pool.open(wait=False)
        self._pool = pool
        log.warning("PostgreSQL at %s is reachable again: opened a fresh write pool",
                    self.safe_url)

        # Nobody waits on the old pool: the calls that did were cancelled when the breaker
        # opened. A call that still holds one of its connections gets it closed on return.
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await old.close(timeout=1.0)

    async def _open_read_pool(self, url: str) -> None:
        def new() -> Pool:
            return self._new_pool(url, min_size=self.config.pool_min_size,
                                  max_size=self.config.read_pool_max_size, name="rfmvp-read")

        pool = new()
        try:
            await pool.open(wait=True, timeout=min(self.config.timeout, _REPLICA_WAIT))
        except PoolTimeout:
            # A replica that is down must not stop the process: read from the primary and
            # let a fresh pool keep connecting in the background.
            self._replica_down(f"cannot connect to {describe_url(url)}")
            pool = new()
            await pool.open(wait=False)
        self._read_pool = pool

    async def close(self) -> None:
        pools = [p for p in (self._read_pool, self._pool) if p is not None]
        self._pool = self._read_pool = None
        for pool in pools:
            await pool.close()

    async def _run(
        self,
        pool: Pool,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        attempts: int = 3,
        timeout: float | None = None,
    ) -> T:
        """``fn`` on a pooled connection, retried on transient errors (see module doc).

        On the write pool, ``availability`` makes a call fail fast with
        ``StoreUnavailableError`` while PostgreSQL cannot be reached (state/availability.py).
        """
        if pool is not self._pool:
            return await self._attempts(pool, fn, attempts, timeout, None)
        guard = self.availability
        epoch = await guard.enter()
        try:
            # The half-open trial may have renewed the pool.
            result = await self._attempts(self._write_pool(), fn, attempts, timeout, guard)
        except BaseException as exc:
            guard.leave(epoch, exc)
            raise
        guard.leave(epoch, None)
        return result

    async def _attempts(
        self, pool: Pool, fn: Callable[[Connection], Awaitable[T]], attempts: int,
        timeout: float | None, guard: StoreAvailability | None,
    ) -> T:
        # The first try runs without tenacity's machinery (about 20 us a call on the hot
        # path); only a transient failure enters the retry loop for the remaining tries.
        try:
            return await self._once(pool, fn, timeout, guard)
        except Exception as exc:
            if attempts <= 1 or not is_transient(exc):
                raise
        await anyio.sleep(backoff_delay(1, 0.05, 1.0))
        async for attempt in infrastructure_retrying(is_transient, attempts=attempts - 1):
            with attempt:
                return await self._once(pool, fn, timeout, guard)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _once(
        self, pool: Pool, fn: Callable[[Connection], Awaitable[T]], timeout: float | None,
        guard: StoreAvailability | None,
    ) -> T:
        lost = False
        with _NOT_WATCHED if guard is None else guard.watch() as watched:
            try:
                # getconn and putconn, not psycopg_pool's ``connection()``: its context
                # manager and the connection's own (a COMMIT that an autocommit connection
                # skips, under the connection's lock) cost 14 us a call in the flow, 3% of
                # a lone create-claimed write. A connection returned in a transaction is
                # rolled back by the pool.
                conn = await pool.getconn(timeout)
                lent_at = time.monotonic()
                try:
                    return await fn(conn)
                except psycopg.Error:
                    lost = conn.broken
                    raise
                finally:
                    pool.usage_ms += int(1000 * (time.monotonic() - lent_at))
                    await pool.putconn(conn)
            except PoolTimeout:
                if guard is not None:
                    # Starved because the server is gone, or just busy?
                    await guard.check_reachable()
                raise
            finally:
                if lost:
                    if guard is not None:
                        await guard.check_reachable()
                    # The server may have dropped its other sessions too (restart,
                    # failover, pg_terminate_backend): weed them out before retrying.
                    await pool.check()
        if guard is not None and watched is not None and watched.cancelled_caught:
            raise guard.unavailable()  # the breaker opened while we waited
        raise AssertionError("unreachable")  # pragma: no cover - the block returns or raises

    def pool_stats(self) -> dict[str, dict[str, int]]:
        """psycopg_pool's figures per pool (size, available, waiting ...), for /metrics."""
        pools = {"write": self._pool, "read": self._read_pool}
        return {name: {**pool.get_stats(), "usage_ms": pool.usage_ms}
                for name, pool in pools.items() if pool is not None}

    def _write_pool(self) -> Pool:
        if self._pool is None:
            raise ServiceUnavailableError("the PostgreSQL store is not open")
        return self._pool

    async def _write(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        try:
            return await self._run(self._write_pool(), fn)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc) from exc
        except psycopg.errors.TransactionRollback as exc:
            raise self._unavailable(exc, " (the statement kept conflicting)") from exc

    async def _read(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """On the read pool when there is one and its breaker lets it, else on the write
        pool. One failure opens ``read_breaker`` for ``RFMVP_STORAGE_REPLICA_RETRY_SECONDS``;
        then one read tries the replica again (half-open) and closes it on success."""
        pool = self._read_pool
        if pool is not None:
            breaker = self.read_breaker
            if breaker.allow():
                epoch = breaker.epoch
                try:
                    result = await self._run(pool, fn, attempts=1,
                                             timeout=min(self.config.timeout, _REPLICA_WAIT))
                except psycopg.OperationalError as exc:
                    if epoch == breaker.epoch:
                        self._replica_down(self._scrub(str(exc).strip()))
                except Exception:
                    if epoch == breaker.epoch:
                        breaker.record_success()  # the replica answered, with an error
                    raise
                except BaseException:
                    breaker.give_back(epoch)
                    raise
                else:
                    if epoch == breaker.epoch:
                        breaker.record_success()
                    return result
            self.read_fallbacks += 1
        return await self._write(fn)

    def _replica_down(self, reason: str) -> None:
        self._replica_reason = reason
        self.read_breaker.record_failure()

    def _replica_changed(self, name: str, old: CircuitState, new: CircuitState) -> None:
        replica = describe_url(self.config.read_url or "")
        if new is CircuitState.OPEN and old is CircuitState.CLOSED:
            log.warning("read replica %s is unavailable (%s); reading from the primary for "
                        "now", replica, self._replica_reason)
        elif new is CircuitState.CLOSED:
            log.warning("read replica %s is back; reading from it again", replica)

    # -- schema ------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        migrations = load_migrations("postgres")

        async def run(conn: Connection) -> list[int]:
            applied = []
            for version, name, script in migrations:
                # One transaction per migration, each under the schema's migration lock,
                # so concurrent processes apply each exactly once.
                async with conn.transaction():
                    await conn.execute(_Q["lock_migrations"], {"lock_class": _MIGRATION_LOCK})
                    await conn.execute(_Q["create_schema_migrations"])
                    if await _fetchone(conn, _Q["migration_applied"], {"version": version}):
                        continue
                    await conn.execute(script)
                    await conn.execute(_Q["record_migration"], {"version": version, "name": name})
                applied.append(version)
            return applied

        return await self._write(run)

    async def ping(self) -> None:
        await self._write(lambda c: c.execute("SELECT 1"))

    # -- robots ------------------------------------------------------------------------

    async def create_robots(self, robots: Sequence[Robot]) -> list[tuple[Robot, bool]]:
        if not robots:
            return []
        return await self._write(lambda conn: _insert_robots(conn, robots, self.channel))

    async def create_robots_in_transaction(
        self, conn: psycopg.AsyncConnection[Any], robots: Sequence[Robot]
    ) -> list[tuple[Robot, bool]]:
        """Insert robots on the caller's connection, inside its open transaction.

        Nothing is committed here: the robots exist once the caller commits, and never if
        it rolls back. The ``pg_notify`` that wakes workers is delivered at that commit.
        The connection must reach this store's tables (the same database and
        ``search_path``). Errors are not retried: the caller's transaction is theirs.
        """
        if not robots:
            return []
        if not isinstance(conn, psycopg.AsyncConnection):
            raise ValidationError("connection must be a psycopg.AsyncConnection (psycopg 3)",
                                  path="$.connection")
        try:
            async with conn.cursor(row_factory=dict_row) as cur:
                return await _insert_robots(_CursorConnection(cur), robots, self.channel)
        except psycopg.OperationalError as exc:
            raise self._unavailable(exc, " (in the caller's transaction)") from exc

    async def create_and_claim(
        self, robot: Robot, *, worker: str, now: datetime, lease_expires_at: datetime
    ) -> Claim | None:
        """Create a new robot and claim it for ``worker`` in one statement (see SQLite's)."""
        # The lease token (the execution's id) is made here, as SQLite's driver does: a
        # retried statement then carries the same token as its first try.
        token = new_id()
        params = _claimed_robot_params(robot, worker, now, lease_expires_at, token)

        async def insert(conn: Connection) -> bool:
            try:
                await conn.kept_cursor().execute(_Q["insert_claimed_robot"], params)
            except psycopg.errors.UniqueViolation:
                # As ON CONFLICT DO NOTHING did (and SQLite's statement does): the id
                # exists, from a retried call whose first try committed.
                return False
            return True

        inserted = await self._write(insert)
        return _created_claim(robot, inserted, token, worker, now, lease_expires_at)

    async def create_and_claim_many(
        self, robots: Sequence[Robot], *, worker: str, now: datetime,
        lease_expires_at: datetime,
    ) -> list[Claim | None]:
        """``create_and_claim`` for each robot, in one statement and one round trip."""
        if len(robots) == 1:
            # The lone robot's own statement: atomic by itself, and it plans faster.
            return [await self.create_and_claim(robots[0], worker=worker, now=now,
                                                lease_expires_at=lease_expires_at)]
        tokens = [new_id() for _ in robots]
        batch = {"robots": _claimed_robot_rows(robots, tokens), "now": now,
                 "lease_expires_at": lease_expires_at, "worker": worker}
        rows = await self._write(lambda c: _fetchall(c, _Q["insert_claimed_robots"], batch))
        inserted = {row["id"] for row in rows}
        return [_created_claim(r, r.id in inserted, token, worker, now, lease_expires_at)
                for r, token in zip(robots, tokens, strict=True)]

    async def get_robot(self, robot_id: str) -> Robot | None:
        row = await self._read(lambda c: _fetchone(c, _Q["get_robot"], {"id": robot_id}))
        return None if row is None else robot_from_row(row)

    async def list_robots(
        self,
        *,
        tenant: str | None,
        status: RobotStatus | None,
        kind: str | None,
        limit: int,
        before_id: str | None,
    ) -> list[Robot]:
        params = {
            "tenant": tenant,
            "status": None if status is None else str(status),
            "kind": kind,
            "limit": limit,
            "before_id": before_id,
        }
        rows = await self._read(lambda c: _fetchall(c, _Q["list_robots"], params))
        return [robot_from_row(r) for r in rows]

    async def claim_robots(
        self, *, module: str, limit: int, worker: str, now: datetime, lease_expires_at: datetime
    ) -> list[Claim]:
        params = {"module": module, "limit": limit, "worker": worker, "now": now,
                  "lease_expires_at": lease_expires_at}
        rows = await self._write(lambda c: _fetchall(c, _Q["claim_robots"], params))
        return [claim_of(robot_from_row(row), module, worker, now) for row in rows]

    async def renew_leases(
        self, leases: Sequence[tuple[str, str]], lease_expires_at: datetime
    ) -> set[str]:
        if not leases:
            return set()
        params = {"ids": [i for i, _ in leases], "tokens": [t for _, t in leases],
                  "lease_expires_at": lease_expires_at}
        rows = await self._write(lambda c: _fetchall(c, _Q["renew_leases"], params))
        return {row["id"] for row in rows}

    async def update_progress(
        self, robot_id: str, lease_token: str, progress: float, message: str | None,
        now: datetime,
    ) -> Robot | None:
        params = {"id": robot_id, "lease_token": lease_token, "progress": float(progress),
                  "message": message, "now": now}
        row = await self._write(lambda c: _fetchone(c, _Q["update_progress"], params))
        return None if row is None else robot_from_row(row)

    async def update_progress_many(self, reports: Sequence[ProgressReport], now: datetime
                                   ) -> list[Robot | None]:
        """Progress reports in one statement (one at a time if a robot repeats)."""
        if not set_based(reports):
            return [await self.update_progress(r.robot_id, r.lease_token, r.progress,
                                               r.message, now) for r in reports]
        params = {"id": [r.robot_id for r in reports],
                  "lease_token": [r.lease_token for r in reports],
                  "progress": [float(r.progress) for r in reports],
                  "message": [r.message for r in reports], "now": now}
        rows = await self._write(lambda c: _fetchall(c, _Q["update_progress_many"], params))
        by_id = {row["id"]: row for row in rows}
        return [None if (row := by_id.get(r.robot_id)) is None else robot_from_row(row)
                for r in reports]

    async def complete(self, completion: Completion) -> Robot | None:
        return (await self.complete_many([completion]))[0]

    async def complete_many(self, completions: Sequence[Completion]) -> list[Robot | None]:
        """One set-based statement for the whole batch: one round trip, one plan."""
        if not completions:
            return []
        if not set_based(completions):
            # One statement each (a lone completion also plans faster so).
            async def each(conn: Connection) -> list[Robot | None]:
                return [await self._complete_one(conn, c) for c in completions]

            return await self._write(each)
        params = {"completions": _completion_rows(completions), "channel": self.channel}
        if all(c.claimed is not None for c in completions):
            rows = await self._write(lambda c: _fetchall(c, _Q["complete_robots"], params))
            stored: dict[str, Robot] = {}
        else:
            # A caller without the robots as claimed gets them read back, in the same
            # transaction: the rows stay locked by its update until the commit.
            async def complete_and_read(conn: Connection) -> tuple[list[DictRow], list[DictRow]]:
                async with conn.transaction():
                    done = await _fetchall(conn, _Q["complete_robots"], params)
                    ids = [row["id"] for row in done]
                    return done, await _fetchall(conn, _Q["get_robots"], {"ids": ids})

            rows, full = await self._write(complete_and_read)
            stored = {robot.id: robot for robot in map(robot_from_row, full)}
        ended = {row["id"]: (row["progress"], row["progress_message"], row["result"])
                 for row in rows}
        return ended_robots(completions, ended, stored)

    async def _complete_one(self, conn: Connection, c: Completion) -> Robot | None:
        """``complete_robot`` for one completion: the robot rebuilt from its claimed copy,
        or, for a caller without one, read back in the same transaction."""
        params = self._completion_params(c)
        if c.claimed is not None:
            row = await _fetchone(conn, _Q["complete_robot"], params)
            return None if row is None else ended_robot(
                c, c.claimed, progress=row["progress"],
                progress_message=row["progress_message"], result=row["result"])
        async with conn.transaction():
            row = await _fetchone(conn, _Q["complete_robot"], params)
            if row is None:
                return None
            stored = await _fetchone(conn, _Q["get_robot"], {"id": c.robot_id})
        assert stored is not None  # the row is locked by the update until the commit
        return robot_from_row(stored)

    def _completion_params(self, c: Completion) -> dict[str, Any]:
        """``complete_robot``'s parameters for one completion."""
        child = c.followup
        return {
            "id": c.robot_id, "lease_token": c.lease_token, "status": str(c.status),
            "execution_status": str(c.execution_status),
            "result": None if c.result is None else Jsonb(c.result),
            "error": _error_jsonb(c.error), "now": c.finished_at,
            "duration_ms": float(c.duration_ms), "scheduled_at": c.scheduled_at,
            "module": c.module, "channel": self.channel,
            "child_id": None if child is None else child.id,
            "child_kind": None if child is None else child.kind,
            "child_payload": None if child is None else Jsonb(child.payload),
            "child_module": None if child is None else child.module,
            "child_max_attempts": None if child is None else child.max_attempts,
            "child_trigger": None if child is None else child.parent_trigger,
        }

    async def cancel_robot(self, robot_id: str, now: datetime) -> Robot | None:
        params = {"id": robot_id, "now": now}
        row = await self._write(lambda c: _fetchone(c, _Q["cancel_robot"], params))
        return None if row is None else robot_from_row(row)

    async def release_robots(self, leases: Sequence[tuple[str, str]], now: datetime) -> int:
        if not leases:
            return 0
        params = {"ids": [i for i, _ in leases], "tokens": [t for _, t in leases], "now": now,
                  "channel": self.channel}
        row = await self._write(lambda c: _fetchone(c, _Q["release_robots"], params))
        return 0 if row is None else int(row["released"])

    async def reap_expired_leases(self, now: datetime) -> list[Robot]:
        params = {"now": now, "error": _error_jsonb(_LEASE_EXPIRED), "channel": self.channel}
        rows = await self._write(lambda c: _fetchall(c, _Q["reap_expired_leases"], params))
        return [robot_from_row(r) for r in rows]

    async def requeue_robot(
        self, robot_id: str, now: datetime, extra_attempts: int
    ) -> Robot | None:
        params = {"id": robot_id, "now": now, "extra_attempts": extra_attempts,
                  "channel": self.channel}
        row = await self._write(lambda c: _fetchone(c, _Q["requeue_robot"], params))
        return None if row is None else robot_from_row(row)

    async def next_due_at(self, modules: Sequence[str]) -> datetime | None:
        if not modules:
            return None
        params = {"modules": list(modules)}
        row = await self._read(lambda c: _fetchone(c, _Q["next_due_at"], params))
        return None if row is None else _utc_or_none(row["due"])

    async def list_executions(self, robot_id: str) -> list[Execution]:
        rows = await self._read(
            lambda c: _fetchall(c, _Q["list_executions"], {"robot_id": robot_id})
        )
        return [_execution_from_row(r) for r in rows]

    # -- modules -----------------------------------------------------------------------

    async def upsert_modules(self, records: Sequence[ModuleRecord], now: datetime) -> None:
        if not records:
            return
        params = [
            {
                "name": r.name, "kinds": Jsonb(list(r.kinds)), "capacity": r.capacity,
                "health": r.health, "last_check_at": r.last_check_at, "score": float(r.score),
                "success_rate": float(r.success_rate),
                "latency_ewma_ms": None if r.latency_ewma_ms is None else float(r.latency_ewma_ms),
                "circuit_state": r.circuit_state, "load": r.load,
                "max_attempts": r.max_attempts, "now": now,
            }
            for r in records
        ]

        async def run(conn: Connection) -> None:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.executemany(_Q["upsert_module"], params)

        await self._write(run)

    async def list_modules(self) -> list[ModuleRecord]:
        rows = await self._read(lambda c: _fetchall(c, _Q["list_modules"]))
        return [
            ModuleRecord(
                name=r["name"], kinds=tuple(r["kinds"]), capacity=r["capacity"],
                health=r["health"], last_check_at=_utc_or_none(r["last_check_at"]),
                score=r["score"], success_rate=r["success_rate"],
                latency_ewma_ms=r["latency_ewma_ms"], circuit_state=r["circuit_state"],
                load=r["load"], max_attempts=r["max_attempts"],
                updated_at=_utc_or_none(r["updated_at"]),
            )
            for r in rows
        ]

    # -- audit -------------------------------------------------------------------------

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        if not events:
            return []
        # The chain written by the latest attempt: if its commit was acknowledged by a
        # connection that then died, the retry finds its last hash and stops there.
        attempted: list[AuditEvent] = []

        async def run(conn: Connection) -> list[AuditEvent]:
            async with conn.transaction():
                await conn.execute(_Q["lock_audit_chain"], {"lock_class": _AUDIT_LOCK})
                if attempted and await _fetchone(
                    conn, _Q["audit_hash_exists"],
                    {"ts": attempted[-1].ts, "hash": attempted[-1].hash},
                ):
                    return list(attempted)
                row = await _fetchone(conn, _Q["last_audit_hash"])
                prev = None if row is None else row["hash"]
                chained = await chain_audit_in_slices(prev, events)
                attempted[:] = chained
                await conn.execute(_Q["insert_audit"], {"records": Jsonb([
                    [e.ts.isoformat(), e.principal, e.action, e.target, e.outcome, e.client,
                     e.request_id, e.details, e.prev_hash, e.hash] for e in chained])})
                return chained

        return await self._write(run)

    async def list_audit(self, *, after_seq: int, limit: int) -> list[tuple[int, AuditEvent]]:
        params = {"after_seq": after_seq, "limit": limit}
        rows = await self._read(lambda c: _fetchall(c, _Q["list_audit"], params))
        return [
            (
                r["seq"],
                AuditEvent(
                    ts=_utc(r["ts"]), principal=r["principal"], action=r["action"],
                    target=r["target"], outcome=r["outcome"], client=r["client"],
                    request_id=r["request_id"], details=r["details"],
                    prev_hash=r["prev_hash"], hash=r["hash"],
                ),
            )
            for r in rows
        ]

    # -- later, on a schedule, in chains ------------------------------------------------

    async def list_robots_by_due(
        self, *, tenant: str | None, status: RobotStatus | None, kind: str | None,
        limit: int, after: tuple[datetime, str] | None,
    ) -> list[Robot]:
        params = {
            "tenant": tenant, "status": None if status is None else str(status),
            "kind": kind, "limit": limit,
            "after_at": None if after is None else after[0],
            "after_id": None if after is None else after[1],
        }
        rows = await self._read(lambda c: _fetchall(c, _Q["list_robots_by_due"], params))
        return [robot_from_row(r) for r in rows]

    async def create_followups(self, robots: Sequence[Robot]) -> list[Robot]:
        if not robots:
            return []
        columns = _robot_columns(robots)
        params = {k: columns[k] for k in (
            "ids", "kinds", "payloads", "owners", "tenants", "statuses", "modules",
            "max_attempts", "priorities", "created_at", "updated_at", "scheduled_at",
            "parent_ids", "parent_triggers")}
        params["channel"] = self.channel
        rows = await self._write(lambda c: _fetchall(c, _Q["insert_followups"], params))
        return [robot_from_row(r) for r in rows]

    async def create_schedule(self, schedule: Schedule) -> Schedule:
        params = {
            "id": schedule.id, "owner": schedule.owner, "tenant": schedule.tenant,
            "cron": schedule.cron, "timezone": schedule.timezone, "kind": schedule.kind,
            "payload": Jsonb(schedule.payload), "priority": schedule.priority,
            "misfire_policy": str(schedule.misfire_policy),
            "misfire_limit": schedule.misfire_limit, "paused": schedule.paused,
            "last_due_at": schedule.last_due_at, "next_due_at": schedule.next_due_at,
            "created_at": schedule.created_at, "updated_at": schedule.updated_at,
        }
        row = await self._write(lambda c: _fetchone(c, _Q["insert_schedule"], params))
        assert row is not None
        return schedule_from_row(row)

    async def get_schedule(self, schedule_id: str) -> Schedule | None:
        row = await self._write(lambda c: _fetchone(c, _Q["get_schedule"], {"id": schedule_id}))
        return None if row is None else schedule_from_row(row)

    async def list_schedules(self, *, tenant: str | None, limit: int, after_id: str | None
                             ) -> list[Schedule]:
        params = {"tenant": tenant, "limit": limit, "after_id": after_id}
        rows = await self._read(lambda c: _fetchall(c, _Q["list_schedules"], params))
        return [schedule_from_row(r) for r in rows]

    async def pause_schedule(self, schedule_id: str, now: datetime) -> Schedule | None:
        params = {"id": schedule_id, "now": now}
        row = await self._write(lambda c: _fetchone(c, _Q["pause_schedule"], params))
        return None if row is None else schedule_from_row(row)

    async def resume_schedule(self, schedule_id: str, now: datetime, next_due_at: datetime
                              ) -> Schedule | None:
        params = {"id": schedule_id, "now": now, "last_due_at": now,
                  "next_due_at": next_due_at}
        row = await self._write(lambda c: _fetchone(c, _Q["resume_schedule"], params))
        return None if row is None else schedule_from_row(row)

    async def delete_schedule(self, schedule_id: str) -> bool:
        row = await self._write(lambda c: _fetchone(c, _Q["delete_schedule"],
                                                    {"id": schedule_id}))
        return row is not None and int(row["n"]) > 0

    async def due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        params = {"now": now, "limit": limit}
        rows = await self._write(lambda c: _fetchall(c, _Q["due_schedules"], params))
        return [schedule_from_row(r) for r in rows]

    async def next_schedule_due_at(self) -> datetime | None:
        row = await self._write(lambda c: _fetchone(c, _Q["next_schedule_due_at"]))
        return None if row is None else _utc_or_none(row["due"])

    async def fire_schedule(
        self, schedule: Schedule, *, last_due_at: datetime, next_due_at: datetime,
        fires: Sequence[tuple[ScheduleFire, Robot]], now: datetime,
    ) -> list[Robot] | None:
        advance = {"id": schedule.id, "expected_last_due_at": schedule.last_due_at,
                   "last_due_at": last_due_at, "next_due_at": next_due_at, "now": now}
        insert = {
            "schedule_id": schedule.id, "now": now, "channel": self.channel,
            "due_at": [f.due_at for f, _ in fires], "robot_ids": [r.id for _, r in fires],
            "late": [f.late for f, _ in fires], "covers": [f.covers for f, _ in fires],
            "kinds": [r.kind for _, r in fires], "payloads": [Jsonb(r.payload) for _, r in fires],
            "owners": [r.owner for _, r in fires], "tenants": [r.tenant for _, r in fires],
            "modules": [r.module for _, r in fires],
            "max_attempts": [r.max_attempts for _, r in fires],
            "priorities": [r.priority for _, r in fires],
        }

        async def run(conn: Connection) -> list[Robot] | None:
            async with conn.transaction():
                if await _fetchone(conn, _Q["advance_schedule"], advance) is None:
                    return None  # another process decided this interval
                if not fires:
                    return []
                rows = await _fetchall(conn, _Q["insert_fires"], insert)
                return [robot_from_row(r) for r in rows]

        return await self._write(run)

    async def list_schedule_fires(self, schedule_id: str, limit: int) -> list[ScheduleFire]:
        params = {"schedule_id": schedule_id, "limit": limit}
        rows = await self._read(lambda c: _fetchall(c, _Q["list_schedule_fires"], params))
        return [ScheduleFire(schedule_id=r["schedule_id"], due_at=_utc(r["due_at"]),
                             robot_id=r["robot_id"], fired_at=_utc(r["fired_at"]),
                             late=r["late"], covers=r["covers"]) for r in rows]

    # -- API keys ----------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey) -> bool:
        params = _api_key_params(key)

        async def run(conn: Connection) -> bool:
            return await _insert_api_key(conn, key, params)

        return await self._write(run)

    async def get_api_key_by_prefix(self, prefix: str) -> ApiKey | None:
        row = await self._read(
            lambda c: _fetchone(c, _Q["get_api_key_by_prefix"], {"prefix": prefix}))
        return None if row is None else _api_key_from_row(row)

    async def get_api_keys_by_prefixes(self, prefixes: Sequence[str]) -> dict[str, ApiKey]:
        """The keys with these prefixes, by prefix (one read; unknown ones are absent)."""
        rows = await self._read(lambda c: _fetchall(
            c, _Q["get_api_keys_by_prefixes"], {"prefixes": list(prefixes)}))
        return {row["prefix"]: _api_key_from_row(row) for row in rows}

    async def list_api_keys(self, *, principal: str | None) -> list[ApiKey]:
        rows = await self._read(
            lambda c: _fetchall(c, _Q["list_api_keys"], {"principal": principal}))
        return [_api_key_from_row(r) for r in rows]

    async def revoke_api_key(self, prefix: str, now: datetime) -> ApiKey | None:
        params = {"prefix": prefix, "now": now}
        row = await self._write(lambda c: _fetchone(c, _Q["revoke_api_key"], params))
        return None if row is None else _api_key_from_row(row)

    async def replace_api_key(
        self, prefix: str, replacement: ApiKey, expires_at: datetime
    ) -> ApiKey | None:
        params = _api_key_params(replacement)

        async def run(conn: Connection) -> ApiKey | None:
            async with conn.transaction():
                row = await _fetchone(conn, _Q["expire_api_key"],
                                      {"prefix": prefix, "expires_at": expires_at})
                if row is None:
                    return None
                if not await _insert_api_key(conn, replacement, params):
                    # Raising rolls the expiry back: the old key keeps working.
                    raise ConflictError("the new key's prefix is taken; try again")
                return _api_key_from_row(row)

        return await self._write(run)

    async def touch_api_keys(self, used: Sequence[tuple[str, datetime]]) -> None:
        if not used:
            return
        params = {"prefixes": [p for p, _ in used], "used_at": [at for _, at in used]}
        await self._write(lambda c: c.execute(_Q["touch_api_keys"], params))

    # -- audit retention ---------------------------------------------------------------

    async def purge_audit(self, before: datetime) -> int:
        async def run(conn: Connection) -> int:
            async with conn.transaction():
                await conn.execute(_Q["lock_audit_chain"], {"lock_class": _AUDIT_LOCK})
                row = await _fetchone(conn, _Q["purge_audit_prefix"], {"before": before})
            return 0 if row is None else int(row["n"])

        return await self._write(run)

    async def tail_audit(self, limit: int) -> list[tuple[int, AuditEvent]]:
        rows = await self._read(lambda c: _fetchall(c, _Q["tail_audit"], {"limit": limit}))
        return [_audit_from_row(r) for r in rows]

    # -- statistics and retention ------------------------------------------------------

    async def count_robots(self) -> dict[tuple[str, str], int]:
        rows = await self._read(lambda c: _fetchall(c, _Q["count_robots"]))
        return {(r["kind"], r["status"]): int(r["n"]) for r in rows}

    async def queue_stats(self, now: datetime) -> tuple[int, float | None]:
        row = await self._read(lambda c: _fetchone(c, _Q["queue_stats"], {"now": now}))
        if row is None or row["oldest"] is None:
            return (0 if row is None else int(row["n"])), None
        return int(row["n"]), max(0.0, (now - row["oldest"]).total_seconds())

    async def recent_outcomes(self, since_id: str, limit: int) -> list[tuple[str, str, float]]:
        rows = await self._read(lambda c: _fetchall(
            c, _Q["recent_outcomes"], {"since_id": since_id, "limit": limit}))
        return [(r["module"], r["status"], float(r["duration_ms"])) for r in rows]

    async def purge(self, finished_before: datetime) -> int:
        row = await self._write(
            lambda c: _fetchone(c, _Q["purge"], {"before": finished_before})
        )
        return 0 if row is None else int(row["n"])

    # -- queued robots whose module is unavailable (queue_guard.py) ------------------------

    async def reassign_queued_robots(self, module: str, kind: str, to_module: str,
                                     now: datetime, limit: int) -> int:
        params = {"module": module, "kind": kind, "to_module": to_module, "now": now,
                  "limit": limit, "channel": self.channel}
        row = await self._write(lambda c: _fetchone(c, _Q["reassign_queued_robots"], params))
        return 0 if row is None else int(row["moved"])

    async def fail_queued_robots(self, module: str, kind: str, due_before: datetime,
                                 error: ErrorInfo, now: datetime, limit: int) -> list[Robot]:
        params = {"module": module, "kind": kind, "due_before": due_before,
                  "error": _error_jsonb(error), "now": now, "limit": limit}
        rows = await self._write(lambda c: _fetchall(c, _Q["fail_queued_robots"], params))
        return [robot_from_row(r) for r in rows]

    # -- wake-ups ----------------------------------------------------------------------

    async def listen(
        self,
        on_notify: Callable[[], None],
        *,
        ignore_own: bool = False,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``on_notify()`` whenever any process queues robots in this schema.

        ``ignore_own``: skip notifications sent through this driver's own connections
        (the caller already knows about the work it queued itself).

        Runs until cancelled on one dedicated connection (not from the pool), reporting
        ready (``task_status.started()``) once it listens; start it with
        ``await task_group.start(driver.listen, callback)``. When the connection drops it
        reconnects with backoff and calls ``on_notify()`` once after reconnecting, since
        notifications sent meanwhile are lost. Raises ServiceUnavailableError if the
        first connection fails.
        """
        if self.channel is None:
            raise ServiceUnavailableError("the PostgreSQL store is not open")
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
        started = False
        delay = _LISTEN_BACKOFF[0]
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs())
            except psycopg.OperationalError as exc:
                if not started:
                    raise self._unavailable(exc, " (LISTEN connection)") from exc
                log.warning("reconnecting LISTEN to %s failed: %s", self.safe_url,
                            self._scrub(str(exc).strip()))
            else:
                try:
                    await conn.execute(listen)
                    if started:
                        on_notify()
                    else:
                        started = True
                        task_status.started()
                    delay = _LISTEN_BACKOFF[0]
                    while True:
                        async with contextlib.aclosing(
                            conn.notifies(timeout=_LISTEN_KEEPALIVE)
                        ) as notifies:
                            async for notify in notifies:
                                if not (ignore_own and notify.pid in self._own_backends):
                                    on_notify()
                        await conn.execute("SELECT 1")
                except psycopg.OperationalError as exc:
                    if not started:
                        raise self._unavailable(exc, " (LISTEN connection)") from exc
                    log.warning("LISTEN connection to %s dropped (%s); reconnecting",
                                self.safe_url, self._scrub(str(exc).strip()))
                finally:
                    with anyio.CancelScope(shield=True):
                        await conn.close()
            await anyio.sleep(delay)
            delay = min(delay * 2, _LISTEN_BACKOFF[1])


def _api_key_params(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id, "prefix": key.prefix, "digest": key.digest, "principal": key.principal,
        "tenant": key.tenant, "scopes": Jsonb(sorted(key.scopes)),
        "created_at": key.created_at, "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
        "rate_limit": None if key.rate_limit is None else str(key.rate_limit),
        "last_used_at": key.last_used_at, "description": key.description,
    }


async def _insert_api_key(conn: Connection, key: ApiKey, params: dict[str, Any]) -> bool:
    """Insert; False when the prefix belongs to another key. A retry of an insert that
    did commit finds its own id under the prefix, and succeeds."""
    if await _fetchone(conn, _Q["insert_api_key"], params) is not None:
        return True
    row = await _fetchone(conn, _Q["get_api_key_by_prefix"], {"prefix": key.prefix})
    return row is not None and row["id"] == key.id


def _api_key_from_row(row: DictRow) -> ApiKey:
    return ApiKey(
        id=row["id"], prefix=row["prefix"], digest=row["digest"], principal=row["principal"],
        tenant=row["tenant"], scopes=frozenset(row["scopes"]),
        created_at=_utc(row["created_at"]), expires_at=_utc_or_none(row["expires_at"]),
        revoked_at=_utc_or_none(row["revoked_at"]),
        rate_limit=None if row["rate_limit"] is None else RateLimit.parse(row["rate_limit"]),
        last_used_at=_utc_or_none(row["last_used_at"]), description=row["description"],
    )


def _audit_from_row(row: DictRow) -> tuple[int, AuditEvent]:
    return row["seq"], AuditEvent(
        ts=_utc(row["ts"]), principal=row["principal"], action=row["action"],
        target=row["target"], outcome=row["outcome"], client=row["client"],
        request_id=row["request_id"], details=row["details"], prev_hash=row["prev_hash"],
        hash=row["hash"],
    )
