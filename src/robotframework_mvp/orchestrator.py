"""Orchestrator: the request flow, and the owner of everything that runs.

``async with Orchestrator(settings) as orch`` builds the plugin manager, opens the store
and cache, registers modules, and starts the worker and background loops in one task
group; leaving the block stops them (running robots get a grace period) and closes
everything. Every public call runs the seven steps of the request flow: security
validation, module selection, robot creation, then (in a worker) execution start,
module processing and completion; the response is the robot.
"""

from __future__ import annotations

import builtins
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Self

import anyio
import attrs
import pluggy
from anyio import AsyncContextManagerMixin

from .balancing import LoadBalancer, ModuleStats
from .cache.manager import CacheManager
from .chains import followup_for, render_payload
from .circuits import ModuleCircuits
from .config import Settings
from .errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RobotFrameworkError,
    ValidationError,
)
from .loop_lag import LoopLagMonitor
from .models import (
    AuditEvent,
    ErrorInfo,
    Execution,
    FollowUp,
    ModuleRecord,
    Principal,
    Robot,
    RobotStatus,
    new_id,
    utcnow,
)
from .modules import Module
from .performance import PerformanceTracker
from .plugins import build_plugin_manager, call_observers, collect_modules
from .remote_ends import RemoteEnds
from .resilience import CircuitBreaker
from .scheduling import ScheduleApi, SchedulePage, Scheduler
from .security.audit import AuditLog
from .security.validator import (
    RequestInfo,
    SanitizedRequest,
    SecurityValidator,
    SubmitRequest,
)
from .state.driver import Claim
from .state.manager import StateManager
from .worker import Worker

__all__ = ["Orchestrator", "Page", "SchedulePage"]

log = logging.getLogger(__name__)


@attrs.frozen
class Page:
    """One page of ``list``: ``next_cursor`` is None on the last page."""

    items: list[Robot]
    next_cursor: str | None


#: a wait for a robot run elsewhere reads the store after the first of these (seconds),
#: then at doubling intervals up to the second: the fallback for announcements not heard
_WAIT_POLL = (0.05, 0.5)


