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

import anyio
import attrs

from ..models import (
    ApiKey,
    AuditEvent,
    ErrorInfo,
    Execution,
    ExecutionStatus,
    FollowUp,
    ModuleRecord,
    Robot,
    RobotStatus,
    Schedule,
    chain_audit,
)

__all__ = ["Claim", "Completion", "CreatesClaimed", "ProgressReport", "ScheduleFire",
           "StorageDriver", "chain_audit_in_slices", "check_claimable", "claim_of",
           "created_claim",
           "ended_robot", "ended_robots", "followup_from_json", "followups_json", "set_based"]

#: audit records chained between two turns of the event loop (see chain_audit_in_slices)
AUDIT_SLICE = 64


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
    #: a chain's follow-up robot (``parent_id`` and ``parent_trigger`` set), inserted in
    #: the same transaction as this completion, and never twice for one parent and trigger
    followup: Robot | None = None
    #: the robot as its claim returned it, if the caller has it (the worker does). Under
    #: the lease only the completion itself and progress reports change the row, so a
    #: driver may rebuild the stored robot from this (``ended_robot``) instead of decoding
    #: the whole row back. None: the driver reads the row.
    claimed: Robot | None = None


@attrs.frozen
class ProgressReport:
    """A module's progress report, written under its robot's lease."""

    robot_id: str
    lease_token: str
    progress: float
    message: str | None = None


@attrs.frozen
class ScheduleFire:
    """One due time of a schedule and the robot it fired.

    ``late``: fired after the misfire grace (a catch-up); ``covers``: how many missed due
    times the robot stands for (``run_once``), else 1.
    """

    schedule_id: str
    due_at: datetime
    robot_id: str
    fired_at: datetime
    late: bool = False
    covers: int = 1


async def chain_audit_in_slices(prev_hash: str | None, events: Sequence[AuditEvent]
                                ) -> list[AuditEvent]:
    """``chain_audit``, a slice of ``AUDIT_SLICE`` records at a time, letting the event loop
    run between slices. Under load a flush carries hundreds of records, and hashing them in
    one go held the loop for milliseconds, every request behind it waiting (seen in
    ``rfmvp_event_loop_lag_seconds``)."""
    chained: list[AuditEvent] = []
    for start in range(0, len(events), AUDIT_SLICE):
        if start:
            await anyio.lowlevel.checkpoint()
        part = chain_audit(prev_hash, events[start:start + AUDIT_SLICE])
        chained += part
        prev_hash = part[-1].hash
    return chained


def followups_json(robot: Robot) -> dict[str, Any] | None:
    """The robot's follow-ups as stored (``{"on_success": {kind, payload}, ...}``)."""
    out = {name: {"kind": f.kind, "payload": f.payload}
           for name, f in (("on_success", robot.on_success), ("on_failure", robot.on_failure))
           if f is not None}
    return out or None


def check_claimable(robots: Sequence[Robot]) -> None:
    """Refuse what ``create_and_claim`` cannot take: a robot without a module, or with an
    idempotency key (an existing robot would then be the answer, not a new claim)."""
    if any(r.idempotency_key is not None or r.module is None for r in robots):
        raise ValueError("create_and_claim takes a new robot with a module and no "
                         "idempotency key")


def claim_of(robot: Robot, module: str, worker: str, now: datetime) -> Claim:
    """A claimed robot with its running execution (whose id is the lease token)."""
    assert robot.lease_token is not None
    return Claim(robot=robot, execution=Execution(
        id=robot.lease_token, robot_id=robot.id, module=module, attempt=robot.attempts,
        status=ExecutionStatus.RUNNING, worker=worker, started_at=now))


def created_claim(robot: Robot, *, lease_token: str, worker: str, now: datetime,
                  lease_expires_at: datetime) -> Claim:
    """The claim on a robot created claimed: the stored row, built from the robot given.

    Creating it claimed writes the robot as given, except for what starting it sets:
    status running, attempt 1, started and updated ``now``, and the lease. So a driver
    need not read the row back (a conformance test checks this equals the stored row).
    """
    assert robot.module is not None
    # Field by field, as ``ended_robot``: a quarter faster than ``attrs.evolve`` here.
    claimed = Robot(
        id=robot.id, kind=robot.kind, payload=robot.payload, owner=robot.owner,
        tenant=robot.tenant, status=RobotStatus.RUNNING, module=robot.module, progress=0.0,
        progress_message=None, attempts=1, max_attempts=robot.max_attempts,
        priority=robot.priority, idempotency_key=robot.idempotency_key, result=None,
        error=None, created_at=robot.created_at, updated_at=now, started_at=now,
        finished_at=None, scheduled_at=robot.scheduled_at,
        lease_expires_at=lease_expires_at, lease_token=lease_token,
        parent_id=robot.parent_id, parent_trigger=robot.parent_trigger,
        schedule_id=robot.schedule_id, on_success=robot.on_success,
        on_failure=robot.on_failure,
    )
    return claim_of(claimed, robot.module, worker, now)


