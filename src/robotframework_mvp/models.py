"""The domain model: robots, their executions, modules, principals and audit events.

Everything here is an immutable attrs class; state changes produce new objects through
the StateManager, never by mutating shared ones. ``converter`` is the project's one
cattrs Converter: it turns these classes into JSON-able dicts and back.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import cattrs
import orjson
import uuid_utils

from .config import RateLimit

__all__ = [
    "TERMINAL_STATUSES",
    "ApiKey",
    "AuditEvent",
    "ErrorInfo",
    "Execution",
    "ExecutionStatus",
    "FollowUp",
    "MisfirePolicy",
    "ModuleRecord",
    "Principal",
    "Robot",
    "RobotStatus",
    "Schedule",
    "audit_hash",
    "chain_audit",
    "converter",
    "json_bytes",
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
    #: the public prefix of the stored API key that authenticated this call, if any
    key_prefix: str | None = None
    #: this key's own rate limit, used instead of ``RFMVP_RATE_LIMIT`` when set
    rate_limit: RateLimit | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes


@attrs.frozen
class FollowUp:
    """A robot to create when another ends: ``kind`` and a payload template.

    In the template, a string exactly equal to ``$parent.id``, ``$parent.error``,
    ``$parent.result`` or ``$parent.result.<dotted.path>`` is replaced by that value of
    the parent (see ``robotframework_mvp.chains.render_payload``).
    """

    kind: str
    payload: JSONObject = attrs.field(factory=dict)


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
    #: the robot whose completion created this one (a chain), and which follow-up it was
    parent_id: str | None = None
    parent_trigger: str | None = None
    #: the schedule that fired this robot; its ``scheduled_at`` is the due time
    schedule_id: str | None = None
    #: robots to create when this one succeeds / fails (see docs/scheduling.md)
    on_success: FollowUp | None = None
    on_failure: FollowUp | None = None

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


class MisfirePolicy(enum.StrEnum):
    """What a schedule does with due times that passed while no process could fire them."""

    #: fire none of them (only due times within the misfire grace fire)
    SKIP = "skip"
    #: fire one robot for all of them (at the latest missed due time)
    RUN_ONCE = "run_once"
    #: fire one robot per missed due time, the latest ``misfire_limit`` of them
    RUN_ALL = "run_all"


@attrs.frozen
class Schedule:
    """A cron expression that fires robots of ``kind`` with ``payload`` when due.

    ``last_due_at``: every due time up to it has been decided (fired or skipped);
    ``next_due_at``: the first due time after it.
    """

    id: str
    owner: str
    tenant: str
    cron: str
    timezone: str
    kind: str
    payload: JSONObject
    misfire_policy: MisfirePolicy
    last_due_at: datetime
    next_due_at: datetime
    priority: int = 0
    misfire_limit: int = 100
    paused: bool = False
    created_at: datetime = attrs.field(factory=utcnow)
    updated_at: datetime = attrs.field(factory=utcnow)

    def to_dict(self) -> JSONObject:
        """The schedule as the HTTP contract shows it."""
        data: JSONObject = converter.unstructure(self)
        return data


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


@attrs.frozen
class ApiKey:
    """A stored API key: who it stands for, and its keyed digest (never the secret).

    The key itself (``rfmvp_<prefix>_<secret>``) is shown once, when it is created;
    ``prefix`` is public and identifies the key, ``digest`` is the HMAC-SHA-256 of the
    secret under the server pepper (``RFMVP_SECRET_KEY``).
    """

    id: str
    prefix: str
    digest: str = attrs.field(repr=False)
    principal: str
    tenant: str
    scopes: frozenset[str]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    rate_limit: RateLimit | None = None
    last_used_at: datetime | None = None
    description: str = ""

    def state(self, now: datetime) -> str:
        """``active``, ``expired`` or ``revoked`` at ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


def json_bytes(value: Any) -> bytes:
    """``value`` as compact JSON, datetimes in ISO 8601 and keys as strings: by orjson (a
    fifth to a tenth of ``json.dumps``' time), or by ``json`` for what orjson refuses (an
    integer beyond 64 bits, a lone surrogate)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), default=_isoformat).encode()


#: a run of 19 digits: an integer there may lie beyond 64 bits (see ``json_loads``)
_LONG_DIGITS_TEXT = re.compile(r"[0-9]{19}")
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}")


def json_loads(data: str | bytes) -> Any:
    """JSON text as Python values: by orjson (a fifth to a tenth of ``json.loads``' time),
    or by ``json`` where orjson would read it differently. orjson reads an integer beyond
    64 bits as a float, so text with 19 digits in a row goes to ``json``, which keeps it
    exact; and orjson refuses what ``json`` reads (``NaN``, a lone surrogate escape)."""
    long_digits = _LONG_DIGITS_TEXT if isinstance(data, str) else _LONG_DIGITS_BYTES
    if long_digits.search(data) is None:  # type: ignore[arg-type]
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def _isoformat(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def audit_hash(prev_hash: str | None, event: AuditEvent) -> str:
    """SHA-256 over the previous hash and the event's canonical JSON: the chain link.

    The canonical JSON is ``json.dumps(body, sort_keys=True, separators=(",", ":"),
    ensure_ascii=True)`` of the event's fields and ``prev_hash``, a persisted format. It is
    built here field by field, in that order and with json's own string encoder, which
    gives the same text for a third less time than building and sorting the dict (every
    submitted robot is audited); a property test holds the two equal.
    """
    canonical = (
        '{"action":' + _json_str(event.action) + ',"client":' + _json_opt(event.client)
        + ',"details":' + _CANONICAL.encode(event.details)
        + ',"outcome":' + _json_str(event.outcome) + ',"prev_hash":' + _json_opt(prev_hash)
        + ',"principal":' + _json_opt(event.principal)
        + ',"request_id":' + _json_str(event.request_id)
        + ',"target":' + _json_opt(event.target)
        + ',"ts":' + _json_str(event.ts.isoformat()) + "}"
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


#: the audit chain's canonical JSON (see ``audit_hash``)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
_json_str = json.encoder.encode_basestring_ascii


def _json_opt(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def chain_audit(prev_hash: str | None, events: Sequence[AuditEvent]) -> list[AuditEvent]:
    """``events`` linked in order after the record whose hash is ``prev_hash``."""
    chained = []
    for e in events:
        digest = audit_hash(prev_hash, e)
        chained.append(AuditEvent(
            ts=e.ts, principal=e.principal, action=e.action, target=e.target,
            outcome=e.outcome, client=e.client, request_id=e.request_id, details=e.details,
            prev_hash=prev_hash, hash=digest))
        prev_hash = digest
    return chained


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