class _Waiter:
    """Callers waiting for one robot: woken with the finished robot itself."""

    __slots__ = ("event", "robot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.robot: Robot | None = None


class Orchestrator(ScheduleApi, AsyncContextManagerMixin):
    """Runs robots. Use as ``async with Orchestrator(settings) as orch: ...``."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        modules: Iterable[Module] = (),
        plugins: Iterable[object] = (),
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self._extra_modules = tuple(modules)
        self._extra_plugins = tuple(plugins)
        self.tracker = PerformanceTracker(window_size=self.settings.performance.window_size)
        #: how late this process's event loop runs what is due (``rfmvp_event_loop_lag_*``)
        self.loop_lag = LoopLagMonitor(self.settings.background.loop_lag_interval)
        self._waiters: dict[str, _Waiter] = {}
        #: how waits that waited were answered: ``here`` (the robot ended in this process),
        #: ``heard`` (another process announced its end), ``polled`` (a read of the store
        #: found it ended) or ``timed_out`` (for /metrics)
        self.wait_answers: Counter[str] = Counter()
        self._modules_reload: anyio.Event | None = None  # set when the reload under way ends
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        if self._started:
            raise RuntimeError("an Orchestrator can be entered once; create a new one")
        self._started = True
        settings = self.settings
        self.pm: pluggy.PluginManager = build_plugin_manager(settings, self._extra_plugins)
        self.modules: dict[str, Module] = collect_modules(self.pm, settings, self._extra_modules)
        self.module_stats = {name: ModuleStats() for name in self.modules}
        driver = self.pm.hook.storage_driver(url=settings.storage.url, settings=settings)
        if driver is None:
            raise ConfigError(
                f"RFMVP_STORAGE_URL: no storage driver handles the scheme of "
                f"{_scheme(settings.storage.url)!r}; use sqlite:/// or postgresql://"
            )
        backend = self.pm.hook.cache_backend(url=settings.cache.url, settings=settings)
        if backend is None:
            raise ConfigError(
                f"RFMVP_CACHE_URL: no cache backend handles the scheme of "
                f"{_scheme(settings.cache.url)!r}; use memory:// or redis://"
            )
        self.driver = driver
        self.cache = CacheManager(backend, settings.cache)
        self.state = StateManager(driver, self.cache, self.tracker)
        self.circuits = ModuleCircuits(settings.resilience, self.modules, self.module_stats,
                                       self.cache, refresh_seconds=settings.cache.ttl_module_choice)
        self.balancer = LoadBalancer(
            self.modules, self.module_stats, self.tracker,
            lambda kind, candidates: self.pm.hook.select_module(kind=kind, candidates=candidates),
            refresh_seconds=settings.cache.ttl_module_choice,
            # Every live process rewrites its module records at each health or score run.
            stale_after=3 * min(settings.background.health_interval,
                                settings.background.scores_interval) + 60,
            min_share=settings.performance.balancer_min_share,
            circuit_state=self.circuits.state,
        )
        self.circuits.balancer = self.balancer
        self.circuits.state_manager = self.state
        self.circuits.on_transition(self.balancer.invalidate)
        await driver.open()
        try:
            await backend.open()
            try:
                if settings.storage.migrate_on_startup:
                    await driver.migrate()
                self.audit = AuditLog(driver, settings.security.audit_flush_interval,
                                      self._audit_written)
                self.security = SecurityValidator(self, self.audit)
                await self._register_modules()
                self.worker = Worker(
                    settings=settings, state=self.state, modules=self.modules,
                    stats=self.module_stats, tracker=self.tracker,
                    on_progress=self._robot_progressed, on_finished=self._robot_finished,
                    make_followup=self._followup_robot, circuits=self.circuits,
                )
                # A circuit that closes (or turns half-open) has robots to claim at once.
                self.circuits.on_transition(self.worker.wake)
                self.scheduler = Scheduler(self)
                # Collected before the task group, so a ConfigError fails startup as is
                # (not wrapped in an ExceptionGroup); the tasks start after the worker.
                plugin_tasks = [
                    task for contributed in self.pm.hook.background_tasks(orchestrator=self)
                    for task in contributed or ()]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.audit.run)
                    tg.start_soon(self.loop_lag.run)
                    tg.start_soon(self.cache.run_writer)
                    self.remote_ends = RemoteEnds(self.cache, self._wake_waiters)
                    await tg.start(self.remote_ends.run)
                    tg.start_soon(self.security.run)
                    from .background import BackgroundLoops

                    self.background = BackgroundLoops(self)
                    await tg.start(self.background.run)
                    await self._call_observers("on_startup", orchestrator=self)
                    worker_scope = anyio.CancelScope()
                    self._worker_stopped = anyio.Event()
                    self._worker_stopped.set()
                    if settings.worker.enabled and self.modules:
                        await tg.start(self._run_worker, worker_scope)
                        # Drivers that can push (PostgreSQL LISTEN/NOTIFY) wake idle workers
                        # the moment another process queues a robot, instead of at a poll.
                        listen = getattr(driver, "listen", None)
                        if listen is not None:
                            await tg.start(partial(
                                listen, partial(self.worker.wake, check_due=True),
                                ignore_own=True))
                    if settings.background.scheduler_enabled:
                        await tg.start(self.scheduler.run)
                    plugin_scope = anyio.CancelScope()
                    self._plugin_tasks_stopped = anyio.Event()
                    await tg.start(self._run_plugin_tasks, plugin_tasks, plugin_scope)
                    try:
                        yield self
                    finally:
                        with anyio.CancelScope(shield=True):
                            # Plugin tasks (mail watchers ...) stop first: no new work
                            # arrives while the worker drains.
                            plugin_scope.cancel()
                            await self._plugin_tasks_stopped.wait()
                            worker_scope.cancel()
                            await self._worker_stopped.wait()
                            await self._call_observers("on_shutdown", orchestrator=self)
                        tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await backend.close()
        finally:
            with anyio.CancelScope(shield=True):
                await driver.close()

    async def _run_worker(
        self, scope: anyio.CancelScope,
        *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self._worker_stopped = anyio.Event()
        try:
            with scope:
                await self.worker.run(task_status=task_status)
        finally:
            self._worker_stopped.set()

    async def _run_plugin_tasks(
        self, tasks: Sequence[Callable[[], Awaitable[None]]], scope: anyio.CancelScope,
        *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the ``background_tasks`` callables until ``scope`` is cancelled."""
        try:
            with scope:
                async with anyio.create_task_group() as plugin_tg:
                    for task in tasks:
                        plugin_tg.start_soon(_supervised, task)
                    task_status.started()
        finally:
            self._plugin_tasks_stopped.set()

    async def _register_modules(self) -> None:
        records = [
            ModuleRecord(name=m.name, kinds=m.kinds, capacity=m.capacity,
                         max_attempts=m.max_attempts)
            for m in self.modules.values()
        ]
        if records:
            await self.state.upsert_modules(records)
        await self.refresh_modules(fresh=True)

    async def refresh_modules(self, *, fresh: bool = False) -> None:
        """Reload other processes' module records into the LoadBalancer.

        One reload at a time: callers that come while one is under way wait for it. When
        the records turn stale every request in flight asks for a reload, and each one
        going to the store queued dozens of reads and stalled them all.

        ``fresh``: the caller needs a read that begins after its call (it just wrote
        module records, or looks for a kind not known yet); the reload under way may have
        read before that. It waits for that one, then shares the next with everyone else
        who came meanwhile: still one read at a time.
        """
        if (under_way := self._modules_reload) is not None:
            await under_way.wait()
            if not fresh:
                return
            if (next_one := self._modules_reload) is not None:  # began after this call
                await next_one.wait()
                return
        self._modules_reload = reload = anyio.Event()
        try:
            self.balancer.set_remote_records(await self.state.list_modules())
        finally:
            self._modules_reload = None
            reload.set()

    # -- observers ---------------------------------------------------------------------

    async def _call_observers(self, hook_name: str, **kwargs: Any) -> None:
        await call_observers(getattr(self.pm.hook, hook_name), **kwargs)

    async def _audit_written(self, events: Sequence[AuditEvent]) -> None:
        if self.pm.hook.on_audit_event.get_hookimpls():
            for event in events:
                await self._call_observers("on_audit_event", event=event)

    async def _robot_progressed(self, robot: Robot) -> None:
        await self._call_observers("on_robot_progress", robot=robot)

    async def _robot_finished(self, robot: Robot) -> None:
        waiter = self._waiters.pop(robot.id, None)
        if waiter is not None:
            waiter.robot = robot
            waiter.event.set()
        await self._call_observers("on_robot_finished", robot=robot)

    # -- the public API ----------------------------------------------------------------

    async def submit(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        api_key: str | None,
        priority: int = 0,
        idempotency_key: str | None = None,
        client: str | None = None,
        request_id: str | None = None,
        run_at: datetime | None = None,
        delay: float | None = None,
        on_success: Mapping[str, Any] | FollowUp | None = None,
        on_failure: Mapping[str, Any] | FollowUp | None = None,
        connection: Any = None,
    ) -> Robot:
        """Create a robot; it is queued for a worker at once. Returns the stored robot.

        ``run_at`` (an aware datetime) or ``delay`` (seconds), not both, hold it back
        until then. ``on_success`` / ``on_failure`` (``{"kind", "payload"}``) create a
        follow-up when it ends. ``connection`` (a psycopg ``AsyncConnection``, PostgreSQL
        only) writes it inside the caller's open transaction: see docs/scheduling.md.
        """
        request = SubmitRequest(kind=kind, payload=payload, priority=priority,
                                idempotency_key=idempotency_key, delay=delay, run_at=run_at,
                                on_success=on_success, on_failure=on_failure)
        return (await self.submit_many([request], api_key=api_key, client=client,
                                       request_id=request_id, connection=connection))[0]

    async def submit_many(
        self,
        requests: Sequence[SubmitRequest],
        *,
        api_key: str | None,
        client: str | None = None,
        request_id: str | None = None,
        connection: Any = None,
    ) -> list[Robot]:
        """Create many robots in one write: authenticated once, each sanitized and audited.

        With ``connection`` (PostgreSQL only), the write happens inside the caller's open
        transaction and commits (or not) with it; see ``submit``.
        """
        info = RequestInfo(client=client, request_id=request_id or new_id())
        action = "robots.submit" if len(requests) == 1 else "robots.submit_many"
        principal: Principal | None = None
        try:
            in_transaction = getattr(self.driver, "create_robots_in_transaction", None)
            if connection is not None and in_transaction is None:
                raise ValidationError(
                    "connection= (transactional submission) needs the PostgreSQL storage "
                    f"driver; this orchestrator uses {self.driver.name!r}",
                    path="$.connection")
            principal, sanitized = await self.security.validate_submission(
                api_key, info, requests)
            await self.circuits.refresh_shared()  # other processes' open circuits
            robots = [self._new_robot(item, principal) for item in sanitized]
            claim = None
            if connection is None and len(robots) == 1:
                claim = await self._create_claimed(robots[0])
            if claim is not None:
                # Created queued and claimed in the same write: the caller and the hooks
                # see it as created; the worker's claim follows (cache: running).
                created = [(robots[0], True)]
            elif connection is not None and in_transaction is not None:
                # Not cached and no hook: the robot exists only if the caller commits.
                with self.tracker.measure("state.create_robot"):
                    created = await in_transaction(connection, robots)
            else:
                created = await self.state.create_robots(robots)
        except RobotFrameworkError as exc:
            self.security.audit_refusal(action, principal, None, info, exc)
            raise
        for robot, is_new in created:
            outcome = ("existing" if not is_new else "created_in_transaction"
                       if connection is not None else "created")
            self.audit.record(action="robots.submit", outcome=outcome,
                              principal=principal.id, target=robot.id, client=info.client,
                              request_id=info.request_id, details={"kind": robot.kind})
            if is_new and connection is None:
                await self._call_observers("on_robot_created", robot=robot)
        if claim is not None:
            await self.worker.start_reserved(claim)
        elif connection is None:
            new = [robot for robot, is_new in created if is_new]
            if new:
                later = [r.scheduled_at for r in new if r.scheduled_at > utcnow()]
                if later:
                    self.worker.note_due(min(later))
                if len(later) < len(new):
                    self.worker.wake()
        return [robot for robot, _ in created]

    async def _create_claimed(self, robot: Robot) -> Claim | None:
        """Create ``robot`` already claimed when this process's worker can start it now.

        One write instead of two (create, then claim), and no wake-up in between: the
        path of a robot submitted to an idle worker. None: create it queued as usual.
        """
        module = robot.module
        if (module is None or robot.idempotency_key is not None
                or robot.scheduled_at > utcnow() or not self.state.can_create_and_claim
                or not self.worker.reserve(module)):
            return None
        try:
            claim = await self.state.create_and_claim(
                robot, self.worker.id, self.settings.worker.lease_seconds)
        except BaseException:
            self.worker.unreserve(module)
            raise
        if claim is None:  # its id exists: a retried write; the usual path finds it
            self.worker.unreserve(module)
        return claim

    def _new_robot(self, item: SanitizedRequest, principal: Principal) -> Robot:
        """Step 2 (module selection) and the robot row that step 3 writes."""
        return self.build_robot(
            item.kind, item.payload, owner=principal.id, tenant=principal.tenant,
            priority=item.priority, scheduled_at=item.run_at,
            idempotency_key=item.idempotency_key, on_success=item.on_success,
            on_failure=item.on_failure,
        )

    def build_robot(self, kind: str, payload: Mapping[str, Any], *, owner: str, tenant: str,
                    priority: int = 0, scheduled_at: datetime | None = None,
                    **fields: Any) -> Robot:
        """A new queued robot of ``kind`` with its module chosen (step 2), not stored yet.

        ``scheduled_at`` in the past (or None) means now.
        """
        module_name = self.balancer.select(kind)
        module = self.modules.get(module_name)
        max_attempts = (module.max_attempts if module is not None
                        else self.balancer.max_attempts(module_name)
                        ) or self.settings.resilience.default_max_attempts
        now = utcnow()
        return Robot(
            id=new_id(), kind=kind, payload=dict(payload), owner=owner, tenant=tenant,
            status=RobotStatus.QUEUED, module=module_name, max_attempts=max_attempts,
            priority=priority, created_at=now, updated_at=now,
            scheduled_at=now if scheduled_at is None else max(now, scheduled_at), **fields,
        )

    def _followup_robot(self, parent: Robot, status: RobotStatus,
                        result: dict[str, Any] | None, error: ErrorInfo | None) -> Robot | None:
        """The chain child that ``parent`` ending as ``status`` creates, or None."""
        found = followup_for(parent, status)
        if found is None:
            return None
        trigger, followup = found
        payload = render_payload(followup.payload, parent.id, result, error)
        return self.build_robot(followup.kind, payload, owner=parent.owner,
                                tenant=parent.tenant, priority=parent.priority,
                                parent_id=parent.id, parent_trigger=trigger)

    async def get(self, robot_id: str, *, api_key: str | None, client: str | None = None,
                  request_id: str | None = None) -> Robot:
        """The robot (from the cache when it has it). Another tenant's robot is not found."""
        info = RequestInfo(client=client, request_id=request_id or new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:read")
            robot = await self._visible_robot(robot_id, principal)
        except RobotFrameworkError as exc:
            self.security.audit_refusal("robots.get", principal, robot_id, info, exc)
            raise
        self.audit.record(action="robots.get", outcome="ok", principal=principal.id,
                          target=robot_id, client=info.client, request_id=info.request_id)
        return robot

    async def list(
        self,
        *,
        api_key: str | None,
        status: RobotStatus | str | None = None,
        kind: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        client: str | None = None,
        request_id: str | None = None,
        order: str = "newest",
    ) -> Page:
        """The caller's robots, ``limit`` (1-500) at a time: newest first, or with
        ``order="due"`` earliest ``scheduled_at`` first (delayed robots by due time)."""
        info = RequestInfo(client=client, request_id=request_id or new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:read")
            status_value = _parse_status(status)
            if not 1 <= limit <= 500:
                raise ValidationError("limit must be between 1 and 500", path="$.limit")
            if order not in ("newest", "due"):
                raise ValidationError("order must be newest or due", path="$.order")
            if cursor is not None and (len(cursor) > 64 or not cursor.isprintable()):
                raise ValidationError("cursor is not one this server handed out",
                                      path="$.cursor")
            tenant = None if principal.is_admin else principal.tenant
            if order == "due":
                items = await self.state.driver.list_robots_by_due(
                    tenant=tenant, status=status_value, kind=kind, limit=limit + 1,
                    after=None if cursor is None else _parse_due_cursor(cursor))
            else:
                items = await self.state.list_robots(
                    tenant=tenant, status=status_value, kind=kind, limit=limit + 1,
                    before_id=cursor,
                )
        except RobotFrameworkError as exc:
            self.security.audit_refusal("robots.list", principal, None, info, exc)
            raise
        self.audit.record(action="robots.list", outcome="ok", principal=principal.id,
                          target=None, client=info.client, request_id=info.request_id,
                          details={"count": min(len(items), limit)})
        more = len(items) > limit
        items = items[:limit]
        if not more:
            return Page(items=items, next_cursor=None)
        last = items[-1]
        return Page(items=items, next_cursor=_due_cursor(last) if order == "due" else last.id)

    async def cancel(self, robot_id: str, *, api_key: str | None, client: str | None = None,
                     request_id: str | None = None) -> Robot:
        """Cancel a queued or running robot; ConflictError (409) if it already ended."""
        info = RequestInfo(client=client, request_id=request_id or new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:write")
            robot = await self._visible_robot(robot_id, principal, fresh=True)
            if robot.is_terminal:
                raise ConflictError(f"robot {robot_id} already ended as {robot.status}",
                                    status=str(robot.status))
            cancelled = await self.state.cancel(robot_id)
            if cancelled is None:
                current = await self.state.get_robot(robot_id, fresh=True)
                ended = current.status if current else "gone"
                raise ConflictError(f"robot {robot_id} already ended as {ended}",
                                    status=str(ended))
        except RobotFrameworkError as exc:
            self.security.audit_refusal("robots.cancel", principal, robot_id, info, exc)
            raise
        self.worker.cancel_local(robot_id)
        self.audit.record(action="robots.cancel", outcome="cancelled", principal=principal.id,
                          target=robot_id, client=info.client, request_id=info.request_id)
        await self._robot_finished(cancelled)
        return cancelled

    async def wait(self, robot_id: str, *, api_key: str | None, timeout: float,
                   client: str | None = None) -> Robot:
        """Block until the robot ends or ``timeout`` seconds pass; return it either way."""
        robot = await self.get(robot_id, api_key=api_key, client=client)
        return await self._wait_until_terminal(robot, timeout)

    async def process_robot(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        api_key: str | None,
        timeout: float = 60.0,
        priority: int = 0,
        idempotency_key: str | None = None,
        client: str | None = None,
    ) -> Robot:
        """Submit, then wait up to ``timeout`` seconds for the robot to end."""
        robot = await self.submit(kind, payload, api_key=api_key, priority=priority,
                                  idempotency_key=idempotency_key, client=client)
        return await self._wait_until_terminal(robot, timeout)

    async def retry(self, robot_id: str, *, api_key: str | None, extra_attempts: int = 1,
                    client: str | None = None) -> Robot:
        """Requeue a failed or timed-out robot with ``extra_attempts`` more attempts."""
        info = RequestInfo(client=client, request_id=new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:write")
            robot = await self._visible_robot(robot_id, principal, fresh=True)
            if robot.status not in (RobotStatus.FAILED, RobotStatus.TIMED_OUT):
                raise ConflictError(f"only failed or timed-out robots can be retried; "
                                    f"robot {robot_id} is {robot.status}")
            requeued = await self.state.requeue(robot_id, extra_attempts)
            if requeued is None:
                raise ConflictError(f"robot {robot_id} changed while retrying; look again")
        except RobotFrameworkError as exc:
            self.security.audit_refusal("robots.retry", principal, robot_id, info, exc)
            raise
        self.audit.record(action="robots.retry", outcome="queued", principal=principal.id,
                          target=robot_id, client=info.client, request_id=info.request_id)
        self.worker.wake()
        return requeued

    async def executions(self, robot_id: str, *, api_key: str | None,
                         client: str | None = None) -> builtins.list[Execution]:
        """Every attempt of a robot (for operators and tests)."""
        info = RequestInfo(client=client, request_id=new_id())
        principal: Principal | None = None
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:read")
            await self._visible_robot(robot_id, principal, fresh=True)
        except RobotFrameworkError as exc:
            self.security.audit_refusal("robots.executions", principal, robot_id, info, exc)
            raise
        self.audit.record(action="robots.executions", outcome="ok", principal=principal.id,
                          target=robot_id, client=info.client, request_id=info.request_id)
        return await self.state.list_executions(robot_id)

    async def module_table(self, *, api_key: str | None, client: str | None = None
                           ) -> builtins.list[dict[str, Any]]:
        """Modules with health, score, circuit state and load (``GET /modules``)."""
        info = RequestInfo(client=client, request_id=new_id())
        try:
            principal = await self.security.authorize(api_key, info, scope="robots:read")
        except RobotFrameworkError as exc:
            self.security.audit_refusal("modules.list", None, None, info, exc)
            raise
        self.audit.record(action="modules.list", outcome="ok", principal=principal.id,
                          target=None, client=info.client, request_id=info.request_id)
        if self.balancer.remote_stale:
            await self.refresh_modules()
        await self.circuits.refresh_shared()
        self.circuits.sync()
        rows: dict[str, dict[str, Any]] = {}
        for kind in sorted(self.balancer.known_kinds()):
            for c in self.balancer.candidates(kind):
                row = rows.setdefault(c.name, {
                    "name": c.name, "kinds": [], "health": c.health, "score": c.score,
                    "circuit_state": c.circuit_state, "load": c.load, "capacity": c.capacity,
                    "success_rate": c.success_rate, "latency_ewma_ms": c.latency_ewma_ms,
                    "local": c.name in self.modules,
                })
                row["kinds"].append(kind)
        return [rows[name] for name in sorted(rows)]

    async def health(self) -> dict[str, Any]:
        """Each component's status and latency, with the circuit breakers; ``status`` is
        ok, degraded or down (down only when the store cannot be reached)."""
        components: dict[str, dict[str, Any]] = {}
        for name, ping in (("store", self.driver.ping), ("cache", self.cache.backend.ping)):
            started = time.perf_counter()
            try:
                with anyio.fail_after(2.0):
                    await ping()
                status = "ok"
            except Exception as exc:
                status = "down" if name == "store" else "degraded"
                log.warning("health: %s unreachable (%s)", name, type(exc).__name__)
            if name == "cache" and status == "ok" and self.cache.status != "ok":
                status = "degraded"
            components[name] = {"status": status, "backend": (self.driver.name if name == "store"
                                                              else self.cache.backend.name),
                                "latency_ms": round((time.perf_counter() - started) * 1000, 3)}
        self._health_breakers(components)
        components["rate_limiter"] = self.security.limiter.health()
        components["worker"] = {
            "status": "ok", "enabled": self.settings.worker.enabled and bool(self.modules),
            "running": len(self.worker.running), "concurrency": self.worker.concurrency,
        }
        background = getattr(self, "background", None)
        components["modules"] = {
            "status": "ok",
            "known": bool(self.balancer.known_kinds()),
            "health": {name: st.health for name, st in sorted(self.module_stats.items())},
            "checks": dict(sorted(getattr(background, "health_checks", {}).items())),
        }
        if background is not None:
            # Informational: neither makes the instance degraded.
            components["leader"] = {"status": "ok", "leader": background.leader.is_leader,
                                    "backend": background.leader.backend}
            components["alerts"] = {"status": "ok",
                                    "active": [a.key for a in background.alerts.active()]}
        overall = "ok"
        if any(c["status"] == "degraded" for c in components.values()):
            overall = "degraded"
        if components["store"]["status"] == "down":
            overall = "down"
        return {"status": overall, "components": components}

    def _health_breakers(self, components: dict[str, dict[str, Any]]) -> None:
        """The store's and cache's breakers, and every module circuit, into ``health()``."""
        store = components["store"]
        availability = getattr(self.driver, "availability", None)
        if availability is not None:
            store["circuit"] = availability.snapshot()
        read_breaker = getattr(self.driver, "read_breaker", None)
        if read_breaker is not None and self.settings.storage.read_url:
            read_state = read_breaker.state.value
            store["read_pool"] = {
                "state": read_state,
                "reads_from": "read pool" if read_state == "closed" else "write pool",
                "fallbacks": getattr(self.driver, "read_fallbacks", 0),
            }
            if read_state != "closed" and store["status"] == "ok":
                store["status"] = "degraded"
        breaker = self.cache.breaker
        components["cache"]["circuit"] = {"state": breaker.state.value,
                                          "retry_after": round(breaker.retry_after(), 3)}
        self.circuits.sync()
        circuits = self.circuits.snapshot()
        opened = sorted(name for name, row in circuits.items() if row["state"] == "open")
        components["circuits"] = {"status": "degraded" if opened else "ok", "open": opened,
                                  "modules": circuits,
                                  "shared": self.circuits.shared_backend}

    def breakers(self) -> builtins.list[CircuitBreaker]:
        """Every circuit breaker of this process: modules, store, cache (for /metrics)."""
        found = list(self.circuits.breakers.values())
        availability = getattr(self.driver, "availability", None)
        if availability is not None:
            found.append(availability.breaker)
        read_breaker = getattr(self.driver, "read_breaker", None)
        if read_breaker is not None and self.settings.storage.read_url:
            found.append(read_breaker)
        found.append(self.cache.breaker)
        return found

    # -- helpers -----------------------------------------------------------------------

    async def _visible_robot(self, robot_id: str, principal: Principal, *,
                             fresh: bool = False) -> Robot:
        if not isinstance(robot_id, str) or not 0 < len(robot_id) <= 64:
            raise NotFoundError("no such robot")
        robot = await self.state.get_robot(robot_id, fresh=fresh)
        if robot is None or (robot.tenant != principal.tenant and not principal.is_admin):
            # Another tenant's robot looks exactly like a missing one.
            raise NotFoundError(f"no robot {robot_id[:64]!r}")
        return robot

    async def _wait_until_terminal(self, robot: Robot, timeout: float) -> Robot:
        if robot.is_terminal or timeout <= 0:
            return robot
        # A robot finished by this process hands itself to the waiter at once (no read).
        # One finished by another process wakes the waiter through an announcement on
        # the shared cache (remote_ends), and the waiter reads it from the store; the
        # store is also polled, backing off, in case an announcement never comes.
        waiter = self._waiters.get(robot.id)
        if waiter is None:
            waiter = self._waiters[robot.id] = _Waiter()
        if robot.id not in self.worker.running:  # not run here, at least not yet
            self.remote_ends.want()
            if self.remote_ends.ended_recently(robot.id):
                waiter.event.set()
        poll, longest_poll = _WAIT_POLL
        with anyio.move_on_after(timeout):
            while True:
                with anyio.move_on_after(poll):
                    await waiter.event.wait()
                if waiter.robot is not None:
                    self.wait_answers["here"] += 1
                    return waiter.robot
                woken = waiter.event.is_set()
                current = await self.state.get_robot(robot.id, fresh=True)
                if current is not None:
                    robot = current
                if waiter.robot is not None:  # ended here while the store was read
                    self.wait_answers["here"] += 1
                    return waiter.robot
                if robot.is_terminal:
                    # Ended in another process: nothing here will pop its waiter.
                    self._waiters.pop(robot.id, None)
                    self.wait_answers["heard" if woken else "polled"] += 1
                    return robot
                if woken:  # woken, yet not ended (a subscription made anew): wait again
                    waiter.event = anyio.Event()
                else:
                    poll = min(poll * 2, longest_poll)
        self._waiters.pop(robot.id, None)
        self.wait_answers["timed_out"] += 1
        return robot

    @property
    def waits_open(self) -> int:
        """Robots that waits in this process are waiting for."""
        return len(self._waiters)

    def _wake_waiters(self, robot_ids: Iterable[str] | None) -> None:
        """Wake the waits for ``robot_ids`` (all of them for None): each reads its robot."""
        waiters = self._waiters
        if robot_ids is None:
            for waiter in waiters.values():
                waiter.event.set()
            return
        for robot_id in robot_ids:
            if (found := waiters.get(robot_id)) is not None:
                found.event.set()

    def require_admin(self, principal: Principal) -> None:
        if not principal.is_admin:
            raise PermissionDeniedError("this needs the admin scope")


async def _supervised(task: Callable[[], Awaitable[None]]) -> None:
    """A plugin's background task; one that fails is logged, never fatal to the others."""
    try:
        await task()
    except Exception:
        log.exception("background task %s of a plugin failed; it is not restarted",
                      getattr(task, "__qualname__", repr(task)))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _due_cursor(robot: Robot) -> str:
    """``<scheduled_at in microseconds since the epoch>_<id>``: where a due page ends."""
    micros = (robot.scheduled_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{robot.id}"


def _parse_due_cursor(cursor: str) -> tuple[datetime, str]:
    micros, sep, robot_id = cursor.partition("_")
    if not sep or not (micros.isascii() and micros.isdigit()) or not robot_id \
            or len(micros) > 18:
        raise ValidationError("cursor is not one this server handed out (for order=due)",
                              path="$.cursor")
    return _EPOCH + timedelta(microseconds=int(micros)), robot_id


def _scheme(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else url


def _parse_status(status: RobotStatus | str | None) -> RobotStatus | None:
    if status is None or status == "":
        return None
    try:
        return RobotStatus(status)
    except ValueError:
        allowed = ", ".join(s.value for s in RobotStatus)
        raise ValidationError(f"status must be one of: {allowed}", path="$.status") from None
