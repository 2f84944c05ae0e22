"""The robot lifecycle as a state machine, checked against the real SQLite driver.

Hypothesis drives random sequences of the writes workers, clients and background loops
make (create, claim, progress, complete, cancel, release, renew, reap, requeue), with the
right lease token or a stale one, on a clock the test advances by hand. A simple model
predicts each answer; the invariants are the lifecycle's promises:

- a terminal robot keeps its status; the only way out of one is an explicit requeue of
  a failed or timed-out robot (succeeded and cancelled are forever);
- attempts never exceed max_attempts while a robot runs;
- progress never decreases while a robot stays in one attempt;
- a stale lease token changes nothing at all;
- a robot has at most one running execution: exactly one, the lease's, while it runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio.from_thread
import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from robotframework_mvp.models import (
    ErrorInfo,
    ExecutionStatus,
    Robot,
    RobotStatus,
    new_id,
)
from robotframework_mvp.state.driver import Completion
from robotframework_mvp.state.sqlite import SQLiteDriver

T = TypeVar("T")

MODULES = ("mail", "ocr")
LEASE = 10
START = 1_700_000_000.0
MAX_ROBOTS = 10

QUEUED, RUNNING = RobotStatus.QUEUED, RobotStatus.RUNNING
SUCCEEDED, FAILED = RobotStatus.SUCCEEDED, RobotStatus.FAILED
CANCELLED, TIMED_OUT = RobotStatus.CANCELLED, RobotStatus.TIMED_OUT


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


@attrs.define
class Model:
    id: str
    module: str
    priority: int
    max_attempts: int
    scheduled_at: float
    status: RobotStatus = QUEUED
    attempts: int = 0
    progress: float = 0.0
    token: str | None = None
    lease_expires_at: float | None = None
    tokens: list[str] = attrs.Factory(list)


class RobotLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self.driver = SQLiteDriver("sqlite:///:memory:")
        self.call(self.driver.open)
        self.call(self.driver.migrate)
        self.now = START
        self.robots: dict[str, Model] = {}
        # status of every robot that is terminal now, since it last became terminal
        self.terminal: dict[str, RobotStatus] = {}
        # (lease token, progress) last seen for every running robot
        self.seen_progress: dict[str, tuple[str | None, float]] = {}

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.portal.call(functools.partial(fn, *args, **kwargs))

    def teardown(self) -> None:
        try:
            self.call(self.driver.close)
        finally:
            self._portal_cm.__exit__(None, None, None)

    # -- helpers -----------------------------------------------------------------------

    def pick(self, data: st.DataObject) -> Model:
        return self.robots[data.draw(st.sampled_from(sorted(self.robots)), label="robot")]

    def token_for(self, data: st.DataObject, robot: Model, right: bool) -> str:
        """The robot's current lease token, or a stale (or never issued) one."""
        if right and robot.token is not None:
            return robot.token
        stale = [t for t in robot.tokens if t != robot.token] + [new_id()]
        return data.draw(st.sampled_from(stale), label="stale token")

    def snapshot(self, robot_id: str) -> tuple[Robot | None, list[Any]]:
        return (self.call(self.driver.get_robot, robot_id),
                self.call(self.driver.list_executions, robot_id))

    def became_terminal(self, robot: Model) -> None:
        assert robot.status.is_terminal
        self.terminal[robot.id] = robot.status
        robot.token = None
        robot.lease_expires_at = None

    # -- rules -------------------------------------------------------------------------

    @precondition(lambda self: len(self.robots) < MAX_ROBOTS)
    @rule(module=st.sampled_from(MODULES), priority=st.integers(-1, 1),
          max_attempts=st.integers(1, 3))
    def create(self, module: str, priority: int, max_attempts: int) -> None:
        robot = Robot(
            id=new_id(), kind=module, payload={"n": len(self.robots)}, owner="o", tenant="o",
            status=QUEUED, module=module, max_attempts=max_attempts, priority=priority,
            created_at=at(self.now), updated_at=at(self.now), scheduled_at=at(self.now),
        )
        [(stored, is_new)] = self.call(self.driver.create_robots, [robot])
        assert is_new
        assert stored.id == robot.id
        self.robots[robot.id] = Model(id=robot.id, module=module, priority=priority,
                                      max_attempts=max_attempts, scheduled_at=self.now)

    @rule(module=st.sampled_from(MODULES), limit=st.integers(1, 3))
    def claim(self, module: str, limit: int) -> None:
        due = sorted(
            (r for r in self.robots.values()
             if r.status is QUEUED and r.module == module and r.scheduled_at <= self.now),
            key=lambda r: (-r.priority, r.scheduled_at, r.id),
        )
        expected = due[:limit]
        claims = self.call(self.driver.claim_robots, module=module, limit=limit, worker="w",
                           now=at(self.now), lease_expires_at=at(self.now + LEASE))
        assert [c.robot.id for c in claims] == [r.id for r in expected]
        for claim, robot in zip(claims, expected, strict=True):
            robot.status = RUNNING
            robot.attempts += 1
            token = claim.execution.id
            assert token not in robot.tokens, "a claim must hand out a fresh lease token"
            robot.token = token
            robot.tokens.append(token)
            robot.lease_expires_at = self.now + LEASE
            assert claim.robot.status is RUNNING
            assert claim.robot.attempts == robot.attempts == claim.execution.attempt
            assert claim.execution.status is ExecutionStatus.RUNNING

    @precondition(lambda self: self.robots)
    @rule(data=st.data(), right=st.booleans(),
          percent=st.floats(0, 100, allow_nan=False).map(lambda p: round(p, 1)))
    def progress(self, data: st.DataObject, right: bool, percent: float) -> None:
        robot = self.pick(data)
        token = self.token_for(data, robot, right)
        before = self.snapshot(robot.id)
        updated = self.call(self.driver.update_progress, robot.id, token, percent, "msg",
                            at(self.now))
        if token == robot.token:
            assert updated is not None
            robot.progress = max(robot.progress, percent)
            assert updated.progress == robot.progress
        else:
            assert updated is None
            assert self.snapshot(robot.id) == before

    @precondition(lambda self: self.robots)
    @rule(data=st.data(), right=st.booleans(),
          outcome=st.sampled_from(["success", "failure", "timeout"]),
          backoff=st.integers(0, 5))
    def complete(self, data: st.DataObject, right: bool, outcome: str, backoff: int) -> None:
        robot = self.pick(data)
        token = self.token_for(data, robot, right)
        scheduled_at = None
        # The worker's decision (worker.Worker._complete), mirrored.
        if outcome == "success":
            status, exec_status, error = SUCCEEDED, "succeeded", None
        elif outcome == "timeout":
            status, exec_status, error = TIMED_OUT, "timed_out", ErrorInfo("timeout", "slow")
        elif robot.attempts < robot.max_attempts:
            status, exec_status, error = QUEUED, "failed", ErrorInfo("ValueError", "boom")
            scheduled_at = self.now + backoff
        else:
            status, exec_status, error = FAILED, "failed", ErrorInfo("ValueError", "boom")
        completion = Completion(
            robot_id=robot.id, lease_token=token, status=status,
            execution_status=exec_status, finished_at=at(self.now), duration_ms=1.0,
            result={"ok": True} if status is SUCCEEDED else None, error=error,
            scheduled_at=None if scheduled_at is None else at(scheduled_at),
        )
        before = self.snapshot(robot.id)
        stored = self.call(self.driver.complete, completion)
        if token != robot.token:
            assert stored is None
            assert self.snapshot(robot.id) == before
            return
        assert stored is not None
        assert stored.status is status
        executions = {e.id: e for e in self.call(self.driver.list_executions, robot.id)}
        assert executions[token].status == exec_status
        robot.status = status
        if status is SUCCEEDED:
            robot.progress = 100.0
            assert stored.result == {"ok": True}
        if status is QUEUED:
            assert scheduled_at is not None
            robot.scheduled_at = scheduled_at
            robot.token = robot.lease_expires_at = None
        else:
            assert stored.error == error
            self.became_terminal(robot)

    @precondition(lambda self: self.robots)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        robot = self.pick(data)
        before = self.snapshot(robot.id)
        cancelled = self.call(self.driver.cancel_robot, robot.id, at(self.now))
        if robot.status.is_terminal:
            assert cancelled is None
            assert self.snapshot(robot.id) == before
            return
        assert cancelled is not None
        assert cancelled.status is CANCELLED
        robot.status = CANCELLED
        self.became_terminal(robot)

    @precondition(lambda self: self.robots)
    @rule(data=st.data(), right=st.booleans())
    def release(self, data: st.DataObject, right: bool) -> None:
        robot = self.pick(data)
        token = self.token_for(data, robot, right)
        before = self.snapshot(robot.id)
        released = self.call(self.driver.release_robots, [(robot.id, token)], at(self.now))
        if token != robot.token:
            assert released == 0
            assert self.snapshot(robot.id) == before
            return
        assert released == 1
        robot.status = QUEUED
        robot.attempts -= 1  # a graceful hand-back does not charge the attempt
        robot.scheduled_at = self.now
        robot.token = robot.lease_expires_at = None

    @precondition(lambda self: self.robots)
    @rule(data=st.data(), right=st.booleans())
    def renew(self, data: st.DataObject, right: bool) -> None:
        robot = self.pick(data)
        token = self.token_for(data, robot, right)
        before = self.snapshot(robot.id)
        held = self.call(self.driver.renew_leases, [(robot.id, token)], at(self.now + LEASE))
        if token != robot.token:
            assert held == set()
            assert self.snapshot(robot.id) == before
            return
        assert held == {robot.id}
        robot.lease_expires_at = self.now + LEASE

    @rule(seconds=st.integers(0, 2 * LEASE))
    def reap_later(self, seconds: int) -> None:
        self.now += seconds
        expired = {r.id for r in self.robots.values()
                   if r.status is RUNNING and r.lease_expires_at is not None
                   and r.lease_expires_at < self.now}
        reaped = self.call(self.driver.reap_expired_leases, at(self.now))
        assert {r.id for r in reaped} == expired
        for stored in reaped:
            robot = self.robots[stored.id]
            robot.scheduled_at = self.now
            if robot.attempts < robot.max_attempts:
                robot.status = QUEUED
                robot.token = robot.lease_expires_at = None
            else:
                robot.status = FAILED
                self.became_terminal(robot)
                assert stored.error is not None
                assert stored.error.type == "lease_expired"
            assert stored.status is robot.status

    @precondition(lambda self: self.robots)
    @rule(data=st.data(), extra=st.integers(1, 3))
    def requeue(self, data: st.DataObject, extra: int) -> None:
        robot = self.pick(data)
        before = self.snapshot(robot.id)
        requeued = self.call(self.driver.requeue_robot, robot.id, at(self.now), extra)
        if robot.status not in (FAILED, TIMED_OUT):
            assert requeued is None
            assert self.snapshot(robot.id) == before
            return
        assert requeued is not None
        assert requeued.status is QUEUED
        del self.terminal[robot.id]
        robot.status = QUEUED
        robot.max_attempts = robot.attempts + extra
        robot.progress = 0.0
        robot.scheduled_at = self.now

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def the_store_agrees_with_the_model_and_keeps_every_promise(self) -> None:
        stored = {r.id: r for r in self.call(
            self.driver.list_robots, tenant=None, status=None, kind=None, limit=1000,
            before_id=None)}
        assert set(stored) == set(self.robots)
        for robot_id, robot in self.robots.items():
            row = stored[robot_id]
            assert (row.status, row.attempts, row.max_attempts, row.progress, row.lease_token) \
                == (robot.status, robot.attempts, robot.max_attempts, robot.progress,
                    robot.token)
            assert row.scheduled_at.timestamp() == robot.scheduled_at

            # Terminal robots keep their status (requeue is the only, explicit, way out).
            if robot_id in self.terminal:
                assert row.status is self.terminal[robot_id]
                assert row.lease_token is None
                assert row.finished_at is not None
            else:
                assert not row.status.is_terminal

            # Attempts never exceed max_attempts while running.
            if row.status is RUNNING:
                assert 1 <= row.attempts <= row.max_attempts

            # Progress never decreases within one attempt.
            if row.status is RUNNING:
                token, last = self.seen_progress.get(robot_id, (None, 0.0))
                if token == row.lease_token:
                    assert row.progress >= last
                self.seen_progress[robot_id] = (row.lease_token, row.progress)
            else:
                self.seen_progress.pop(robot_id, None)

            # At most one running execution: the lease's, exactly while the robot runs.
            running = [e for e in self.call(self.driver.list_executions, robot_id)
                       if e.status is ExecutionStatus.RUNNING]
            if row.status is RUNNING:
                assert [e.id for e in running] == [row.lease_token]
            else:
                assert running == []


RobotLifecycle.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRobotLifecycle = RobotLifecycle.TestCase
