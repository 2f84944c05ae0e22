"""The domain model: robots, their executions, modules, principals and audit events.

Everything here is an immutable attrs class; state changes produce new objects through
the StateManager, never by mutating shared ones. ``converter`` is the project's one
cattrs Converter: it turns these classes into JSON-able dicts and back.
"""

from __future__ import annotations

import enum
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import attrs
import cattrs
import uuid_utils

__all__ = [
    "TERMINAL_STATUSES",
    "AuditEvent",
    "ErrorInfo",
    "Execution",
    "ExecutionStatus",
    "ModuleRecord",
    "Principal",
    "Robot",
    "RobotStatus",
    "audit_hash",
    "converter",
    "new_id",
    "utcnow",
]

JSONObject = dict[str, Any]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A UUIDv7 as text: time-ordered (good index locality), 74 random bits (not guessable)."""
    return str(uuid_utils.uuid7())


class RobotStatus(enum.StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {RobotStatus.SUCCEEDED, RobotStatus.FAILED, RobotStatus.CANCELLED, RobotStatus.TIMED_OUT}
)


class ExecutionStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    #: the worker's lease expired (it died or froze); another attempt follows
    LOST = "lost"
    #: the worker stopped gracefully and handed the robot back without charging an attempt
    RELEASED = "released"


@attrs.frozen
class ErrorInfo:
    type: str
    message: str


@attrs.frozen
class Principal:
    """Who is calling: ``tenant`` bounds what they see, ``scopes`` what they may do."""

    id: str
    tenant: str
    scopes: frozenset[str] = frozenset({"robots:read", "robots:write"})

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


@attrs.frozen
class Robot:
    id: str
    kind: str
    payload: JSONObject
    owner: str
    tenant: str
    status: RobotStatus
    module: str | None = None
    progress: float = 0.0
    progress_message: str | None = None
    attempts: int = 0
    max_attempts: int = 3
    priority: int = 0
    idempotency_key: str | None = None
    result: JSONObject | None = None
    error: ErrorInfo | None = None
    created_at: datetime = attrs.field(factory=utcnow)
    updated_at: datetime = attrs.field(factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    scheduled_at: datetime = attrs.field(factory=utcnow)
    lease_expires_at: datetime | None = None
    lease_token: str | None = attrs.field(default=None, repr=False)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> JSONObject:
        """The robot as the HTTP contract shows it (never the lease token)."""
        data: JSONObject = converter.unstructure(self)
        data.pop("lease_token", None)
        return data


@attrs.frozen
class Execution:
    """One attempt of a robot on a module; its id is the attempt's lease token."""

    id: str
    robot_id: str
    module: str
    attempt: int
    status: ExecutionStatus
    worker: str
    started_at: datetime
    finished_at: datetime | None = None
    duration_ms: float | None = None
    error: ErrorInfo | None = None


@attrs.frozen
class ModuleRecord:
    """What the store and the LoadBalancer know about one module."""

    name: str
    kinds: tuple[str, ...]
    capacity: int
    health: str = "unknown"
    last_check_at: datetime | None = None
    score: float = 1.0
    success_rate: float = 1.0
    latency_ewma_ms: float | None = None
    circuit_state: str = "closed"
    load: int = 0
    max_attempts: int | None = None
    #: when the owning process last wrote this record (None before it is stored)
    updated_at: datetime | None = None


@attrs.frozen
class AuditEvent:
    """One audited request. ``hash`` chains it to ``prev_hash`` (tamper evidence)."""

    ts: datetime
    principal: str | None
    action: str
    target: str | None
    outcome: str
    client: str | None
    request_id: str
    details: JSONObject = attrs.field(factory=dict)
    prev_hash: str | None = None
    hash: str | None = None


def audit_hash(prev_hash: str | None, event: AuditEvent) -> str:
    """SHA-256 over the previous hash and the event's canonical JSON: the chain link."""
    body = {
        "ts": event.ts.isoformat(),
        "principal": event.principal,
        "action": event.action,
        "target": event.target,
        "outcome": event.outcome,
        "client": event.client,
        "request_id": event.request_id,
        "details": event.details,
        "prev_hash": prev_hash,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_unstructure_hook(datetime, lambda d: d.isoformat())
    conv.register_structure_hook(datetime, lambda v, _: _parse_datetime(v))
    conv.register_unstructure_hook(frozenset, sorted)
    return conv


def _parse_datetime(value: Any) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


converter = _make_converter()
