"""The narrow protocol every storage driver implements.

The StateManager owns the flow; a driver only persists. Every method that changes a
robot's status is one conditional write: it names the status (and, for a worker, the
lease token) it expects, and returns None when the robot is no longer in that state, so
two workers can never both own a robot and a late worker cannot overwrite a terminal
state. The same conformance tests run against every implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import attrs

from ..models import AuditEvent, ErrorInfo, Execution, ModuleRecord, Robot, RobotStatus

__all__ = ["Claim", "Completion", "StorageDriver"]


@attrs.frozen
class Claim:
    """A robot handed to a worker, with the execution whose id is its lease token."""

    robot: Robot
    execution: Execution


@attrs.frozen
class Completion:
    """How an attempt ended, as one write.

    ``status`` is the robot's next status: a terminal one, or ``queued`` for a retry
    (then ``scheduled_at`` says when, and ``module`` may move it to another module).
    """

    robot_id: str
    lease_token: str
    status: RobotStatus
    execution_status: str
    finished_at: datetime
    duration_ms: float
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    scheduled_at: datetime | None = None
    module: str | None = None


@runtime_checkable
class StorageDriver(Protocol):
    """Persistence for robots, executions, modules and the audit trail."""

    #: URL scheme this driver serves ("sqlite", "postgresql")
    name: str

    async def open(self) -> None:
        """Connect (pools, files). Called once before any other method."""

    async def close(self) -> None:
        """Release every connection. Safe to call twice."""

    async def migrate(self) -> list[int]:
        """Apply pending numbered migrations; return the versions applied now.

        Safe to run from many processes at once.
        """

    async def ping(self) -> None:
        """Raise if the store cannot be reached."""

    async def create_robots(self, robots: Sequence[Robot]) -> list[tuple[Robot, bool]]:
        """Insert robots in one transaction.

        A robot whose ``(owner, idempotency_key)`` already exists is not inserted: the
        stored one is returned with ``False``. New ones come back with ``True``.
        """

    async def get_robot(self, robot_id: str) -> Robot | None: ...

    async def list_robots(
        self,
        *,
        tenant: str | None,
        status: RobotStatus | None,
        kind: str | None,
        limit: int,
        before_id: str | None,
    ) -> list[Robot]:
        """Newest first; ``tenant=None`` lists every tenant; ``before_id`` pages."""

    async def claim_robots(
        self, *, module: str, limit: int, worker: str, now: datetime, lease_expires_at: datetime
    ) -> list[Claim]:
        """Take up to ``limit`` due queued robots of ``module`` (priority, then age).

        Each claimed robot becomes ``running`` with ``attempts + 1``, a fresh lease token,
        and an Execution row. Concurrent callers never claim the same robot.
        """

    async def renew_leases(
        self, leases: Sequence[tuple[str, str]], lease_expires_at: datetime
    ) -> set[str]:
        """Extend leases of ``(robot_id, lease_token)``; return the robot ids still held."""

    async def update_progress(
        self,
        robot_id: str,
        lease_token: str,
        progress: float,
        message: str | None,
        now: datetime,
    ) -> Robot | None:
        """Store progress (never lower than before) under the lease; None if lost."""

    async def complete(self, completion: Completion) -> Robot | None:
        """End an attempt under its lease in one transaction; None if the lease is lost."""

    async def cancel_robot(self, robot_id: str, now: datetime) -> Robot | None:
        """Cancel a pending, queued or running robot; None if it had already ended."""

    async def release_robots(self, leases: Sequence[tuple[str, str]], now: datetime) -> int:
        """Hand running robots back to the queue without charging the attempt."""

    async def reap_expired_leases(self, now: datetime) -> list[Robot]:
        """Requeue (or fail, when out of attempts) robots whose lease expired."""

    async def requeue_robot(
        self, robot_id: str, now: datetime, extra_attempts: int
    ) -> Robot | None:
        """Put a failed or timed-out robot back in the queue with more attempts."""

    async def next_due_at(self, modules: Sequence[str]) -> datetime | None:
        """When the earliest queued robot of these modules becomes due."""

    async def list_executions(self, robot_id: str) -> list[Execution]: ...

    async def upsert_modules(self, records: Sequence[ModuleRecord], now: datetime) -> None: ...

    async def list_modules(self) -> list[ModuleRecord]: ...

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Append events to the hash chain in order; return them with their hashes."""

    async def list_audit(self, *, after_seq: int, limit: int) -> list[tuple[int, AuditEvent]]:
        """Audit records in chain order, for verification and export."""

    async def count_robots(self) -> dict[tuple[str, str], int]:
        """Robots per ``(kind, status)``."""

    async def queue_stats(self, now: datetime) -> tuple[int, float | None]:
        """Queued robots that are due, and the age in seconds of the oldest one."""

    async def purge(self, finished_before: datetime) -> int:
        """Delete finished robots, their executions and audit records older than this."""
