"""Schedules: cron expressions that fire robots, exactly once per due time.

A ``Schedule`` holds a cron expression (5 fields, or 6 with seconds first), a time zone,
the robot's kind, payload and priority, its owner, and a misfire policy. Every process
may run a ``Scheduler`` loop: it sleeps until the earliest ``next_due_at`` (at most
``RFMVP_SCHEDULER_INTERVAL``), plans what is due with ``plan_fires`` and writes it with
one ``StorageDriver.fire_schedule`` transaction. Two things in the store, not a lock
that can expire, keep that exactly-once with any number of processes:

- the transaction first advances the schedule's ``last_due_at`` by compare-and-set, so
  one process decides each interval and the others find the condition false;
- each due time is a row of ``schedule_fires`` keyed by ``(schedule_id, due_at)``, so no
  due time can fire two robots even if a decision were made twice.

``ScheduleApi`` is the public half (``Orchestrator.add_schedule`` ...), mixed into the
Orchestrator; every call authenticates, checks the scope and tenant, and is audited.
"""

from __future__ import annotations

import builtins
import logging
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import anyio.abc
import attrs
from croniter import CroniterError, croniter

from .errors import NotFoundError, RobotFrameworkError, ValidationError
from .models import MisfirePolicy, Principal, Schedule, new_id, utcnow
from .security.sanitize import sanitize_payload, validate_kind, validate_priority
from .security.validator import RequestInfo
from .state.driver import ScheduleFire

if TYPE_CHECKING:
    from .balancing import LoadBalancer
    from .orchestrator import Orchestrator
    from .security.audit import AuditLog
    from .security.validator import SecurityValidator

__all__ = [
    "FirePlan",
    "ScheduleApi",
    "SchedulePage",
    "Scheduler",
    "change_schedule",
    "next_due_time",
    "parse_cron",
    "parse_timezone",
    "plan_fires",
]

log = logging.getLogger(__name__)

#: most missed due times counted (and so walked) when planning one schedule
COUNT_CAP = 10_000
MAX_MISFIRE_LIMIT = 10_000
_TZ_NAME = re.compile(r"[A-Za-z0-9_+\-/]{1,64}")
#: how long a schedule that failed to fire waits before this process tries it again
_FAILURE_BACKOFF = 5.0


# -- cron and time zones -------------------------------------------------------------------


