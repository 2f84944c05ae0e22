"""Worker: claims robots, runs their modules under leases, and records how each ended.

One Worker per orchestrator runs up to ``concurrency`` robots at once, never more than a
module's ``capacity``. A claimed robot's lease is renewed by one heartbeat task for all
running robots; if a renewal finds the lease gone (the robot was cancelled, or another
worker took it over after this one froze), the robot's task is cancelled and nothing it
produced is written. On shutdown the worker stops claiming, lets running robots finish
within the grace period, and hands the rest back to the queue without charging an
attempt.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import attrs
from anyio.abc import TaskGroup

from .balancing import ModuleStats
from .config import Settings
from .errors import PermanentError, ServiceUnavailableError
from .models import ErrorInfo, ExecutionStatus, Robot, RobotStatus, utcnow
from .modules import Module, ModuleContext
from .performance import PerformanceTracker
from .resilience import backoff_delay
from .state.driver import Claim, Completion
from .state.manager import StateManager

if TYPE_CHECKING:
    from .circuits import ModuleCircuits

__all__ = ["Worker"]

#: robots claimed ahead per module, as a multiple of ``concurrency`` (quick modules only):
#: the next claim goes out when half are left, and must come back before they run out
#: (with 6, a PostgreSQL worker's loop sat idle 13% of the time waiting for it)
_AHEAD_FACTOR = 12
#: a module is quick when the p95 of its recent attempts here is at most this
_QUICK_MODULE_MS = 5.0
#: ... over at least this many attempts
_AHEAD_MIN_SAMPLES = 20

log = logging.getLogger(__name__)


#: builds a chain's follow-up robot for (parent, its end status, result, error), or None
FollowupFactory = Callable[
    [Robot, RobotStatus, "dict[str, object] | None", "ErrorInfo | None"], "Robot | None"]


@attrs.define(eq=False)
class _Running:
    claim: Claim
    #: the robot's scope (its timeout; what stops it), made when it starts: None while it
    #: waits, claimed ahead, for a slot (most robots under load; nothing runs to stop)
    scope: anyio.CancelScope | None
    lease_lost: bool = False
    cancelled: bool = False
    #: the module breaker's ticket for this attempt (circuits.py), None when not counted
    ticket: int | None = None
    #: the module has returned and its completion is being written: a lease the heartbeat
    #: finds gone now was most likely released by that very write
    completing: bool = False
    #: the robot holds one of the worker's ``concurrency`` slots (and one of its module's
    #: ``capacity``): from its start until its module returns
    in_slot: bool = True
    #: claimed ahead of a free slot (a quick module's robot): waits here, leased, for one
    waiting: bool = False

    def stop(self) -> None:
        """Cancel the robot's scope, if it has started."""
        if self.scope is not None:
            self.scope.cancel()


#: the most characters of a module's error message or progress message that are stored
_MESSAGE_LIMIT = 2000
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    """``text`` as every store holds it: at most ``limit`` characters, and a NUL (which
    PostgreSQL refuses) or a lone surrogate (which is not UTF-8) replaced by U+FFFD.
    A module's message must not make the write of its robot's progress or end fail."""
    text = text[:limit]
    if text.isascii() and "\x00" not in text:
        return text
    return _LONE_SURROGATE.sub("\ufffd", text.replace("\x00", "\ufffd"))