def ended_robot(completion: Completion, claimed: Robot, *, progress: float,
                progress_message: str | None, result: dict[str, Any] | None) -> Robot:
    """The stored robot after ``completion`` was written, from the robot as claimed.

    The row's own ``progress``, ``progress_message`` and ``result`` (as stored, decoded)
    come from the store; every other column is either the completion's or unchanged since
    the claim: while the lease is held, nothing else writes the row. A conformance test
    checks this equals the row read back, for every driver.
    """
    retry = completion.status is RobotStatus.QUEUED
    return Robot(
        id=claimed.id, kind=claimed.kind, payload=claimed.payload, owner=claimed.owner,
        tenant=claimed.tenant, status=completion.status,
        module=completion.module or claimed.module, progress=progress,
        progress_message=progress_message, attempts=claimed.attempts,
        max_attempts=claimed.max_attempts, priority=claimed.priority,
        idempotency_key=claimed.idempotency_key, result=result, error=completion.error,
        created_at=claimed.created_at, updated_at=completion.finished_at,
        started_at=claimed.started_at, finished_at=None if retry else completion.finished_at,
        scheduled_at=completion.scheduled_at or claimed.scheduled_at,
        lease_expires_at=None, lease_token=None, parent_id=claimed.parent_id,
        parent_trigger=claimed.parent_trigger, schedule_id=claimed.schedule_id,
        on_success=claimed.on_success, on_failure=claimed.on_failure,
    )


def ended_robots(completions: Sequence[Completion],
                 ended: dict[str, tuple[float, str | None, dict[str, Any] | None]],
                 read_back: dict[str, Robot]) -> list[Robot | None]:
    """``complete_many``'s answer, in order: None where the lease was gone (the robot is
    not in ``ended``); else the robot rebuilt by ``ended_robot`` from its claimed copy and
    its stored (progress, progress message, result) in ``ended``, or the robot read back
    for a completion without a claimed copy."""
    out: list[Robot | None] = []
    for c in completions:
        columns = ended.get(c.robot_id)
        if columns is None:
            out.append(None)
        elif c.claimed is None:
            out.append(read_back[c.robot_id])
        else:
            progress, message, result = columns
            out.append(ended_robot(c, c.claimed, progress=progress, progress_message=message,
                                   result=result))
    return out


def set_based(batch: Sequence[Completion] | Sequence[ProgressReport]) -> bool:
    """Whether a batch can go as one set-based statement: more than one item, and no
    robot twice (the statement would join both items to the robot's one row, so a
    stale item could take the place of the current one). Else: one item at a time."""
    return len(batch) > 1 and len({item.robot_id for item in batch}) == len(batch)


def followup_from_json(data: dict[str, Any] | None, name: str) -> FollowUp | None:
    if not data or name not in data:
        return None
    return FollowUp(kind=data[name]["kind"], payload=data[name]["payload"])


