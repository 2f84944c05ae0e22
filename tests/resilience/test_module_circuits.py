"""Per-module circuit breakers, retries on another module, and the no-module deadline.

In process, on SQLite and the memory cache (the breakers do not need a server); the
shared state through Redis is tested in test_shared_circuits.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
import pytest

from robotframework_mvp import (
    ModuleContext,
    PermanentError,
    Robot,
    RobotStatus,
    hookimpl,
    module,
)
from robotframework_mvp.balancing import Candidate
from robotframework_mvp.metrics import render_metrics
from robotframework_mvp.models import ExecutionStatus
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.resilience import CircuitState
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator, test_settings

pytestmark = pytest.mark.anyio


def breaker(**changes: Any) -> dict[str, Any]:
    """Resilience settings: a small breaker that opens fast."""
    settings: dict[str, Any] = {
        "breaker_window": 4, "breaker_minimum_calls": 4, "breaker_failure_rate": 0.5,
        "breaker_open_seconds": 30.0, "breaker_half_open_calls": 2,
        "retry_base_seconds": 0.01, "retry_cap_seconds": 0.02,
    }
    settings.update(changes)
    return settings


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    with anyio.fail_after(timeout):
        while not await condition():  # noqa: ASYNC110
            await anyio.sleep(0.02)


async def metric(orch: Orchestrator, line_start: str) -> float:
    for line in (await render_metrics(orch)).splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- the breaker opens, and the balancer and the worker stop using the module -----------


@module("flaky", kinds=["work", "flaky-only"], max_attempts=1)
async def flaky(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    raise RuntimeError("flaky is down")


@module("steady", kinds=["work"])
async def steady(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"by": "steady"}


async def test_an_open_circuit_takes_the_module_out_of_the_balancer_and_health_says_so(
    sqlite_url: str,
) -> None:
    settings = test_settings(sqlite_url, resilience=breaker())
    async with running_orchestrator(flaky, steady, settings=settings) as orch:
        for _ in range(4):
            robot = await orch.process_robot("flaky-only", {}, api_key=TEST_API_KEY, timeout=10)
            assert robot.status is RobotStatus.FAILED
        assert orch.circuits.state("flaky") == "open"
        robots = await orch.submit_many(
            [_request("work") for _ in range(60)], api_key=TEST_API_KEY)
        assert {r.module for r in robots} == {"steady"}
        health = await orch.health()
        assert health["status"] == "degraded"
        assert health["components"]["circuits"]["open"] == ["flaky"]
        assert health["components"]["circuits"]["modules"]["flaky"]["state"] == "open"
        rows = {row["name"]: row for row in await orch.module_table(api_key=TEST_API_KEY)}
        assert rows["flaky"]["circuit_state"] == "open"
        assert rows["flaky"]["score"] == 0.0
        assert await metric(orch, 'rfmvp_circuit_state{name="module:flaky",state="open"}') == 1
        assert await metric(
            orch, 'rfmvp_circuit_transitions_total{name="module:flaky",state="open"}') == 1
        assert await metric(orch, 'rfmvp_module_circuit_state{module="flaky",state="open"}') == 1


def _request(kind: str, **payload: Any) -> Any:
    from robotframework_mvp import SubmitRequest

    return SubmitRequest(kind=kind, payload=payload)


class Gate:
    """A module whose failures a test switches on and off, logging each run."""

    def __init__(self) -> None:
        self.broken = True
        self.runs: list[tuple[float, float, bool]] = []  # (start, end, ok)

    def module(self, name: str = "gate", **options: Any) -> Any:
        @module(name, **options)
        async def run(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
            started = time.monotonic()
            broken = self.broken
            await anyio.sleep(robot.payload.get("sleep", 0))
            self.runs.append((started, time.monotonic(), not broken))
            if broken:
                raise RuntimeError("gate is broken")
            return {}

        return run


async def test_the_worker_claims_nothing_while_open_then_a_bounded_trial_closes_it(
    sqlite_url: str,
) -> None:
    gate = Gate()
    settings = test_settings(sqlite_url, resilience=breaker(
        breaker_window=3, breaker_minimum_calls=3, breaker_open_seconds=1.0,
        breaker_half_open_calls=2))
    async with running_orchestrator(gate.module(capacity=10, max_attempts=1),
                                    settings=settings) as orch:
        for _ in range(3):
            await orch.process_robot("gate", {}, api_key=TEST_API_KEY, timeout=10)
        assert orch.circuits.state("gate") == "open"
        opened = time.monotonic()
        gate.broken = False
        waiting = await orch.submit_many([_request("gate", sleep=0.2) for _ in range(8)],
                                         api_key=TEST_API_KEY)
        assert {r.module for r in waiting} == {"gate"}, "no other module: they wait for it"
        await anyio.sleep(0.5)
        for robot in waiting:
            current = await orch.get(robot.id, api_key=TEST_API_KEY)
            assert current.status is RobotStatus.QUEUED
            assert await orch.executions(robot.id, api_key=TEST_API_KEY) == []
        done = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=15) for r in waiting]
        assert all(r.status is RobotStatus.SUCCEEDED for r in done)
        trials = sorted(gate.runs[3:])
        assert trials[0][0] >= opened + 1.0 - 0.05, "nothing ran before the open period ended"
        first_end = min(end for _, end, _ in trials)
        concurrent_trials = [start for start, _, _ in trials if start < first_end]
        assert len(concurrent_trials) == 2, "half-open admits exactly the trial robots"
        assert orch.circuits.state("gate") == "closed"
        assert orch.circuits.breakers["gate"].transitions[CircuitState.HALF_OPEN] == 1


async def test_a_permanent_error_is_the_robots_fault_not_the_modules(sqlite_url: str) -> None:
    @module("picky")
    async def picky(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        raise PermanentError("bad input")

    settings = test_settings(sqlite_url, resilience=breaker(breaker_window=3,
                                                            breaker_minimum_calls=3))
    async with running_orchestrator(picky, settings=settings) as orch:
        for _ in range(6):
            robot = await orch.process_robot("picky", {}, api_key=TEST_API_KEY, timeout=10)
            assert robot.status is RobotStatus.FAILED
        assert orch.circuits.state("picky") == "closed"
        assert orch.circuits.breakers["picky"].snapshot().calls_in_window == 0


async def test_slow_successes_count_as_failures(sqlite_url: str) -> None:
    gate = Gate()
    gate.broken = False
    settings = test_settings(sqlite_url, resilience=breaker(
        breaker_window=3, breaker_minimum_calls=3, breaker_slow_call_seconds=0.05))
    async with running_orchestrator(gate.module(), settings=settings) as orch:
        for _ in range(3):
            robot = await orch.process_robot("gate", {"sleep": 0.1}, api_key=TEST_API_KEY,
                                             timeout=10)
            assert robot.status is RobotStatus.SUCCEEDED
        assert orch.circuits.state("gate") == "open"


# -- retries ---------------------------------------------------------------------------


class PreferBad:
    """A select_module plugin that sends new robots to ``bad`` whenever it may."""

    @hookimpl
    def select_module(self, kind: str, candidates: Sequence[Candidate]) -> str | None:
        return "bad" if any(c.name == "bad" for c in candidates) else None


@module("bad", kinds=["job"], max_attempts=5)
async def bad(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    raise RuntimeError("bad always fails")


@module("good", kinds=["job"], max_attempts=5)
async def good(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"by": "good"}


async def test_a_robot_that_keeps_failing_on_its_module_is_retried_on_another(
    sqlite_url: str,
) -> None:
    settings = test_settings(sqlite_url, resilience=breaker(
        breaker_window=20, breaker_minimum_calls=20, retry_other_module_after=2))
    async with running_orchestrator(bad, good, settings=settings,
                                    plugins=[PreferBad()]) as orch:
        robot = await orch.process_robot("job", {}, api_key=TEST_API_KEY, timeout=15)
        assert robot.status is RobotStatus.SUCCEEDED
        assert robot.module == "good"
        assert robot.result == {"by": "good"}
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
        assert [(e.attempt, e.module, e.status) for e in executions] == [
            (1, "bad", ExecutionStatus.FAILED), (2, "bad", ExecutionStatus.FAILED),
            (3, "good", ExecutionStatus.SUCCEEDED)]
        assert robot.attempts == len(executions) == 3
        assert await metric(orch, 'rfmvp_robot_retries_total{module="bad"}') == 2
        assert await metric(
            orch, 'rfmvp_robot_reassigned_total{module="bad",reason="retry"}') == 1


async def test_every_retry_is_an_execution_and_a_failed_robot_keeps_its_last_error(
    sqlite_url: str,
) -> None:
    @module("doomed", max_attempts=4)
    async def doomed(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        raise ValueError(f"attempt {ctx.attempt} failed")

    settings = test_settings(sqlite_url, resilience=breaker(breaker_window=20,
                                                            breaker_minimum_calls=20))
    async with running_orchestrator(doomed, settings=settings) as orch:
        robot = await orch.process_robot("doomed", {}, api_key=TEST_API_KEY, timeout=15)
        assert robot.status is RobotStatus.FAILED
        assert robot.error is not None
        assert (robot.error.type, robot.error.message) == ("ValueError", "attempt 4 failed")
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
        assert [e.attempt for e in executions] == [1, 2, 3, 4]
        assert all(e.status is ExecutionStatus.FAILED for e in executions)
        assert await metric(orch, 'rfmvp_robot_retries_total{module="doomed"}') == 3
        # The dead-letter view: failed robots stay listable, and can be queued again.
        page = await orch.list(api_key=TEST_API_KEY, status="failed")
        assert [r.id for r in page.items] == [robot.id]


async def test_an_open_circuit_sends_retries_and_queued_robots_to_another_module(
    sqlite_url: str,
) -> None:
    settings = test_settings(sqlite_url, resilience=breaker(
        breaker_window=2, breaker_minimum_calls=2, retry_other_module_after=5),
        background={"reaper_interval": 0.1})
    async with running_orchestrator(bad, good, settings=settings,
                                    plugins=[PreferBad()]) as orch:
        robots = await orch.submit_many([_request("job"), _request("job")],
                                        api_key=TEST_API_KEY)
        assert {r.module for r in robots} == {"bad"}
        done = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=15) for r in robots]
        assert [r.status for r in done] == [RobotStatus.SUCCEEDED] * 2
        assert {r.module for r in done} == {"good"}
        assert orch.circuits.state("bad") == "open"
        reassigned = orch.circuits.reassigned
        assert reassigned[("bad", "retry")] + reassigned[("bad", "unavailable")] == 2


# -- no module available ---------------------------------------------------------------


@module("lonely", max_attempts=1)
async def lonely(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"ok": True}


async def test_robots_wait_queued_while_no_module_can_take_them_then_fail_at_the_deadline(
    sqlite_url: str,
) -> None:
    settings = test_settings(sqlite_url, resilience=breaker(no_module_deadline=0.6),
                             background={"reaper_interval": 0.1})
    async with running_orchestrator(lonely, settings=settings) as orch:
        orch.circuits.breakers["lonely"].force(CircuitState.OPEN)
        robots = await orch.submit_many([_request("lonely") for _ in range(3)],
                                        api_key=TEST_API_KEY)
        submitted = time.monotonic()
        await anyio.sleep(0.3)
        for robot in robots:
            assert (await orch.get(robot.id, api_key=TEST_API_KEY)).status \
                is RobotStatus.QUEUED
        ended = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=10) for r in robots]
        assert time.monotonic() - submitted >= 0.6
        for robot in ended:
            assert robot.status is RobotStatus.FAILED
            assert robot.error is not None
            assert robot.error.type == "no_module_available"
            assert "lonely" in robot.error.message
            assert robot.attempts == 0
        page = await orch.list(api_key=TEST_API_KEY, status="failed")
        assert {r.id for r in page.items} == {r.id for r in robots}
        assert orch.circuits.unavailable_failures["lonely"] == 3
        # Once the module is back, an operator's retry runs it.
        orch.circuits.breakers["lonely"].force(CircuitState.CLOSED)
        await orch.retry(robots[0].id, api_key=TEST_API_KEY)
        again = await orch.wait(robots[0].id, api_key=TEST_API_KEY, timeout=10)
        assert again.status is RobotStatus.SUCCEEDED


async def test_a_module_that_recovers_before_the_deadline_takes_its_waiting_robots(
    sqlite_url: str,
) -> None:
    settings = test_settings(sqlite_url, resilience=breaker(no_module_deadline=30.0),
                             background={"reaper_interval": 0.1})
    async with running_orchestrator(lonely, settings=settings) as orch:
        orch.circuits.breakers["lonely"].force(CircuitState.OPEN)
        robot = await orch.submit("lonely", {}, api_key=TEST_API_KEY)
        await anyio.sleep(0.4)
        assert (await orch.get(robot.id, api_key=TEST_API_KEY)).status is RobotStatus.QUEUED
        orch.circuits.breakers["lonely"].force(CircuitState.CLOSED)
        orch.worker.wake()
        done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
        assert done.status is RobotStatus.SUCCEEDED


# -- a module that hangs ---------------------------------------------------------------


async def test_a_hanging_module_times_out_and_frees_its_slot(sqlite_url: str) -> None:
    @module("sticky", capacity=1, timeout=0.3, max_attempts=1)
    async def sticky(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        if robot.payload.get("hang"):
            await anyio.sleep_forever()
        return {"ran_at": time.monotonic()}

    async with running_orchestrator(sticky, settings=test_settings(sqlite_url)) as orch:
        hung = await orch.submit("sticky", {"hang": True}, api_key=TEST_API_KEY)
        after = await orch.submit("sticky", {}, api_key=TEST_API_KEY)
        first = await orch.wait(hung.id, api_key=TEST_API_KEY, timeout=10)
        second = await orch.wait(after.id, api_key=TEST_API_KEY, timeout=10)
        assert first.status is RobotStatus.TIMED_OUT
        assert first.error is not None
        assert first.error.type == "timeout"
        assert second.status is RobotStatus.SUCCEEDED, "the slot was freed for the next robot"
        assert orch.worker.running == {}
        assert orch.module_stats["sticky"].load == 0
        # The timeout counts against the module's circuit.
        snapshot = orch.circuits.breakers["sticky"].snapshot()
        assert (snapshot.calls_in_window, snapshot.failure_rate) == (2, 0.5)


async def test_module_health_checks_have_their_own_timeout(sqlite_url: str) -> None:
    async def slow_check() -> bool:
        await anyio.sleep(5)
        return True

    @module("slowcheck", health_check=slow_check)
    async def slowcheck(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        return {}

    settings = test_settings(sqlite_url, background={"health_check_timeout": 0.2})
    async with running_orchestrator(slowcheck, settings=settings) as orch:
        async def checked() -> bool:
            return "slowcheck" in orch.background.health_checks

        await wait_until(checked, 5, "the first health check")
        health = await orch.health()
        check = health["components"]["modules"]["checks"]["slowcheck"]
        assert check["health"] == "unhealthy"
        assert check["error"] == "timed out after 0.2 s"
        assert 150 <= check["latency_ms"] < 2000
        assert health["components"]["modules"]["health"]["slowcheck"] == "unhealthy"