def _error_info(exc: BaseException) -> ErrorInfo:
    message = str(exc) or type(exc).__name__
    return ErrorInfo(type=storable_text(type(exc).__name__), message=storable_text(message))


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        state: StateManager,
        modules: Mapping[str, Module],
        stats: Mapping[str, ModuleStats],
        tracker: PerformanceTracker,
        on_progress: Callable[[Robot], Awaitable[None]],
        on_finished: Callable[[Robot], Awaitable[None]],
        make_followup: FollowupFactory | None = None,
        circuits: ModuleCircuits | None = None,
    ) -> None:
        self.settings = settings
        self.circuits = circuits
        self.state = state
        self.modules = modules
        self.stats = stats
        self.tracker = tracker
        self.on_progress = on_progress
        self.on_finished = on_finished
        self.make_followup = make_followup
        self.id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.running: dict[str, _Running] = {}
        self._wake = anyio.Event()
        # The earliest future due time known here, and when the store was last asked: the
        # store is asked at most once a poll interval unless wake(check_due=True).
        self._next_due: datetime | None = None
        self._due_checked_at = float("-inf")
        self._stopping = False
        #: the task group robots run in, while the worker runs (None before and after)
        self._robots_tg: TaskGroup | None = None
        #: robots started and not yet picked up by a runner task, in start order
        self._starts: deque[tuple[Claim, anyio.CancelScope]] = deque()
        #: runner tasks waiting for a robot: each waits on its own event
        self._idle_runners: list[anyio.Event] = []
        self._idle = anyio.Event()
        #: robots whose module is running: what ``concurrency`` bounds
        self.executing = 0
        #: robots of quick modules claimed ahead of a free slot, by module, in claim order
        self._ahead: dict[str, deque[Claim]] = {name: deque() for name in modules}
        #: when a module's last claim ahead came back short (little was queued for it)
        self._ahead_dry: dict[str, float] = {}
        #: when ``reserve`` last took a slot for a robot created already claimed
        self._reserved_at = float("-inf")
        self.claimed = 0
        self.completed = 0

    @property
    def concurrency(self) -> int:
        return self.settings.worker.concurrency

    def _free_slots(self) -> int:
        """How many more robots to claim now.

        A slot frees when its module returns, while the completion is still being written,
        so the next claim overlaps that write (and a batch of completions under group
        commit does not split the next claim into pieces). Robots whose completion is in
        flight keep their leases (the heartbeat renews them); at most three times
        ``concurrency`` of them, so a store that takes writes slowly slows claiming too.
        """
        return min(self.concurrency - self.executing, self._held_limit - len(self.running))

    @property
    def _held_limit(self) -> int:
        """Most robots held under a lease at once: running, writing their completion (up
        to three times ``concurrency``) or claimed ahead (``_AHEAD_FACTOR`` times)."""
        return (4 + _AHEAD_FACTOR) * self.concurrency

    def _ahead_room(self, name: str) -> int:
        """How many robots of module ``name`` to claim beyond the free slots.

        Only for a module whose robots return within milliseconds (p95 over its recent
        attempts in this process): for those, a larger claim and a larger group commit
        cost less per robot than the few milliseconds a robot waits, leased, for a slot.
        A slow module's robots stay queued in the store for any worker to take.
        """
        stats = self.stats[name]
        p95 = stats.latency_p95_ms
        if stats.samples < _AHEAD_MIN_SAMPLES or p95 is None or p95 > _QUICK_MODULE_MS:
            return 0
        if time.monotonic() - self._reserved_at < 1.0:
            # This process is feeding its own worker (Orchestrator.submit): its robots
            # arrive claimed in the write that creates them, into the free slots that
            # robots claimed ahead would take.
            return 0
        return max(0, _AHEAD_FACTOR * self.concurrency - len(self._ahead[name]))

    def wake(self, *, check_due: bool = False) -> None:
        """New work may be due: stop sleeping and look.

        ``check_due``: robots may also have been queued for later by someone else (another
        process), so ask the store for the next due time before sleeping again.
        """
        if check_due:
            self._due_checked_at = float("-inf")
        self._wake.set()

    def note_due(self, at: datetime) -> None:
        """A robot this process queued becomes due at ``at``: wake up for it then."""
        if self._next_due is None or at < self._next_due:
            self._next_due = at
        self._wake.set()

    def cancel_local(self, robot_id: str) -> bool:
        """Cancel a robot running in this process now (its store row is already cancelled)."""
        running = self.running.get(robot_id)
        if running is None:
            return False
        running.cancelled = True
        if not running.completing:  # its outcome is being written: the store decides
            running.stop()
        if running.waiting:  # never started: nothing to stop, only to forget
            self._forget_waiting(robot_id)
        return True

    # -- main loop ---------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        async with anyio.create_task_group() as robots_tg, anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat_loop)
            self._robots_tg = robots_tg
            task_status.started()
            try:
                await self._dispatch_loop(robots_tg)
            finally:
                self._robots_tg = None
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self._drain(robots_tg)

    async def _dispatch_loop(self, robots_tg: TaskGroup) -> None:
        module_names = list(self.modules)
        start = 0
        circuits = self.circuits
        while True:
            self._wake = anyio.Event()
            full = False
            if circuits is not None:
                await circuits.refresh_shared()
            # Modules that could take a robot now: the sleep below waits only for those.
            ready: list[str] = []
            # Rotate the starting module so one busy module cannot starve the others.
            for i in range(len(module_names)):
                name = module_names[(start + i) % len(module_names)]
                permits = None
                if circuits is not None:
                    # Open circuit: its robots wait queued; half-open: a few trials only.
                    permits = circuits.permits(name)
                    if permits is not None:
                        if self._ahead[name]:  # claimed while closed: back to the queue
                            await self._release_waiting(list(self._ahead[name]))
                        if permits <= 0:
                            continue
                if self._ahead[name]:
                    self._start_ahead(name)  # robots claimed ahead take free slots first
                module_free = self.modules[name].capacity - self.stats[name].load
                if permits is not None:
                    module_free = min(module_free, permits)
                # A quick module (closed circuit) may also claim ahead of its free slots;
                # with none free, not again within a poll interval of a claim ahead that
                # found little queued (a wake-up per submitted robot must not cost a claim).
                ahead_room = 0 if permits is not None or (
                    module_free <= 0 and time.monotonic() - self._ahead_dry.get(name, -1e9)
                    < self.settings.worker.poll_interval) else self._ahead_room(name)
                if module_free <= 0 and ahead_room <= 0:
                    continue
                if module_free > 0:
                    ready.append(name)
                requested = max(0, min(self._free_slots(), module_free)
                                - len(self._ahead[name])) + ahead_room
                requested = min(requested, self._held_limit - len(self.running))
                if requested <= 0:
                    continue
                try:
                    claims = await self.state.claim(
                        name, requested, self.id, self.settings.worker.lease_seconds
                    )
                except Exception:
                    log.exception("claiming robots of module %r failed; will retry", name)
                    claims = []
                for claim in claims:
                    self._admit(claim)
                if ahead_room > 0:
                    if len(claims) < requested:
                        self._ahead_dry[name] = time.monotonic()
                    else:
                        self._ahead_dry.pop(name, None)
                full = full or len(claims) == requested
            start += 1
            if full and self._free_slots() > 0:
                continue  # a claim came back full: there may be more due work
            await self._sleep(ready)

    async def _sleep(self, ready: Sequence[str] | None = None) -> None:
        poll = self.settings.worker.poll_interval
        timeout = poll
        modules = list(self.modules) if ready is None else list(ready)
        if self._free_slots() > 0 and modules:
            now = time.monotonic()
            if now - self._due_checked_at >= poll:
                self._due_checked_at = now
                try:
                    self._next_due = await self.state.next_due_at(modules)
                except Exception:
                    log.exception("looking up the next due robot failed")
                    self._next_due = None
            due = self._next_due
            if due is not None:
                wait = (due - utcnow()).total_seconds()
                if wait <= 0:
                    self._next_due = None  # due now: the next claim takes it
                timeout = min(timeout, max(0.0, wait))
        if timeout > 0:
            with anyio.move_on_after(timeout):
                await self._wake.wait()

    # -- robots created already claimed (Orchestrator.submit) ----------------------------

    def reserve(self, module: str) -> bool:
        """Take a slot now for a robot of ``module`` about to be created already claimed.

        False when the worker is not running, has no free slot, the module is at capacity
        or its circuit is not closed: the robot is then created queued as usual. A True
        must be followed by ``start_reserved`` or ``unreserve``.
        """
        found = self.modules.get(module)
        if found is None or self._robots_tg is None or self._free_slots() <= 0 \
                or self.stats[module].load >= found.capacity:
            return False
        if self.circuits is not None and self.circuits.permits(module) is not None:
            return False  # open or half-open: trials go through the normal claim
        self.stats[module].load += 1
        self.executing += 1
        self._reserved_at = time.monotonic()
        return True

    def unreserve(self, module: str) -> None:
        """Give back a slot that ``reserve`` took (the robot was not created claimed)."""
        self.stats[module].load -= 1
        self.executing -= 1
        self._wake.set()

    async def start_reserved(self, claim: Claim) -> None:
        """Run a robot created claimed in the slot ``reserve`` took for it."""
        tg = self._robots_tg
        if tg is None:  # the worker stopped meanwhile: hand the robot back, uncharged
            self.unreserve(claim.execution.module)
            try:
                await self.state.release([(claim.robot.id, claim.execution.id)])
            except Exception:
                log.exception("robot %s: could not hand it back; its lease will expire",
                              claim.robot.id)
            return
        self._start(tg, claim, reserved=True)

    def _admit(self, claim: Claim) -> None:
        """A claimed robot: start it if a slot is free now, else wait (leased) for one."""
        name = claim.execution.module
        if self.executing < self.concurrency and \
                self.stats[name].load < self.modules[name].capacity and not self._ahead[name]:
            assert self._robots_tg is not None
            self._start(self._robots_tg, claim)
            return
        # Renewed by the heartbeat like any held lease; started by the next free slot.
        self.running[claim.robot.id] = _Running(claim=claim, scope=None, in_slot=False,
                                                waiting=True)
        self._ahead[name].append(claim)

    def _start_ahead(self, name: str) -> None:
        """Start robots of ``name`` claimed ahead while slots are free."""
        queue, tg = self._ahead[name], self._robots_tg
        capacity = self.modules[name].capacity
        while queue and tg is not None and self.executing < self.concurrency \
                and self.stats[name].load < capacity:
            claim = queue.popleft()
            waiting = self.running.pop(claim.robot.id, None)
            if waiting is None or waiting.cancelled or waiting.lease_lost:
                continue  # cancelled or lost while it waited: never started
            self._start(tg, claim)

    async def _release_waiting(self, claims: Sequence[Claim]) -> None:
        """Hand robots claimed ahead (never started) back to the queue, uncharged."""
        leases = [(c.robot.id, c.execution.id) for c in claims]
        for robot_id, _ in leases:
            self._forget_waiting(robot_id)
        if not leases:
            return
        try:
            await self.state.release(leases)
        except Exception:
            log.exception("could not release %d robots; their leases will expire",
                          len(leases))

    def _forget_waiting(self, robot_id: str) -> None:
        """Drop a robot claimed ahead that will never start here (cancelled, lease lost)."""
        running = self.running.pop(robot_id, None)
        if running is not None:
            queue = self._ahead[running.claim.execution.module]
            with contextlib.suppress(ValueError):
                queue.remove(running.claim)
        if not self.running:
            self._idle.set()

    def _start(self, tg: TaskGroup, claim: Claim, *, reserved: bool = False) -> None:
        # One scope per robot: shielded, as stopping the worker must not cancel robots at
        # once (_drain gives them the grace period, then cancels this scope and hands them
        # back uncharged); its deadline is the module's timeout; cancel_local, a lost lease
        # and _drain cancel it too, after setting the flag that says which it was.
        module = self.modules[claim.execution.module]
        timeout = module.timeout or self.settings.resilience.default_timeout
        scope = anyio.CancelScope(shield=True, deadline=anyio.current_time() + timeout)
        ticket = None if self.circuits is None else self.circuits.admit(claim.execution.module)
        self.running[claim.robot.id] = _Running(claim=claim, scope=scope, ticket=ticket)
        if not reserved:
            self.stats[claim.execution.module].load += 1
            self.executing += 1
        self.claimed += 1
        self._starts.append((claim, scope))
        if self._idle_runners:
            self._idle_runners.pop().set()
        else:
            tg.start_soon(self._runner)

    async def _runner(self) -> None:
        """Run started robots one after another, then wait for the next one.

        Robots run in long-lived runner tasks rather than a task each: spawning a task
        (with its cancel scope and event) cost more than the rest of a no-op robot's start.
        There are as many runners as robots ever ran or wrote their completion at once;
        ``_drain`` cancels the idle ones when the worker stops.
        """
        starts = self._starts
        while True:
            while starts:
                claim, scope = starts.popleft()
                await self._execute(claim, scope)
            wake = anyio.Event()
            self._idle_runners.append(wake)
            await wake.wait()

    # -- one robot ---------------------------------------------------------------------

    async def _execute(self, claim: Claim, scope: anyio.CancelScope) -> None:
        robot, execution = claim.robot, claim.execution
        module = self.modules[execution.module]
        token = execution.id
        running = self.running[robot.id]
        timeout = module.timeout or self.settings.resilience.default_timeout

        async def report(percent: float, message: str | None) -> None:
            if message is not None:
                message = storable_text(message)
            try:
                updated = await self.state.update_progress(robot.id, token, percent, message)
            except ServiceUnavailableError as exc:
                # Progress is best effort: the robot goes on, the next report may land.
                log.warning("robot %s: progress not stored (%s)", robot.id, exc.message)
                return
            if updated is None:
                log.warning("robot %s: lease lost while reporting progress; stopping it",
                            robot.id)
                running.lease_lost = True
                if not running.completing:  # a late report (a task the module left behind)
                    scope.cancel()
                await anyio.lowlevel.checkpoint()
            else:
                await self.on_progress(updated)

        ctx = ModuleContext(robot_id=robot.id, attempt=robot.attempts, module=module.name,
                            report=report)
        started = time.perf_counter()
        result: dict[str, object] | None = None
        error: ErrorInfo | None = None
        timed_out = False
        permanent = False
        try:
            with scope:
                try:
                    with self.tracker.measure("module.process"):
                        result = await module.run(robot, ctx)
                except Exception as exc:  # a TimeoutError of the module's own: a failure
                    error = _error_info(exc)
                    permanent = isinstance(exc, PermanentError)
                if not scope.cancel_called:
                    # It ended with nothing cancelling it: its outcome is written in this
                    # same shielded scope, deadline lifted, and nothing cancels the scope
                    # while it is completing (see cancel_local, _drain and report). A
                    # second scope for the write cost about 7% of a SQLite worker's CPU.
                    scope.deadline = math.inf
                    duration_ms = (time.perf_counter() - started) * 1000
                    self._leave_slot(running, module)
                    await self._write_outcome(running, module, robot, token, result, error,
                                              duration_ms, timed_out=False,
                                              permanent=permanent)
                    return
            duration_ms = (time.perf_counter() - started) * 1000
            self._leave_slot(running, module)
            if running.lease_lost or running.cancelled:
                # Cancelled by request or lease lost: the store already says what happened.
                if self.circuits is not None:
                    self.circuits.abandon(module.name, running.ticket)
                return
            if scope.cancelled_caught:  # cancelled, and by nobody: the deadline passed
                timed_out, result = True, None
                error = ErrorInfo("timeout", f"module {module.name!r} did not finish "
                                  f"within its timeout of {timeout:g} s")
            with anyio.CancelScope(shield=True):
                await self._write_outcome(running, module, robot, token, result, error,
                                          duration_ms, timed_out=timed_out,
                                          permanent=permanent)
        finally:
            self._leave_slot(running, module)
            was_full = self._free_slots() <= 0
            self.running.pop(robot.id, None)
            if was_full and self._free_slots() > 0:
                self._wake.set()  # room opened where there was none: claim again
            if not self.running:
                self._idle.set()

    async def _write_outcome(
        self, running: _Running, module: Module, robot: Robot, token: str,
        result: dict[str, object] | None, error: ErrorInfo | None, duration_ms: float, *,
        timed_out: bool, permanent: bool,
    ) -> None:
        """Record the attempt (module stats, circuit) and write how it ended. The caller
        shields it: cut off, the write's outcome would be unknown."""
        ok = error is None and not timed_out
        self.stats[module.name].record(ok, duration_ms)
        running.completing = True
        circuits = self.circuits
        if circuits is not None:
            if permanent:  # the robot's input, not the module, is at fault
                circuits.abandon(module.name, running.ticket)
            else:
                await circuits.record(module.name, running.ticket, ok=ok,
                                      seconds=duration_ms / 1000)
        await self._complete(robot, token, module, result, error, timed_out, duration_ms,
                             retryable=not permanent)

    def _leave_slot(self, running: _Running, module: Module) -> None:
        """The module returned (or the robot ended without it): free its slot, once."""
        if not running.in_slot:
            return
        running.in_slot = False
        stats = self.stats[module.name]
        was_full = stats.load >= module.capacity or self._free_slots() <= 0
        stats.load -= 1
        self.executing -= 1
        ahead = self._ahead[module.name]
        if ahead:
            self._start_ahead(module.name)  # the next robot claimed ahead takes the slot
            if len(ahead) <= _AHEAD_FACTOR * self.concurrency // 2 \
                    and module.name not in self._ahead_dry:  # a backlog to claim from
                self._wake.set()  # claim the next ones before these run out
        elif was_full:
            self._wake.set()  # a slot opened where there was none: claim again

    async def _complete(
        self, robot: Robot, token: str, module: Module, result: dict[str, object] | None,
        error: ErrorInfo | None, timed_out: bool, duration_ms: float, *, retryable: bool = True,
    ) -> None:
        now = utcnow()
        scheduled_at = None
        move_to = None
        if timed_out:
            status, exec_status = RobotStatus.TIMED_OUT, ExecutionStatus.TIMED_OUT
        elif error is None:
            status, exec_status = RobotStatus.SUCCEEDED, ExecutionStatus.SUCCEEDED
        elif robot.attempts < robot.max_attempts and retryable:
            status, exec_status = RobotStatus.QUEUED, ExecutionStatus.FAILED
            res = self.settings.resilience
            base = res.retry_base_seconds if module.retry_base_seconds is None \
                else module.retry_base_seconds
            cap = res.retry_cap_seconds if module.retry_cap_seconds is None \
                else module.retry_cap_seconds
            delay = backoff_delay(robot.attempts, base, cap)
            scheduled_at = now + timedelta(seconds=delay)
            if self.circuits is not None:
                move_to = await self.circuits.retry_module(robot, module.name, token)
        else:
            status, exec_status = RobotStatus.FAILED, ExecutionStatus.FAILED
        followup = None
        if status.is_terminal and self.make_followup is not None:
            try:
                followup = self.make_followup(
                    robot, status, result if status is RobotStatus.SUCCEEDED else None, error)
            except Exception:
                log.exception("robot %s: its follow-up could not be built; it ends without",
                              robot.id)
        completion = Completion(
            robot_id=robot.id, lease_token=token, status=status,
            execution_status=str(exec_status), finished_at=now, duration_ms=duration_ms,
            result=result if status is RobotStatus.SUCCEEDED else None, error=error,
            scheduled_at=scheduled_at, module=move_to, followup=followup, claimed=robot,
        )
        stored = await self._store_completion(completion)
        if stored is None:
            log.warning("robot %s: lease lost before completion; result dropped", robot.id)
            return
        self.completed += 1
        if self.circuits is not None and scheduled_at is not None and not stored.is_terminal:
            self.circuits.retries[module.name] += 1
            if move_to is not None:
                self.circuits.reassigned[(module.name, "retry")] += 1
                log.info("robot %s: retry moved from module %r to %r", robot.id, module.name,
                         move_to)
        if followup is not None:
            self.wake()  # the follow-up was queued with the completion
        if stored.is_terminal:
            await self.on_finished(stored)
        elif scheduled_at is not None:
            self.note_due(stored.scheduled_at)

    async def _store_completion(self, completion: Completion) -> Robot | None:
        """Write how the attempt ended, trying again while the store is unavailable.

        Giving up early would let the lease expire and the robot run again (a second
        success, for a module that succeeded). The lease is renewed meanwhile; once it is
        gone the write finds it gone and returns None, so trying longer is safe. After
        ``RFMVP_LEASE_SECONDS`` of failures the attempt is left to the lease reaper.
        """
        deadline = time.monotonic() + self.settings.worker.lease_seconds
        delay = 0.05
        while True:
            try:
                return await self.state.complete(completion)
            except Exception as exc:
                reason = exc.message if isinstance(exc, ServiceUnavailableError) \
                    else f"{type(exc).__name__}: {exc}"
                if time.monotonic() + delay >= deadline:
                    log.error("robot %s: could not store its completion (%s); the lease "
                              "reaper will requeue it", completion.robot_id, reason)
                    return None
                log.warning("robot %s: storing its completion failed (%s); trying again",
                            completion.robot_id, reason)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # -- leases ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.worker.lease_seconds / 3
        while True:
            await anyio.sleep(interval)
            leases = [(rid, r.claim.execution.id) for rid, r in self.running.items()]
            if not leases:
                continue
            try:
                held = await self.state.renew_leases(leases, self.settings.worker.lease_seconds)
            except Exception:
                log.exception("renewing %d leases failed; will retry", len(leases))
                continue
            for robot_id, _ in leases:
                running = self.running.get(robot_id)
                if robot_id not in held and running is not None and not running.cancelled \
                        and not running.completing:
                    log.warning("robot %s: lease lost (cancelled, or taken over after this "
                                "worker stalled); stopping it and dropping its result", robot_id)
                    running.lease_lost = True
                    running.stop()
                    if running.waiting:
                        self._forget_waiting(robot_id)

    async def _drain(self, robots_tg: TaskGroup) -> None:
        """Graceful stop: wait for running robots, then hand the rest back uncharged."""
        # Robots claimed ahead never started: they go back at once.
        await self._release_waiting([c for queue in self._ahead.values() for c in queue])
        if self.running:
            self._idle = anyio.Event()
            with anyio.move_on_after(self.settings.worker.shutdown_grace_seconds):
                await self._idle.wait()
        leftovers = [(rid, r.claim.execution.id) for rid, r in self.running.items()]
        for running in self.running.values():
            running.lease_lost = True  # we give it up: nothing more may be written for it
            if not running.completing:  # a write under way finishes (it is shielded)
                running.stop()
        robots_tg.cancel_scope.cancel()
        if leftovers:
            try:
                released = await self.state.release(leftovers)
                log.info("handed %d running robots back to the queue", released)
            except Exception:
                log.exception("could not release %d robots; their leases will expire",
                              len(leftovers))