@runtime_checkable
@runtime_checkable
class CreatesClaimed(Protocol):
    """Optional for a driver: create a robot already claimed, in one write.

    The orchestrator uses it when this process's worker has a free slot for a new robot
    (no idempotency key, due now); a driver without it gets create, then claim. A driver
    may also have ``create_and_claim_many(robots, *, worker, now, lease_expires_at) ->
    list[Claim | None]``, the same for several robots in one transaction (both built-in
    drivers do): robots submitted one at a time meanwhile then share a write.
    """

    async def create_and_claim(
        self, robot: Robot, *, worker: str, now: datetime, lease_expires_at: datetime
    ) -> Claim | None:
        """Insert ``robot`` and claim it for ``worker`` (queued → running, its execution
        written) in one transaction; None if a robot with its id exists (nothing written).
        """


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

    async def complete_many(self, completions: Sequence[Completion]) -> list[Robot | None]:
        """``complete`` for several attempts in one transaction (group commit), in order.

        Each completion keeps its own lease condition: one lost lease yields None for that
        robot and changes nothing for the others.
        """

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
        """Delete finished robots and their executions older than this."""

    async def reassign_queued_robots(self, module: str, kind: str, to_module: str,
                                     now: datetime, limit: int) -> int:
        """Move up to ``limit`` queued robots of ``kind`` from ``module`` to ``to_module``
        (its circuit is open, it is unhealthy or gone); return how many moved."""

    async def fail_queued_robots(self, module: str, kind: str, due_before: datetime,
                                 error: ErrorInfo, now: datetime, limit: int) -> list[Robot]:
        """Fail up to ``limit`` queued robots of ``kind`` on ``module`` that were due at
        ``due_before`` or earlier, with ``error``; return them as stored."""

    async def recent_outcomes(self, since_id: str, limit: int) -> list[tuple[str, str, float]]:
        """``(module, status, duration_ms)`` of finished attempts whose execution id is at
        least ``since_id`` (ids are time-ordered), newest first, at most ``limit``: the
        fleet-wide figures the leader scores modules from."""

    # -- the audit trail's retention, and API keys --------------------------------------

    async def purge_audit(self, before: datetime) -> int:
        """Delete the oldest audit records, written before ``before``; return how many.

        Only a contiguous run from the start of the chain goes (the rest must still
        verify), and the newest record always stays.
        """

    async def tail_audit(self, limit: int) -> list[tuple[int, AuditEvent]]:
        """The newest ``limit`` audit records, in chain order."""

    async def create_api_key(self, key: ApiKey) -> bool:
        """Store a new key; False (nothing stored) when its prefix is taken."""

    async def get_api_key_by_prefix(self, prefix: str) -> ApiKey | None:
        """The key with this public prefix, whatever its state (one indexed read).

        A driver may also offer ``get_api_keys_by_prefixes(prefixes) -> {prefix: key}``
        (both built-in drivers do): the keys of requests that arrive together are then
        read in one round trip instead of one each.
        """

    async def list_api_keys(self, *, principal: str | None) -> list[ApiKey]:
        """Every key (of ``principal``, when given), oldest first, revoked ones too."""

    async def revoke_api_key(self, prefix: str, now: datetime) -> ApiKey | None:
        """Revoke a key; None when there is no such key or it was already revoked."""

    async def replace_api_key(
        self, prefix: str, replacement: ApiKey, expires_at: datetime
    ) -> ApiKey | None:
        """Rotation, in one transaction: store ``replacement`` and make the old key expire
        at ``expires_at`` (or earlier, if it already would). Returns the old key as
        updated; None (and nothing stored) when it does not exist or was revoked.
        Raises ConflictError when the replacement's prefix is taken.
        """

    async def touch_api_keys(self, used: Sequence[tuple[str, datetime]]) -> None:
        """Record when keys were last used (``(prefix, time)``); never moves one back."""

    # -- later, on a schedule, in chains ------------------------------------------------

    async def list_robots_by_due(
        self, *, tenant: str | None, status: RobotStatus | None, kind: str | None,
        limit: int, after: tuple[datetime, str] | None,
    ) -> list[Robot]:
        """Earliest ``scheduled_at`` first (then id); ``after`` is the last row seen."""

    async def create_followups(self, robots: Sequence[Robot]) -> list[Robot]:
        """Insert chain children; one whose (parent_id, parent_trigger) exists is skipped.

        Returns the robots inserted now.
        """

    async def create_schedule(self, schedule: Schedule) -> Schedule: ...

    async def get_schedule(self, schedule_id: str) -> Schedule | None: ...

    async def list_schedules(self, *, tenant: str | None, limit: int, after_id: str | None
                             ) -> list[Schedule]:
        """By id; ``tenant=None`` lists every tenant."""

    async def pause_schedule(self, schedule_id: str, now: datetime) -> Schedule | None: ...

    async def resume_schedule(self, schedule_id: str, now: datetime, next_due_at: datetime
                              ) -> Schedule | None:
        """Unpause, owing nothing for the pause: ``last_due_at = now``. None if not paused."""

    async def delete_schedule(self, schedule_id: str) -> bool:
        """Delete the schedule and its fires (not its robots); False if it did not exist."""

    async def due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        """Unpaused schedules whose ``next_due_at`` has come, earliest first."""

    async def next_schedule_due_at(self) -> datetime | None:
        """The earliest ``next_due_at`` of unpaused schedules."""

    async def fire_schedule(
        self, schedule: Schedule, *, last_due_at: datetime, next_due_at: datetime,
        fires: Sequence[tuple[ScheduleFire, Robot]], now: datetime,
    ) -> list[Robot] | None:
        """In one transaction: advance ``last_due_at`` from the value in ``schedule``
        (compare-and-set), then insert each fire and its robot, skipping due times that
        already fired. None when another process advanced the schedule first; else the
        robots inserted now."""

    async def list_schedule_fires(self, schedule_id: str, limit: int) -> list[ScheduleFire]:
        """The latest fires of a schedule, newest due time first."""
