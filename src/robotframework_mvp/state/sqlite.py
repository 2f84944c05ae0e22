"""SQLite storage driver: the embedded, zero-setup default.

One write connection serialises writes (SQLite has one writer anyway) and a second
connection serves reads concurrently under WAL. sqlite3 blocks, so calls run in a worker
thread, except small writes (a few robots, the worker's claims and completions), which
run on the event loop on a third connection when the lock is free at once: the hop to a
thread cost more than they do (see ``_write``). Writes waiting for that gap go before the
next thread write. Write transactions start with ``BEGIN IMMEDIATE``, so several
processes sharing one file still never claim the same robot.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from ..config import RateLimit
from ..errors import ConfigError, ConflictError, ServiceUnavailableError
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
    chain_audit,
    json_bytes,
    json_loads,
    new_id,
)
from .driver import (
    Claim,
    Completion,
    ProgressReport,
    ScheduleFire,
    chain_audit_in_slices,
    check_claimable,
    claim_of,
    created_claim,
    ended_robots,
    followup_from_json,
    followups_json,
    set_based,
)
from .queries import load_migrations, load_queries

__all__ = ["SQLiteDriver", "sqlite_path"]

T = TypeVar("T")
_Q = load_queries("sqlite")
_EPOCH = datetime.fromtimestamp(0, UTC)
#: RETURNING came in 3.35 (2021); UPDATE ... FROM in 3.33
MIN_SQLITE_VERSION = (3, 35, 0)
#: a write of at most this many robots runs on the event loop when it can (see _write)
_INLINE_MAX_ROWS = 8
#: ... and a claim or a batch of completions or progress reports of at most this many
_WORKER_INLINE_MAX_ROWS = 64
#: inline commits (which never checkpoint) before one write goes to the thread connection
_CHECKPOINT_AFTER = 25
#: WAL pages past which that connection's commit checkpoints (SQLite's default is 1000).
#: The writes on the loop wait for that commit: 1,000 pages copied back took 4-5 ms and
#: made the HTTP benchmark's p99 (19.3-19.9 ms); 200 pages, 25 commits apart, take about
#: 1 ms, and the p99 fell to 15.6-16.6 ms (docs/performance.md, session 10).
_CHECKPOINT_PAGES = 200


def sqlite_path(url: str) -> str:
    """``sqlite:///robots.db`` → ``robots.db``; ``sqlite:////abs/x.db`` → ``/abs/x.db``."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigError(f"not a sqlite URL: use sqlite:///PATH (got scheme {parts.scheme!r})")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return path or ":memory:"


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _dt(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def _error_json(error: ErrorInfo | None) -> str | None:
    if error is None:
        return None
    return json.dumps({"type": error.type, "message": error.message})


def _error(value: str | None) -> ErrorInfo | None:
    if value is None:
        return None
    data = json_loads(value)
    return ErrorInfo(type=data["type"], message=data["message"])


#: the robots table's columns in table order: what ``SELECT *`` and ``RETURNING *`` give
#: (checked when the store opens and after migrations, as rows are decoded by position)
ROBOT_COLUMNS = (
    "id", "kind", "payload", "owner", "tenant", "status", "module", "progress",
    "progress_message", "attempts", "max_attempts", "priority", "idempotency_key", "result",
    "error", "created_at", "updated_at", "started_at", "finished_at", "scheduled_at",
    "lease_token", "lease_expires_at", "parent_id", "parent_trigger", "schedule_id",
    "followups",
)


def robot_from_row(row: Sequence[Any]) -> Robot:
    """A robot from a ``SELECT *`` / ``RETURNING *`` row of robots.

    By position (ROBOT_COLUMNS): a lookup by name per column costs as much as all the rest
    of the decoding, and every claim and completion decodes its robots.
    """
    (id_, kind, payload, owner, tenant, status, module, progress, progress_message, attempts,
     max_attempts, priority, idempotency_key, result, error, created_at, updated_at,
     started_at, finished_at, scheduled_at, lease_token, lease_expires_at, parent_id,
     parent_trigger, schedule_id, followups) = row
    chain = None if followups is None else json_loads(followups)
    return Robot(
        id=id_,
        kind=kind,
        payload=json_loads(payload),
        owner=owner,
        tenant=tenant,
        status=RobotStatus(status),
        module=module,
        progress=float(progress),  # RETURNING gives 100, not 100.0, for `SET progress = 100`
        progress_message=progress_message,
        attempts=attempts,
        max_attempts=max_attempts,
        priority=priority,
        idempotency_key=idempotency_key,
        result=None if result is None else json_loads(result),
        error=_error(error),
        created_at=datetime.fromtimestamp(created_at, UTC),
        updated_at=datetime.fromtimestamp(updated_at, UTC),
        started_at=_dt(started_at),
        finished_at=_dt(finished_at),
        scheduled_at=datetime.fromtimestamp(scheduled_at, UTC),
        lease_expires_at=_dt(lease_expires_at),
        lease_token=lease_token,
        parent_id=parent_id,
        parent_trigger=parent_trigger,
        schedule_id=schedule_id,
        on_success=None if chain is None else followup_from_json(chain, "on_success"),
        on_failure=None if chain is None else followup_from_json(chain, "on_failure"),
    )


def _check_robot_columns(conn: sqlite3.Connection) -> None:
    """Refuse a robots table whose columns differ from ROBOT_COLUMNS (rows decode by position)."""
    found = tuple(row["name"] for row in conn.execute("PRAGMA table_info(robots)"))
    if found and found != ROBOT_COLUMNS:
        raise ConfigError(
            "the SQLite robots table does not have the columns this version expects: run "
            f"the migrations of this version (`rfmvp migrate`); found {', '.join(found)}")


def schedule_from_row(row: sqlite3.Row) -> Schedule:
    return Schedule(
        id=row["id"], owner=row["owner"], tenant=row["tenant"], cron=row["cron"],
        timezone=row["timezone"], kind=row["kind"], payload=json.loads(row["payload"]),
        misfire_policy=MisfirePolicy(row["misfire_policy"]),
        last_due_at=datetime.fromtimestamp(row["last_due_at"], UTC),
        next_due_at=datetime.fromtimestamp(row["next_due_at"], UTC),
        priority=row["priority"], misfire_limit=row["misfire_limit"],
        paused=bool(row["paused"]),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        updated_at=datetime.fromtimestamp(row["updated_at"], UTC),
    )


def _execution_from_row(row: sqlite3.Row) -> Execution:
    return Execution(
        id=row["id"],
        robot_id=row["robot_id"],
        module=row["module"],
        attempt=row["attempt"],
        status=ExecutionStatus(row["status"]),
        worker=row["worker"],
        started_at=datetime.fromtimestamp(row["started_at"], UTC),
        finished_at=_dt(row["finished_at"]),
        duration_ms=row["duration_ms"],
        error=_error(row["error"]),
    )


class SQLiteDriver:
    """StorageDriver on a SQLite file (or ``:memory:`` for tests)."""

    name = "sqlite"

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.path = sqlite_path(url)
        self.timeout = timeout
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # Small writes on the event loop (see _write): its own connection, which never
        # waits for a lock and never checkpoints the WAL.
        self._inline: sqlite3.Connection | None = None
        self._inline_commits = 0
        # Set when the thread writes under way (serialised by _write_limiter) are done.
        self._threads_done: anyio.Event | None = None
        self._thread_writes = 0
        self._inline_waiting = 0
        self._write_limiter = anyio.CapacityLimiter(1)
        self._read_limiter = anyio.CapacityLimiter(1)
        #: the hash of the last audit record this driver wrote (None: none yet, or the
        #: chain's start), known once it wrote one
        self._audit_head: str | None = None
        self._audit_head_known = False

    # -- connections -------------------------------------------------------------------

    def _connect(self, *, inline: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=0 if inline else self.timeout, isolation_level=None,
            check_same_thread=False,
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {0 if inline else int(self.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {0 if inline else _CHECKPOINT_PAGES}")
        return conn

    async def open(self) -> None:
        if self._writer is not None:
            return
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise ConfigError(
                f"SQLite {sqlite3.sqlite_version} is too old: the SQLite driver needs "
                f"{'.'.join(map(str, MIN_SQLITE_VERSION))} or newer (RETURNING); use a Python "
                "built against a newer SQLite, or PostgreSQL")
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await anyio.to_thread.run_sync(self._connect)
            if self.path == ":memory:":
                # One in-memory database: both roles share the connection and its lock,
                # and every write goes through it (none on the loop, beside a read).
                self._reader = self._writer
                self._read_limiter = self._write_limiter
            else:
                self._reader = await anyio.to_thread.run_sync(self._connect)
                self._inline = await anyio.to_thread.run_sync(
                    functools.partial(self._connect, inline=True))
            await anyio.to_thread.run_sync(_check_robot_columns, self._writer)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.close()
            if isinstance(exc, sqlite3.Error):
                raise ServiceUnavailableError(
                    f"cannot open SQLite database {self.path!r}: {exc}") from exc
            raise

    async def close(self) -> None:
        conns = (self._writer, self._reader, self._inline)
        self._writer = self._reader = self._inline = None
        for conn in {id(c): c for c in conns if c is not None}.values():
            await anyio.to_thread.run_sync(conn.close)

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, rows: int = 0,
                     inline_max: int = _INLINE_MAX_ROWS) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction, on a write connection.

        In a worker thread, as blocking calls go; except a write of at most ``inline_max``
        robots (``rows``), which runs here on the event loop once no thread write is under
        way: handing it to a thread and back costs more than the write itself (about
        100 us against 30-80 us), twice per robot on the latency path. It never waits on
        the database there: its connection never waits for the lock (if another process
        holds it, the write goes to a thread, which waits) and never checkpoints the WAL
        (with synchronous=NORMAL, the checkpoint is what fsyncs); after
        ``_CHECKPOINT_AFTER`` inline commits, one write goes to the thread connection,
        whose commit runs SQLite's automatic checkpoint when due. Writes on the loop need
        no lock among themselves: each runs from start to end in one step.

        The worker's claims and completions run here up to ``_WORKER_INLINE_MAX_ROWS``:
        its robots wait for them, and a thread writing them ran in convoy with the loop
        (it needs the GIL back after each SQLite step, which a busy loop yields only every
        switch interval, 5 ms, or when it goes idle), so a worker's loop sat idle half the
        time waiting for them. New robots stay at ``_INLINE_MAX_ROWS``: while a batch of
        them is written in the thread, the loop reads the next requests, which join the
        next shared write (with them on the loop too, HTTP went 19% slower).
        """
        conn = self._writer
        if conn is None:
            raise ServiceUnavailableError("the SQLite store is not open")
        inline = self._inline
        if inline is None or not 0 < rows <= inline_max \
                or self._inline_commits >= _CHECKPOINT_AFTER:
            return await self._write_in_thread(conn, fn)
        if self._threads_done is not None:
            self._inline_waiting += 1
            try:
                while (done := self._threads_done) is not None:
                    await done.wait()  # then each waiting writer runs in turn, no handoff
            finally:
                self._inline_waiting -= 1
        try:
            inline.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # another process is writing: wait in a thread
            return await self._write_in_thread(conn, fn)
        self._inline_commits += 1
        return _transaction(inline, fn, begun=True)

    async def _write_in_thread(self, conn: sqlite3.Connection,
                               fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in a transaction in a worker thread, one such write at a time."""
        # Writes waiting to run on the loop go first, in the gap after the thread writes
        # under way: a stream of claims and completion batches would starve them. Once
        # those writes end, the waiting ones are woken but have not run yet: this one
        # lets them (a turn of the loop) instead of starting a thread write they would
        # wait for again. A caller submitting thread writes back to back (HTTP
        # submissions under load) held the worker's completions off for seconds.
        while self._inline_waiting:
            if (done := self._threads_done) is not None:
                await done.wait()
            else:
                await anyio.lowlevel.checkpoint()
        self._inline_commits = 0  # this connection checkpoints on commit when due
        if self._threads_done is None:
            self._threads_done = anyio.Event()
        self._thread_writes += 1
        try:
            return await anyio.to_thread.run_sync(_transaction, conn, fn,
                                                  limiter=self._write_limiter)
        finally:
            self._thread_writes -= 1
            if self._thread_writes == 0 and self._threads_done is not None:
                self._threads_done.set()
                self._threads_done = None

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reader
        if conn is None:
            raise ServiceUnavailableError("the SQLite store is not open")
        return await anyio.to_thread.run_sync(fn, conn, limiter=self._read_limiter)

    # -- schema ------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        migrations = load_migrations("sqlite")

        def run(conn: sqlite3.Connection) -> list[int]:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            applied = []
            for version, name, sql in migrations:
                conn.execute("BEGIN IMMEDIATE")
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                ).fetchone()
                if done:
                    conn.execute("ROLLBACK")
                    continue
                # executescript would commit first; run statements inside our lock instead.
                for statement in _split_sql(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) "
                    "VALUES (?, ?, julianday('now'))",
                    (version, name),
                )
                conn.execute("COMMIT")
                applied.append(version)
            _check_robot_columns(conn)
            return applied

        conn = self._writer
        if conn is None:
            raise ServiceUnavailableError("the SQLite store is not open")
        return await anyio.to_thread.run_sync(run, conn, limiter=self._write_limiter)

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    # -- robots ------------------------------------------------------------------------

    async def create_robots(self, robots: Sequence[Robot]) -> list[tuple[Robot, bool]]:
        def run(conn: sqlite3.Connection) -> list[tuple[Robot, bool]]:
            out: list[tuple[Robot, bool]] = []
            for robot in robots:
                cur = conn.execute(_Q["insert_robot"], _robot_params(robot))
                if cur.rowcount == 1:
                    out.append((robot, True))
                    continue
                row = conn.execute(
                    _Q["get_robot_by_idempotency_key"],
                    {"owner": robot.owner, "idempotency_key": robot.idempotency_key},
                ).fetchone()
                if row is None:  # the id itself collided: never with UUIDv7, but say so
                    raise ServiceUnavailableError("robot id collision; retry the request")
                out.append((robot_from_row(row), False))
            return out

        return await self._write(run, rows=len(robots))

    async def get_robot(self, robot_id: str) -> Robot | None:
        row = await self._read(lambda c: c.execute(_Q["get_robot"], {"id": robot_id}).fetchone())
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
        rows = await self._read(lambda c: c.execute(_Q["list_robots"], params).fetchall())
        return [robot_from_row(r) for r in rows]

    async def claim_robots(
        self, *, module: str, limit: int, worker: str, now: datetime, lease_expires_at: datetime
    ) -> list[Claim]:
        ms_hex = f"{int(now.timestamp() * 1000):012x}"
        params = {"module": module, "limit": limit, "now": now.timestamp(),
                  "lease_expires_at": lease_expires_at.timestamp(),
                  "ms_hex8": ms_hex[:8], "ms_hex4": ms_hex[8:]}

        def run(conn: sqlite3.Connection) -> list[Claim]:
            # Set-based: SQLite does the batch in C without the GIL, so the event loop runs
            # meanwhile; row by row, every row is a round through Python.
            rows = conn.execute(_Q["claim_due_robots"], params).fetchall()
            if not rows:
                return []
            robots = sorted((robot_from_row(row) for row in rows), key=_queue_order)
            conn.execute(_Q["insert_claimed_executions"], {
                "ids": json.dumps([r.id for r in robots]), "module": module, "worker": worker,
                "now": params["now"]})
            return [claim_of(r, module, worker, now) for r in robots]

        return await self._write(run, rows=limit, inline_max=_WORKER_INLINE_MAX_ROWS)

    async def create_and_claim(
        self, robot: Robot, *, worker: str, now: datetime, lease_expires_at: datetime
    ) -> Claim | None:
        """Create a new robot and claim it for ``worker`` in one transaction.

        For a robot this process's worker has a free slot for: it goes queued → running
        inside the transaction that creates it, so no other worker ever sees it queued.
        Only for a robot without an idempotency key. None: a robot with this id exists
        already (a retried call whose first try committed); nothing was written.
        """
        return (await self.create_and_claim_many(
            [robot], worker=worker, now=now, lease_expires_at=lease_expires_at))[0]

    async def create_and_claim_many(
        self, robots: Sequence[Robot], *, worker: str, now: datetime,
        lease_expires_at: datetime,
    ) -> list[Claim | None]:
        """``create_and_claim`` for each robot, in one transaction."""
        check_claimable(robots)
        lease_ts, now_ts = lease_expires_at.timestamp(), now.timestamp()

        def run(conn: sqlite3.Connection) -> list[Claim | None]:
            claims: list[Claim | None] = []
            for robot in robots:
                assert robot.module is not None
                token = new_id()
                params = _robot_params(robot)
                params.update(now=now_ts, lease_token=token, lease_expires_at=lease_ts)
                if conn.execute(_Q["insert_claimed_robot"], params).rowcount != 1:
                    claims.append(None)  # the id exists: nothing written
                    continue
                conn.execute(_Q["insert_execution"], {
                    "id": token, "robot_id": robot.id, "module": robot.module, "attempt": 1,
                    "worker": worker, "started_at": now_ts})
                claims.append(created_claim(robot, lease_token=token, worker=worker, now=now,
                                            lease_expires_at=lease_expires_at))
            return claims

        return await self._write(run, rows=len(robots))

    async def renew_leases(
        self, leases: Sequence[tuple[str, str]], lease_expires_at: datetime
    ) -> set[str]:
        lease_ts = lease_expires_at.timestamp()

        def run(conn: sqlite3.Connection) -> set[str]:
            held = set()
            for robot_id, token in leases:
                row = conn.execute(
                    _Q["renew_lease"],
                    {"id": robot_id, "lease_token": token, "lease_expires_at": lease_ts},
                ).fetchone()
                if row is not None:
                    held.add(robot_id)
            return held

        return await self._write(run)

    async def update_progress(
        self, robot_id: str, lease_token: str, progress: float, message: str | None,
        now: datetime,
    ) -> Robot | None:
        params = {"id": robot_id, "lease_token": lease_token, "progress": progress,
                  "message": message, "now": now.timestamp()}
        row = await self._write(lambda c: c.execute(_Q["update_progress"], params).fetchone(),
                                rows=1)
        return None if row is None else robot_from_row(row)

    async def update_progress_many(self, reports: Sequence[ProgressReport], now: datetime
                                   ) -> list[Robot | None]:
        """Progress reports in one statement (one at a time if a robot repeats)."""
        if not set_based(reports):
            return [await self.update_progress(r.robot_id, r.lease_token, r.progress,
                                               r.message, now) for r in reports]
        params = {"now": now.timestamp(), "reports": json.dumps(
            [[r.robot_id, r.lease_token, float(r.progress), r.message] for r in reports])}
        rows = await self._write(
            lambda c: c.execute(_Q["update_progress_many"], params).fetchall(),
            rows=len(reports), inline_max=_WORKER_INLINE_MAX_ROWS)
        by_id = {robot.id: robot for robot in map(robot_from_row, rows)}
        return [by_id.get(r.robot_id) for r in reports]

    async def complete(self, completion: Completion) -> Robot | None:
        return (await self.complete_many([completion]))[0]

    async def complete_many(self, completions: Sequence[Completion]) -> list[Robot | None]:
        if len(completions) <= 1 or set_based(completions):
            return await self._write(lambda conn: _complete_batch(conn, completions),
                                     rows=len(completions), inline_max=_WORKER_INLINE_MAX_ROWS)
        # A robot twice: one statement each, in order.
        return await self._write(
            lambda conn: [_complete_batch(conn, [c])[0] for c in completions],
            rows=len(completions), inline_max=_WORKER_INLINE_MAX_ROWS)

    async def cancel_robot(self, robot_id: str, now: datetime) -> Robot | None:
        now_ts = now.timestamp()

        def run(conn: sqlite3.Connection) -> Robot | None:
            row = conn.execute(_Q["cancel_robot"], {"id": robot_id, "now": now_ts}).fetchone()
            if row is None:
                return None
            conn.execute(_Q["cancel_executions"], {"robot_id": robot_id, "now": now_ts})
            return robot_from_row(row)

        return await self._write(run, rows=1)

    async def release_robots(self, leases: Sequence[tuple[str, str]], now: datetime) -> int:
        now_ts = now.timestamp()

        def run(conn: sqlite3.Connection) -> int:
            released = 0
            for robot_id, token in leases:
                if conn.execute(
                    _Q["release_robot"], {"id": robot_id, "lease_token": token, "now": now_ts}
                ).fetchone():
                    conn.execute(
                        _Q["mark_execution"],
                        {"id": token, "status": "released", "now": now_ts, "error": None},
                    )
                    released += 1
            return released

        return await self._write(run)

    async def reap_expired_leases(self, now: datetime) -> list[Robot]:
        now_ts = now.timestamp()
        error = _error_json(ErrorInfo("lease_expired", "the worker running this robot stopped "
                                      "renewing its lease (it died or froze)"))

        def run(conn: sqlite3.Connection) -> list[Robot]:
            reaped = []
            for robot_id, token in conn.execute(
                _Q["select_expired_leases"], {"now": now_ts}
            ).fetchall():
                row = conn.execute(
                    _Q["reap_robot"],
                    {"id": robot_id, "lease_token": token, "now": now_ts, "error": error},
                ).fetchone()
                if row is None:
                    continue
                conn.execute(
                    _Q["mark_execution"],
                    {"id": token, "status": "lost", "now": now_ts, "error": error},
                )
                reaped.append(robot_from_row(row))
            return reaped

        return await self._write(run)

    async def requeue_robot(
        self, robot_id: str, now: datetime, extra_attempts: int
    ) -> Robot | None:
        params = {"id": robot_id, "now": now.timestamp(), "extra_attempts": extra_attempts}
        row = await self._write(lambda c: c.execute(_Q["requeue_robot"], params).fetchone(),
                                rows=1)
        return None if row is None else robot_from_row(row)

    async def next_due_at(self, modules: Sequence[str]) -> datetime | None:
        params = {"modules": json.dumps(list(modules))}
        row = await self._read(lambda c: c.execute(_Q["next_due_at"], params).fetchone())
        return None if row is None or row["due"] is None else _dt(row["due"])

    async def list_executions(self, robot_id: str) -> list[Execution]:
        rows = await self._read(
            lambda c: c.execute(_Q["list_executions"], {"robot_id": robot_id}).fetchall()
        )
        return [_execution_from_row(r) for r in rows]

    # -- modules -----------------------------------------------------------------------

    async def upsert_modules(self, records: Sequence[ModuleRecord], now: datetime) -> None:
        params = [
            {
                "name": r.name, "kinds": json.dumps(list(r.kinds)), "capacity": r.capacity,
                "health": r.health, "last_check_at": _ts(r.last_check_at), "score": r.score,
                "success_rate": r.success_rate, "latency_ewma_ms": r.latency_ewma_ms,
                "circuit_state": r.circuit_state, "load": r.load,
                "max_attempts": r.max_attempts, "now": now.timestamp(),
            }
            for r in records
        ]
        await self._write(lambda c: c.executemany(_Q["upsert_module"], params))

    async def list_modules(self) -> list[ModuleRecord]:
        rows = await self._read(lambda c: c.execute(_Q["list_modules"]).fetchall())
        return [
            ModuleRecord(
                name=r["name"], kinds=tuple(json.loads(r["kinds"])), capacity=r["capacity"],
                health=r["health"], last_check_at=_dt(r["last_check_at"]), score=r["score"],
                success_rate=r["success_rate"], latency_ewma_ms=r["latency_ewma_ms"],
                circuit_state=r["circuit_state"], load=r["load"],
                max_attempts=r["max_attempts"], updated_at=_dt(r["updated_at"]),
            )
            for r in rows
        ]

    # -- audit -------------------------------------------------------------------------

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        # The chain is linked here, before the write, after the last record this driver
        # wrote: the thread then only checks that no other process wrote one since (else
        # it links again) and inserts, in one statement. Done in the thread, the hashing
        # and the row by row inserts waited for the GIL the busy loop holds, and every
        # small write waited for them.
        head = self._audit_head
        linked = _audit_records(await chain_audit_in_slices(head, events)) \
            if self._audit_head_known else None

        def run(conn: sqlite3.Connection) -> list[AuditEvent]:
            row = conn.execute(_Q["last_audit_hash"]).fetchone()
            prev = None if row is None else row["hash"]
            chained, records = linked if linked is not None and prev == head \
                else _audit_records(chain_audit(prev, events))
            conn.execute(_Q["insert_audit"], {"records": records})
            return chained

        chained = await self._write(run, rows=len(events))
        if chained:
            self._audit_head, self._audit_head_known = chained[-1].hash, True
        return chained

    async def list_audit(self, *, after_seq: int, limit: int) -> list[tuple[int, AuditEvent]]:
        params = {"after_seq": after_seq, "limit": limit}
        rows = await self._read(lambda c: c.execute(_Q["list_audit"], params).fetchall())
        return [
            (
                r["seq"],
                AuditEvent(
                    ts=datetime.fromtimestamp(r["ts"], UTC), principal=r["principal"],
                    action=r["action"], target=r["target"], outcome=r["outcome"],
                    client=r["client"], request_id=r["request_id"],
                    details=json.loads(r["details"]), prev_hash=r["prev_hash"], hash=r["hash"],
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
            "after_at": None if after is None else after[0].timestamp(),
            "after_id": None if after is None else after[1],
        }
        rows = await self._read(lambda c: c.execute(_Q["list_robots_by_due"], params).fetchall())
        return [robot_from_row(r) for r in rows]

    async def create_followups(self, robots: Sequence[Robot]) -> list[Robot]:
        def run(conn: sqlite3.Connection) -> list[Robot]:
            return [robot for robot in robots
                    if conn.execute(_Q["insert_robot"], _robot_params(robot)).rowcount == 1]

        return await self._write(run)

    async def create_schedule(self, schedule: Schedule) -> Schedule:
        params = {
            "id": schedule.id, "owner": schedule.owner, "tenant": schedule.tenant,
            "cron": schedule.cron, "timezone": schedule.timezone, "kind": schedule.kind,
            "payload": json.dumps(schedule.payload), "priority": schedule.priority,
            "misfire_policy": str(schedule.misfire_policy),
            "misfire_limit": schedule.misfire_limit, "paused": int(schedule.paused),
            "last_due_at": schedule.last_due_at.timestamp(),
            "next_due_at": schedule.next_due_at.timestamp(),
            "created_at": schedule.created_at.timestamp(),
            "updated_at": schedule.updated_at.timestamp(),
        }
        row = await self._write(lambda c: c.execute(_Q["insert_schedule"], params).fetchone())
        return schedule_from_row(row)

    async def get_schedule(self, schedule_id: str) -> Schedule | None:
        row = await self._read(
            lambda c: c.execute(_Q["get_schedule"], {"id": schedule_id}).fetchone())
        return None if row is None else schedule_from_row(row)

    async def list_schedules(self, *, tenant: str | None, limit: int, after_id: str | None
                             ) -> list[Schedule]:
        params = {"tenant": tenant, "limit": limit, "after_id": after_id}
        rows = await self._read(lambda c: c.execute(_Q["list_schedules"], params).fetchall())
        return [schedule_from_row(r) for r in rows]

    async def pause_schedule(self, schedule_id: str, now: datetime) -> Schedule | None:
        params = {"id": schedule_id, "now": now.timestamp()}
        row = await self._write(lambda c: c.execute(_Q["pause_schedule"], params).fetchone())
        return None if row is None else schedule_from_row(row)

    async def resume_schedule(self, schedule_id: str, now: datetime, next_due_at: datetime
                              ) -> Schedule | None:
        params = {"id": schedule_id, "now": now.timestamp(), "last_due_at": now.timestamp(),
                  "next_due_at": next_due_at.timestamp()}
        row = await self._write(lambda c: c.execute(_Q["resume_schedule"], params).fetchone())
        return None if row is None else schedule_from_row(row)

    async def delete_schedule(self, schedule_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            deleted = conn.execute(_Q["delete_schedule"], {"id": schedule_id}).rowcount
            if deleted:
                conn.execute(_Q["delete_schedule_fires"], {"id": schedule_id})
            return bool(deleted)

        return await self._write(run)

    async def due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        params = {"now": now.timestamp(), "limit": limit}
        rows = await self._read(lambda c: c.execute(_Q["due_schedules"], params).fetchall())
        return [schedule_from_row(r) for r in rows]

    async def next_schedule_due_at(self) -> datetime | None:
        row = await self._read(lambda c: c.execute(_Q["next_schedule_due_at"]).fetchone())
        return None if row is None or row["due"] is None else _dt(row["due"])

    async def fire_schedule(
        self, schedule: Schedule, *, last_due_at: datetime, next_due_at: datetime,
        fires: Sequence[tuple[ScheduleFire, Robot]], now: datetime,
    ) -> list[Robot] | None:
        advance = {"id": schedule.id, "expected_last_due_at": schedule.last_due_at.timestamp(),
                   "last_due_at": last_due_at.timestamp(),
                   "next_due_at": next_due_at.timestamp(), "now": now.timestamp()}

        def run(conn: sqlite3.Connection) -> list[Robot] | None:
            if conn.execute(_Q["advance_schedule"], advance).fetchone() is None:
                return None  # another process decided this interval
            fired = []
            for fire, robot in fires:
                inserted = conn.execute(_Q["insert_fire"], {
                    "schedule_id": schedule.id, "due_at": fire.due_at.timestamp(),
                    "robot_id": robot.id, "now": now.timestamp(), "late": int(fire.late),
                    "covers": fire.covers,
                }).rowcount
                if inserted == 1:
                    conn.execute(_Q["insert_robot"], _robot_params(robot))
                    fired.append(robot)
            return fired

        return await self._write(run)

    async def list_schedule_fires(self, schedule_id: str, limit: int) -> list[ScheduleFire]:
        params = {"schedule_id": schedule_id, "limit": limit}
        rows = await self._read(
            lambda c: c.execute(_Q["list_schedule_fires"], params).fetchall())
        return [ScheduleFire(schedule_id=r["schedule_id"], due_at=_dt(r["due_at"]) or _EPOCH,
                             robot_id=r["robot_id"], fired_at=_dt(r["fired_at"]) or _EPOCH,
                             late=bool(r["late"]), covers=r["covers"]) for r in rows]

    # -- API keys ----------------------------------------------------------------------

    async def create_api_key(self, key: ApiKey) -> bool:
        params = _api_key_params(key)

        def run(conn: sqlite3.Connection) -> bool:
            try:
                conn.execute(_Q["insert_api_key"], params)
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._write(run)

    async def get_api_key_by_prefix(self, prefix: str) -> ApiKey | None:
        row = await self._read(
            lambda c: c.execute(_Q["get_api_key_by_prefix"], {"prefix": prefix}).fetchone())
        return None if row is None else _api_key_from_row(row)

    async def get_api_keys_by_prefixes(self, prefixes: Sequence[str]) -> dict[str, ApiKey]:
        """The keys with these prefixes, by prefix (one read; unknown ones are absent)."""
        params = {"prefixes": json.dumps(list(prefixes))}
        rows = await self._read(
            lambda c: c.execute(_Q["get_api_keys_by_prefixes"], params).fetchall())
        return {row["prefix"]: _api_key_from_row(row) for row in rows}

    async def list_api_keys(self, *, principal: str | None) -> list[ApiKey]:
        rows = await self._read(
            lambda c: c.execute(_Q["list_api_keys"], {"principal": principal}).fetchall())
        return [_api_key_from_row(r) for r in rows]

    async def revoke_api_key(self, prefix: str, now: datetime) -> ApiKey | None:
        params = {"prefix": prefix, "now": now.timestamp()}
        row = await self._write(lambda c: c.execute(_Q["revoke_api_key"], params).fetchone())
        return None if row is None else _api_key_from_row(row)

    async def replace_api_key(
        self, prefix: str, replacement: ApiKey, expires_at: datetime
    ) -> ApiKey | None:
        params = {"prefix": prefix, "expires_at": expires_at.timestamp()}
        new = _api_key_params(replacement)

        def run(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute(_Q["expire_api_key"], params).fetchone()
            if row is None:
                return None
            try:
                conn.execute(_Q["insert_api_key"], new)
            except sqlite3.IntegrityError:
                # Raising rolls the expiry back: the old key keeps working.
                raise ConflictError("the new key's prefix is taken; try again") from None
            return _api_key_from_row(row)

        return await self._write(run)

    async def touch_api_keys(self, used: Sequence[tuple[str, datetime]]) -> None:
        if not used:
            return
        params = [{"prefix": prefix, "used_at": at.timestamp()} for prefix, at in used]
        await self._write(lambda c: c.executemany(_Q["touch_api_key"], params))

    # -- audit retention ---------------------------------------------------------------

    async def purge_audit(self, before: datetime) -> int:
        params = {"before": before.timestamp()}
        return await self._write(
            lambda c: int(c.execute(_Q["purge_audit_prefix"], params).rowcount))

    async def tail_audit(self, limit: int) -> list[tuple[int, AuditEvent]]:
        rows = await self._read(
            lambda c: c.execute(_Q["tail_audit"], {"limit": limit}).fetchall())
        return [_audit_from_row(r) for r in rows]

    # -- statistics and retention ------------------------------------------------------

    async def count_robots(self) -> dict[tuple[str, str], int]:
        rows = await self._read(lambda c: c.execute(_Q["count_robots"]).fetchall())
        return {(r["kind"], r["status"]): r["n"] for r in rows}

    async def queue_stats(self, now: datetime) -> tuple[int, float | None]:
        now_ts = now.timestamp()
        row = await self._read(lambda c: c.execute(_Q["queue_stats"], {"now": now_ts}).fetchone())
        oldest = None if row["oldest"] is None else max(0.0, now_ts - row["oldest"])
        return int(row["n"]), oldest

    async def recent_outcomes(self, since_id: str, limit: int) -> list[tuple[str, str, float]]:
        rows = await self._read(lambda c: c.execute(
            _Q["recent_outcomes"], {"since_id": since_id, "limit": limit}).fetchall())
        return [(r["module"], r["status"], float(r["duration_ms"])) for r in rows]

    async def purge(self, finished_before: datetime) -> int:
        before = finished_before.timestamp()

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(_Q["purge_executions"], {"before": before})
            deleted = conn.execute(_Q["purge_robots"], {"before": before}).rowcount
            conn.execute(_Q["purge_fires"], {"before": before})
            return int(deleted)

        return await self._write(run)

    # -- queued robots whose module is unavailable (queue_guard.py) ------------------------

    async def reassign_queued_robots(self, module: str, kind: str, to_module: str,
                                     now: datetime, limit: int) -> int:
        params = {"module": module, "kind": kind, "to_module": to_module,
                  "now": now.timestamp(), "limit": limit}
        return await self._write(
            lambda c: int(c.execute(_Q["reassign_queued_robots"], params).rowcount))

    async def fail_queued_robots(self, module: str, kind: str, due_before: datetime,
                                 error: ErrorInfo, now: datetime, limit: int) -> list[Robot]:
        params = {"module": module, "kind": kind, "due_before": due_before.timestamp(),
                  "error": _error_json(error), "now": now.timestamp(), "limit": limit}
        rows = await self._write(
            lambda c: c.execute(_Q["fail_queued_robots"], params).fetchall())
        return [robot_from_row(r) for r in rows]


def _audit_records(chained: list[AuditEvent]) -> tuple[list[AuditEvent], str]:
    """Chained records and ``insert_audit``'s JSON array of them (by orjson: a fifth of
    ``json.dumps``' time; as text, since SQLite reads a blob as its binary JSONB)."""
    return chained, json_bytes([
        [e.ts.timestamp(), e.principal, e.action, e.target, e.outcome, e.client,
         e.request_id, json_bytes(e.details).decode(), e.prev_hash, e.hash]
        for e in chained]).decode()


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], *,
                 begun: bool = False) -> T:
    """``fn(conn)`` in one write transaction: committed, or rolled back if it raises."""
    if not begun:
        conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def _queue_order(robot: Robot) -> tuple[int, datetime, str]:
    """The order robots leave the queue in (``claim_due_robots``' ORDER BY)."""
    return -robot.priority, robot.scheduled_at, robot.id


def _robot_params(robot: Robot) -> dict[str, Any]:
    return {
        "id": robot.id,
        "kind": robot.kind,
        "payload": json_bytes(robot.payload).decode(),
        "owner": robot.owner,
        "tenant": robot.tenant,
        "status": str(robot.status),
        "module": robot.module,
        "max_attempts": robot.max_attempts,
        "priority": robot.priority,
        "idempotency_key": robot.idempotency_key,
        "created_at": robot.created_at.timestamp(),
        "updated_at": robot.updated_at.timestamp(),
        "scheduled_at": robot.scheduled_at.timestamp(),
        "parent_id": robot.parent_id,
        "parent_trigger": robot.parent_trigger,
        "schedule_id": robot.schedule_id,
        "followups": None if (data := followups_json(robot)) is None else json.dumps(data),
    }


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (our migrations hold no semicolons in bodies)."""
    lines = [ln for ln in script.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _api_key_params(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id, "prefix": key.prefix, "digest": key.digest, "principal": key.principal,
        "tenant": key.tenant, "scopes": json.dumps(sorted(key.scopes)),
        "created_at": key.created_at.timestamp(), "expires_at": _ts(key.expires_at),
        "revoked_at": _ts(key.revoked_at),
        "rate_limit": None if key.rate_limit is None else str(key.rate_limit),
        "last_used_at": _ts(key.last_used_at), "description": key.description,
    }


def _api_key_from_row(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"], prefix=row["prefix"], digest=row["digest"], principal=row["principal"],
        tenant=row["tenant"], scopes=frozenset(json.loads(row["scopes"])),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        expires_at=_dt(row["expires_at"]), revoked_at=_dt(row["revoked_at"]),
        rate_limit=None if row["rate_limit"] is None else RateLimit.parse(row["rate_limit"]),
        last_used_at=_dt(row["last_used_at"]), description=row["description"],
    )


def _audit_from_row(row: sqlite3.Row) -> tuple[int, AuditEvent]:
    return row["seq"], AuditEvent(
        ts=datetime.fromtimestamp(row["ts"], UTC), principal=row["principal"],
        action=row["action"], target=row["target"], outcome=row["outcome"],
        client=row["client"], request_id=row["request_id"], details=json.loads(row["details"]),
        prev_hash=row["prev_hash"], hash=row["hash"],
    )


def _complete_batch(conn: sqlite3.Connection, completions: Sequence[Completion]
                    ) -> list[Robot | None]:
    """Completions of distinct robots inside an open write transaction, set-based.

    Two statements whose rows SQLite works through in C, without the GIL, instead of two
    round trips through Python per completion. A completion that carries its robot as
    claimed (the worker's do) gets its robot rebuilt from that and the few columns only
    the row knows: decoding whole rows (payload and all) cost more than the statements.
    """
    retrying = any(c.status is RobotStatus.QUEUED or c.scheduled_at is not None
                   or c.module is not None for c in completions)
    # By orjson (json_bytes), as the audit batch: the batch and each result are encoded
    # for every completion.
    rows = conn.execute(_Q["complete_robots" if retrying else "finish_robots"], {
        "completions": json_bytes([
            [c.robot_id, c.lease_token, str(c.status),
             None if c.result is None else json_bytes(c.result).decode(), _error_json(c.error),
             c.finished_at.timestamp(), _ts(c.scheduled_at), c.module]
            for c in completions]).decode()}).fetchall()
    ended = {row[0]: (float(row[1]), row[2], None if row[3] is None else json_loads(row[3]))
             for row in rows}
    done = [c for c in completions if c.robot_id in ended]
    if not done:
        return [None] * len(completions)  # every lease was gone: nothing written
    conn.execute(_Q["finish_executions"], {"executions": json_bytes([
        [c.lease_token, c.execution_status, c.finished_at.timestamp(), c.duration_ms,
         _error_json(c.error)] for c in done]).decode()})
    for completion in done:
        if completion.followup is not None:
            # In this transaction; an existing (parent_id, parent_trigger) is skipped.
            conn.execute(_Q["insert_robot"], _robot_params(completion.followup))
    unknown = [c.robot_id for c in done if c.claimed is None]
    read_back = {} if not unknown else {
        robot.id: robot for robot in map(robot_from_row, conn.execute(
            _Q["get_robots"], {"ids": json.dumps(unknown)}).fetchall())}
    return ended_robots(completions, ended, read_back)