def parse_cron(expression: object) -> str:
    """``expression`` normalized, if it is a valid 5-field or 6-field cron expression.

    Five fields: minute hour day-of-month month day-of-week. Six: a seconds field first.
    Parsing and matching are croniter's.
    """
    if not isinstance(expression, str) or not 0 < len(expression) <= 200:
        raise ValidationError("cron must be a cron expression of 5 or 6 fields "
                              "(e.g. '*/5 * * * *')", path="$.cron")
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValidationError(
            f"cron has {len(fields)} fields; give 5 (minute hour day month weekday) or 6 "
            "(second minute hour day month weekday)", path="$.cron")
    normalized = " ".join(fields)
    try:
        valid = croniter.is_valid(normalized, second_at_beginning=True)
        if valid:  # also refuses expressions that never match, such as '0 0 30 2 *'
            croniter(normalized, datetime(2000, 1, 1, tzinfo=UTC),
                     second_at_beginning=True).get_next(datetime)
    except (CroniterError, ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise ValidationError(f"cron {normalized[:64]!r} is not a valid cron expression",
                              path="$.cron")
    return normalized


def parse_timezone(name: object) -> ZoneInfo:
    """The IANA time zone called ``name`` (``"UTC"``, ``"Europe/Paris"`` ...)."""
    if isinstance(name, str) and _TZ_NAME.fullmatch(name) and ".." not in name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    raise ValidationError("timezone must be an IANA time zone name such as 'UTC' or "
                          "'Europe/Paris'", path="$.timezone")


def _cron(expression: str, start: datetime, tz: tzinfo) -> croniter:
    return croniter(expression, start.astimezone(tz), second_at_beginning=True)


def next_due_time(expression: str, tz: tzinfo, after: datetime) -> datetime:
    """The first due time strictly after ``after``, in UTC."""
    nxt: datetime = _cron(expression, after, tz).get_next(datetime)
    return _utc(nxt)


def _utc(value: datetime) -> datetime:
    # croniter may hand back fold=1 (DST); in UTC it means nothing, so drop it.
    return value.astimezone(UTC).replace(fold=0)


@attrs.frozen
class FirePlan:
    """What one scheduler pass does with a schedule.

    ``fires``: ``(due_at, late, covers)`` in due order; ``skipped``: missed due times
    that fire nothing (a lower bound when ``truncated``); ``last_due_at``: the latest due
    time up to now, which every due time before it is decided with; ``next_due_at``: the
    first one after it.
    """

    fires: list[tuple[datetime, bool, int]]
    skipped: int
    truncated: bool
    last_due_at: datetime
    next_due_at: datetime


def plan_fires(
    *, cron: str, tz: tzinfo, policy: MisfirePolicy, misfire_limit: int,
    last_due_at: datetime, now: datetime, grace: float,
) -> FirePlan | None:
    """Decide the due times in ``(last_due_at, now]``; None when there is none.

    A due time is on time when ``now - due <= grace`` and fires whatever the policy.
    The others were missed: ``skip`` fires none of them; ``run_once`` fires one robot at
    the latest missed due time, standing for all of them; ``run_all`` fires one per
    missed due time, the latest ``misfire_limit`` of them.
    """
    # croniter's get_prev is strictly before its start; a microsecond later makes it <=.
    walker = _cron(cron, now + timedelta(microseconds=1), tz)
    latest = _utc(walker.get_prev(datetime))
    if latest <= last_due_at:
        return None
    on_time: list[datetime] = []
    missed: list[datetime] = []  # newest first
    due = latest
    while due > last_due_at and len(on_time) + len(missed) < COUNT_CAP:
        (on_time if (now - due).total_seconds() <= grace else missed).append(due)
        due = _utc(walker.get_prev(datetime))
    truncated = due > last_due_at and len(on_time) + len(missed) >= COUNT_CAP
    fires = [(t, False, 1) for t in reversed(on_time)]
    skipped = 0
    if missed:
        if policy is MisfirePolicy.RUN_ONCE:
            fires.insert(0, (missed[0], True, len(missed)))
        elif policy is MisfirePolicy.RUN_ALL:
            taken = missed[:misfire_limit]
            fires = [(t, True, 1) for t in reversed(taken)] + fires
            skipped = len(missed) - len(taken)
        else:
            skipped = len(missed)
    return FirePlan(fires=fires, skipped=skipped, truncated=truncated, last_due_at=latest,
                    next_due_at=next_due_time(cron, tz, latest))


@attrs.frozen
class SchedulePage:
    """One page of ``list_schedules``: ``next_cursor`` is None on the last page."""

    items: list[Schedule]
    next_cursor: str | None


# -- the loop --------------------------------------------------------------------------------


class Scheduler:
    """Fires due schedules of every tenant; one per Orchestrator, in its task group."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orch = orchestrator
        self.fired = 0
        self.lost_races = 0
        self._wake = anyio.Event()
        self._backoff: dict[str, float] = {}

    def wake(self) -> None:
        """A schedule changed: look at the due times again now."""
        self._wake.set()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        interval = self.orch.settings.background.scheduler_interval
        task_status.started()
        while True:
            self._wake = anyio.Event()
            timeout = interval
            try:
                fired_any, next_due = await self.fire_due_once(horizon=interval)
                if fired_any:
                    continue  # fired schedules have moved on: look again at once
                if next_due is not None:
                    timeout = min(interval, max(0.0, (next_due - utcnow()).total_seconds()))
            except Exception:
                log.exception("the scheduler loop failed; retrying in %.1f s", interval)
            if timeout > 0:
                with anyio.move_on_after(timeout):
                    await self._wake.wait()

    async def fire_due_once(self, *, horizon: float = 0.0) -> tuple[bool, datetime | None]:
        """One pass: fire every due schedule. Returns whether any schedule was decided,
        and the earliest due time still ahead within ``horizon`` seconds."""
        now = utcnow()
        upcoming = await self.orch.driver.due_schedules(now + timedelta(seconds=horizon), 100)
        clock = time.monotonic()
        ready = [s for s in upcoming if self._backoff.get(s.id, 0.0) <= clock]
        decided = False
        later: list[datetime] = []
        for schedule in ready:
            if schedule.next_due_at > now:
                later.append(schedule.next_due_at)
                continue
            try:
                decided = await self.fire(schedule, now) or decided
                self._backoff.pop(schedule.id, None)
            except Exception as exc:
                self._backoff[schedule.id] = clock + _FAILURE_BACKOFF
                log.error("schedule %s could not fire (%s: %s); trying again in %.0f s",
                          schedule.id, type(exc).__name__, exc, _FAILURE_BACKOFF)
        return decided, min(later, default=None)

    async def fire(self, schedule: Schedule, now: datetime) -> bool:
        """Decide ``schedule``'s due times up to ``now``. True when the schedule moved on
        (here, or in another process that decided first); False when nothing was due."""
        orch = self.orch
        tz = parse_timezone(schedule.timezone)
        plan = plan_fires(cron=schedule.cron, tz=tz, policy=schedule.misfire_policy,
                          misfire_limit=schedule.misfire_limit,
                          last_due_at=schedule.last_due_at, now=now,
                          grace=orch.settings.background.misfire_grace)
        if plan is None:
            return False
        if plan.fires and schedule.kind not in orch.balancer.known_kinds():
            await orch.refresh_modules(fresh=True)
        fires = []
        for due_at, late, covers in plan.fires:
            robot = orch.build_robot(
                schedule.kind, schedule.payload, owner=schedule.owner, tenant=schedule.tenant,
                priority=schedule.priority, schedule_id=schedule.id)
            # Due at its due time, even a late one: the queue and ?order=due show it so.
            robot = attrs.evolve(robot, scheduled_at=due_at)
            fires.append((ScheduleFire(schedule_id=schedule.id, due_at=due_at,
                                       robot_id=robot.id, fired_at=now, late=late,
                                       covers=covers), robot))
        with orch.tracker.measure("scheduler.fire"):
            created = await orch.driver.fire_schedule(
                schedule, last_due_at=plan.last_due_at, next_due_at=plan.next_due_at,
                fires=fires, now=now)
        if created is None:
            # Another process decided this interval; its next due time is worth a look.
            self.lost_races += 1
            return True
        self.fired += len(created)
        late_by_id = {robot.id: fire for fire, robot in fires}
        if created:
            await orch.cache.set_robots(created, only_new=True)
        for robot in created:
            fire = late_by_id[robot.id]
            orch.audit.record(
                action="schedules.fire", outcome="late" if fire.late else "created",
                principal=schedule.owner, target=robot.id, client=None, request_id=new_id(),
                details={"schedule_id": schedule.id, "due_at": fire.due_at.isoformat(),
                         "covers": fire.covers})
            await orch._call_observers("on_robot_created", robot=robot)
        if plan.skipped or plan.truncated:
            count = f"{plan.skipped}{'+' if plan.truncated else ''}"
            log.warning("schedule %s: %s due times before %s were missed and skipped "
                        "(misfire policy %s)", schedule.id, count,
                        plan.last_due_at.isoformat(), schedule.misfire_policy)
            orch.audit.record(
                action="schedules.misfire", outcome="skipped", principal=schedule.owner,
                target=schedule.id, client=None, request_id=new_id(),
                details={"skipped": plan.skipped, "truncated": plan.truncated,
                         "policy": str(schedule.misfire_policy)})
        if created:
            orch.worker.wake()
        return True


# -- the public API (mixed into Orchestrator) ----------------------------------------------------


class ScheduleApi:
    """``Orchestrator.add_schedule``, ``list_schedules``, ``get_schedule``,
    ``pause_schedule``, ``resume_schedule`` and ``remove_schedule``."""

    if TYPE_CHECKING:
        security: SecurityValidator
        audit: AuditLog
        driver: Any  # as on Orchestrator: the storage_driver hook's result
        balancer: LoadBalancer
        scheduler: Scheduler

        async def refresh_modules(self, *, fresh: bool = False) -> None: ...

    async def add_schedule(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        cron: str,
        api_key: str | None,
        timezone: str = "UTC",
        misfire_policy: MisfirePolicy | str = MisfirePolicy.SKIP,
        misfire_limit: int = 100,
        priority: int = 0,
        paused: bool = False,
        client: str | None = None,
        request_id: str | None = None,
    ) -> Schedule:
        """Create a schedule that fires a ``kind`` robot with ``payload`` at each due time
        of ``cron`` in ``timezone``; the caller owns it."""
        info = RequestInfo(client=client, request_id=request_id or new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:write")
            schedule = await self.new_schedule(
                principal, kind, payload, cron=cron, timezone=timezone,
                misfire_policy=misfire_policy, misfire_limit=misfire_limit, priority=priority,
                paused=paused)
            stored: Schedule = await self.driver.create_schedule(schedule)
        except RobotFrameworkError as exc:
            self.security.audit_refusal("schedules.add", principal, None, info, exc)
            raise
        self._audit_ok("schedules.add", "created", principal, stored.id, info,
                       {"kind": stored.kind, "cron": stored.cron})
        self.scheduler.wake()
        return stored

    async def new_schedule(
        self, principal: Principal, kind: str, payload: Mapping[str, Any], *, cron: str,
        timezone: str = "UTC", misfire_policy: MisfirePolicy | str = MisfirePolicy.SKIP,
        misfire_limit: int = 100, priority: int = 0, paused: bool = False,
    ) -> Schedule:
        """A validated schedule owned by ``principal``, not stored yet (``rfmvp`` uses it)."""
        known = self.balancer.known_kinds()
        if isinstance(kind, str) and kind not in known:  # any other kind: 422 below
            await self.refresh_modules(fresh=True)
            known = self.balancer.known_kinds()
        expression = parse_cron(cron)
        tz = parse_timezone(timezone)
        policy = _parse_policy(misfire_policy)
        if (not isinstance(misfire_limit, int) or isinstance(misfire_limit, bool)
                or not 1 <= misfire_limit <= MAX_MISFIRE_LIMIT):
            raise ValidationError(f"misfire_limit must be a whole number from 1 to "
                                  f"{MAX_MISFIRE_LIMIT}", path="$.misfire_limit")
        if not isinstance(paused, bool):
            raise ValidationError("paused must be true or false", path="$.paused")
        now = utcnow().replace(microsecond=0)
        return Schedule(
            id=new_id(), owner=principal.id, tenant=principal.tenant, cron=expression,
            timezone=tz.key, kind=validate_kind(kind, known),
            payload=sanitize_payload(payload, self.security.limits),
            misfire_policy=policy, misfire_limit=misfire_limit,
            priority=validate_priority(priority), paused=paused,
            last_due_at=now, next_due_at=next_due_time(expression, tz, now),
            created_at=now, updated_at=now,
        )

    async def get_schedule(self, schedule_id: str, *, api_key: str | None,
                           client: str | None = None, request_id: str | None = None
                           ) -> Schedule:
        """One schedule; another tenant's is not found (404)."""
        info = RequestInfo(client=client, request_id=request_id or new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:read")
            schedule = await self._visible_schedule(schedule_id, principal)
        except RobotFrameworkError as exc:
            self.security.audit_refusal("schedules.get", principal, schedule_id, info, exc)
            raise
        self._audit_ok("schedules.get", "ok", principal, schedule_id, info)
        return schedule

    async def list_schedules(self, *, api_key: str | None, limit: int = 50,
                             cursor: str | None = None, client: str | None = None,
                             request_id: str | None = None) -> SchedulePage:
        """The caller's tenant's schedules (every tenant's for admins), by id."""
        info = RequestInfo(client=client, request_id=request_id or new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:read")
            if not isinstance(limit, int) or not 1 <= limit <= 500:
                raise ValidationError("limit must be between 1 and 500", path="$.limit")
            if cursor is not None and (len(cursor) > 64 or not cursor.isprintable()):
                raise ValidationError("cursor is not one this server handed out",
                                      path="$.cursor")
            items: builtins.list[Schedule] = await self.driver.list_schedules(
                tenant=None if principal.is_admin else principal.tenant, limit=limit + 1,
                after_id=cursor)
        except RobotFrameworkError as exc:
            self.security.audit_refusal("schedules.list", principal, None, info, exc)
            raise
        self._audit_ok("schedules.list", "ok", principal, None, info,
                       {"count": min(len(items), limit)})
        more = len(items) > limit
        items = items[:limit]
        return SchedulePage(items=items, next_cursor=items[-1].id if more else None)

    async def pause_schedule(self, schedule_id: str, *, api_key: str | None,
                             client: str | None = None, request_id: str | None = None
                             ) -> Schedule:
        """Stop firing; due times that pass while paused are never owed."""
        return await self._change("schedules.pause", schedule_id, api_key, client,
                                  request_id)

    async def resume_schedule(self, schedule_id: str, *, api_key: str | None,
                              client: str | None = None, request_id: str | None = None
                              ) -> Schedule:
        """Fire again, from the next due time after now (a running one is left as is)."""
        return await self._change("schedules.resume", schedule_id, api_key, client,
                                  request_id)

    async def remove_schedule(self, schedule_id: str, *, api_key: str | None,
                              client: str | None = None, request_id: str | None = None
                              ) -> Schedule:
        """Delete the schedule (robots it fired stay); returns it as it was."""
        return await self._change("schedules.remove", schedule_id, api_key, client,
                                  request_id)

    async def _change(self, action: str, schedule_id: str, api_key: str | None,
                      client: str | None, request_id: str | None) -> Schedule:
        info = RequestInfo(client=client, request_id=request_id or new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:write")
            schedule = await self._visible_schedule(schedule_id, principal)
            changed = await change_schedule(self.driver, action, schedule)
            if changed is None:
                raise NotFoundError(f"no schedule {schedule_id[:64]!r}")
        except RobotFrameworkError as exc:
            self.security.audit_refusal(action, principal, schedule_id, info, exc)
            raise
        self._audit_ok(action, "ok", principal, schedule_id, info)
        self.scheduler.wake()
        return changed

    async def _visible_schedule(self, schedule_id: str, principal: Principal) -> Schedule:
        if not isinstance(schedule_id, str) or not 0 < len(schedule_id) <= 64:
            raise NotFoundError("no such schedule")
        schedule: Schedule | None = await self.driver.get_schedule(schedule_id)
        if schedule is None or (schedule.tenant != principal.tenant and not principal.is_admin):
            # Another tenant's schedule looks exactly like a missing one.
            raise NotFoundError(f"no schedule {schedule_id[:64]!r}")
        return schedule

    def _audit_ok(self, action: str, outcome: str, principal: Principal, target: str | None,
                  info: RequestInfo, details: dict[str, Any] | None = None) -> None:
        self.audit.record(action=action, outcome=outcome, principal=principal.id,
                          target=target, client=info.client, request_id=info.request_id,
                          details=details)


async def change_schedule(driver: Any, action: str, schedule: Schedule) -> Schedule | None:
    """``schedules.pause``, ``.resume`` or ``.remove`` on the store; None if it is gone."""
    now = utcnow()
    changed: Schedule | None = schedule
    if action == "schedules.pause":
        changed = await driver.pause_schedule(schedule.id, now)
    elif action == "schedules.resume" and schedule.paused:
        start = now.replace(microsecond=0)
        changed = await driver.resume_schedule(
            schedule.id, start,
            next_due_time(schedule.cron, parse_timezone(schedule.timezone), start))
        if changed is None:  # resumed by someone else meanwhile
            changed = await driver.get_schedule(schedule.id)
    elif action == "schedules.remove" and not await driver.delete_schedule(schedule.id):
        changed = None
    return changed


def _parse_policy(value: object) -> MisfirePolicy:
    try:
        return MisfirePolicy(str(value) if isinstance(value, str) else "")
    except ValueError:
        allowed = ", ".join(p.value for p in MisfirePolicy)
        raise ValidationError(f"misfire_policy must be one of: {allowed}",
                              path="$.misfire_policy") from None
