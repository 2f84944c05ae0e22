"""SQLite storage driver: the embedded, zero-setup default.

One write connection serialises writes (SQLite has one writer anyway) and a second
connection serves reads concurrently under WAL. sqlite3 blocks, so every call runs in a
worker thread; write transactions start with ``BEGIN IMMEDIATE`` so several processes
sharing one file still never claim the same robot.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from ..errors import ConfigError, ServiceUnavailableError
from ..models import (
    AuditEvent,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    ModuleRecord,
    Robot,
    RobotStatus,
    audit_hash,
    new_id,
)
from .driver import Claim, Completion
from .queries import load_migrations, load_queries

__all__ = ["SQLiteDriver", "sqlite_path"]

T = TypeVar("T")
_Q = load_queries("sqlite")


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
    data = json.loads(value)
    return ErrorInfo(type=data["type"], message=data["message"])


def robot_from_row(row: sqlite3.Row) -> Robot:
    return Robot(
        id=row["id"],
        kind=row["kind"],
        payload=json.loads(row["payload"]),
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
        result=None if row["result"] is None else json.loads(row["result"]),
        error=_error(row["error"]),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        updated_at=datetime.fromtimestamp(row["updated_at"], UTC),
        started_at=_dt(row["started_at"]),
        finished_at=_dt(row["finished_at"]),
        scheduled_at=datetime.fromtimestamp(row["scheduled_at"], UTC),
        lease_expires_at=_dt(row["lease_expires_at"]),
        lease_token=row["lease_token"],
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
        self._write_limiter = anyio.CapacityLimiter(1)
        self._read_limiter = anyio.CapacityLimiter(1)

    # -- connections -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    async def open(self) -> None:
        if self._writer is not None:
            return
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._writer = await anyio.to_thread.run_sync(self._connect)
            if self.path == ":memory:":
                # One in-memory database: both roles share the connection and its lock.
                self._reader = self._writer
                self._read_limiter = self._write_limiter
            else:
                self._reader = await anyio.to_thread.run_sync(self._connect)
        except sqlite3.Error as exc:
            raise ServiceUnavailableError(f"cannot open SQLite database {self.path!r}: {exc}") \
                from exc

    async def close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        for conn in {id(c): c for c in (writer, reader) if c is not None}.values():
            await anyio.to_thread.run_sync(conn.close)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction on the write connection."""
        conn = self._writer
        if conn is None:
            raise ServiceUnavailableError("the SQLite store is not open")

        def run() -> T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return await anyio.to_thread.run_sync(run, limiter=self._write_limiter)

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

        return await self._write(run)

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
        now_ts, lease_ts = now.timestamp(), lease_expires_at.timestamp()

        def run(conn: sqlite3.Connection) -> list[Claim]:
            ids = conn.execute(
                _Q["select_due_robots"], {"module": module, "now": now_ts, "limit": limit}
            ).fetchall()
            claims = []
            for (robot_id,) in ids:
                token = new_id()
                row = conn.execute(
                    _Q["claim_robot"],
                    {"id": robot_id, "lease_token": token, "lease_expires_at": lease_ts,
                     "now": now_ts},
                ).fetchone()
                if row is None:
                    continue
                robot = robot_from_row(row)
                conn.execute(
                    _Q["insert_execution"],
                    {"id": token, "robot_id": robot_id, "module": module,
                     "attempt": robot.attempts, "worker": worker, "started_at": now_ts},
                )
                execution = Execution(
                    id=token, robot_id=robot_id, module=module, attempt=robot.attempts,
                    status=ExecutionStatus.RUNNING, worker=worker, started_at=now,
                )
                claims.append(Claim(robot=robot, execution=execution))
            return claims

        return await self._write(run)

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
        row = await self._write(lambda c: c.execute(_Q["update_progress"], params).fetchone())
        return None if row is None else robot_from_row(row)

    async def complete(self, completion: Completion) -> Robot | None:
        now = completion.finished_at.timestamp()
        error = _error_json(completion.error)

        def run(conn: sqlite3.Connection) -> Robot | None:
            row = conn.execute(
                _Q["complete_robot"],
                {
                    "id": completion.robot_id,
                    "lease_token": completion.lease_token,
                    "status": str(completion.status),
                    "result": None if completion.result is None
                    else json.dumps(completion.result),
                    "error": error,
                    "now": now,
                    "scheduled_at": _ts(completion.scheduled_at),
                    "module": completion.module,
                },
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                _Q["finish_execution"],
                {"id": completion.lease_token, "status": completion.execution_status,
                 "finished_at": now, "duration_ms": completion.duration_ms, "error": error},
            )
            return robot_from_row(row)

        return await self._write(run)

    async def cancel_robot(self, robot_id: str, now: datetime) -> Robot | None:
        now_ts = now.timestamp()

        def run(conn: sqlite3.Connection) -> Robot | None:
            row = conn.execute(_Q["cancel_robot"], {"id": robot_id, "now": now_ts}).fetchone()
            if row is None:
                return None
            conn.execute(_Q["cancel_executions"], {"robot_id": robot_id, "now": now_ts})
            return robot_from_row(row)

        return await self._write(run)

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
        row = await self._write(lambda c: c.execute(_Q["requeue_robot"], params).fetchone())
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
        def run(conn: sqlite3.Connection) -> list[AuditEvent]:
            row = conn.execute(_Q["last_audit_hash"]).fetchone()
            prev = None if row is None else row["hash"]
            chained = []
            for event in events:
                digest = audit_hash(prev, event)
                conn.execute(
                    _Q["insert_audit"],
                    {"ts": event.ts.timestamp(), "principal": event.principal,
                     "action": event.action, "target": event.target, "outcome": event.outcome,
                     "client": event.client, "request_id": event.request_id,
                     "details": json.dumps(event.details, sort_keys=True),
                     "prev_hash": prev, "hash": digest},
                )
                chained.append(_with_hash(event, prev, digest))
                prev = digest
            return chained

        return await self._write(run)

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

    # -- statistics and retention ------------------------------------------------------

    async def count_robots(self) -> dict[tuple[str, str], int]:
        rows = await self._read(lambda c: c.execute(_Q["count_robots"]).fetchall())
        return {(r["kind"], r["status"]): r["n"] for r in rows}

    async def queue_stats(self, now: datetime) -> tuple[int, float | None]:
        now_ts = now.timestamp()
        row = await self._read(lambda c: c.execute(_Q["queue_stats"], {"now": now_ts}).fetchone())
        oldest = None if row["oldest"] is None else max(0.0, now_ts - row["oldest"])
        return int(row["n"]), oldest

    async def purge(self, finished_before: datetime) -> int:
        before = finished_before.timestamp()

        def run(conn: sqlite3.Connection) -> int:
            conn.execute(_Q["purge_executions"], {"before": before})
            deleted = conn.execute(_Q["purge_robots"], {"before": before}).rowcount
            conn.execute(_Q["purge_audit"], {"before": before})
            return int(deleted)

        return await self._write(run)


def _robot_params(robot: Robot) -> dict[str, Any]:
    return {
        "id": robot.id,
        "kind": robot.kind,
        "payload": json.dumps(robot.payload),
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
    }


def _with_hash(event: AuditEvent, prev: str | None, digest: str) -> AuditEvent:
    from attrs import evolve

    return evolve(event, prev_hash=prev, hash=digest)


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (our migrations hold no semicolons in bodies)."""
    lines = [ln for ln in script.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
