"""The request flow end to end, through a real Orchestrator (real store, real cache).

Each test states one promise the framework makes to the people who submit robots and
to the people who write modules. Nothing here mocks the store, sleeps and hopes, or
asserts how long something took: tests wait on events, on ``orch.wait`` or under
``anyio.fail_after``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import sqlite3
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from robotframework_mvp import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    ErrorInfo,
    ExecutionStatus,
    Module,
    ModuleContext,
    NotFoundError,
    Orchestrator,
    RateLimit,
    RateLimitedError,
    Robot,
    RobotStatus,
    Settings,
    StaticKey,
    SubmitRequest,
    ValidationError,
    hookimpl,
    module,
)
from robotframework_mvp.models import ModuleRecord
from robotframework_mvp.security.audit import verify_chain
from robotframework_mvp.security.auth import hash_key
from robotframework_mvp.state.sqlite import SQLiteDriver, sqlite_path
from robotframework_mvp.testing import (
    TEST_API_KEY,
    TEST_PRINCIPAL,
    running_orchestrator,
    test_settings,
)
from robotframework_mvp.worker import _AHEAD_FACTOR as AHEAD  # robots claimed ahead per slot

pytestmark = pytest.mark.anyio

ALICE_KEY = "alice-key-9f8e7d6c5b4a"
BOB_KEY = "bob-key-1a2b3c4d5e6f"
ROOT_KEY = "root-key-0a9b8c7d6e5f"
WRONG_KEY = "wrong-key-5566778899"
SECRET_KEY = "pepper-for-flow-tests"
KEYS = (
    StaticKey(TEST_PRINCIPAL, TEST_API_KEY),
    StaticKey("alice", ALICE_KEY),
    StaticKey("bob", BOB_KEY),
    StaticKey("root", ROOT_KEY),
)

SUCCEEDED, FAILED = RobotStatus.SUCCEEDED, RobotStatus.FAILED
QUEUED, RUNNING = RobotStatus.QUEUED, RobotStatus.RUNNING
CANCELLED, TIMED_OUT = RobotStatus.CANCELLED, RobotStatus.TIMED_OUT

OPERATIONS = (
    "security.validate",
    "balancer.select",
    "state.create_robot",
    "state.start_execution",
    "module.process",
    "state.update_progress",
    "state.complete_robot",
)


def flow_settings(
    storage_url: str,
    cache_url: str = "memory://",
    redis_prefix: str | None = None,
    **changes: Any,
) -> Settings:
    """test_settings with four principals (root is admin) and a known key pepper."""
    security: dict[str, Any] = {"api_keys": KEYS, "admin_principals": ("root",),
                                "secret_key": SECRET_KEY}
    security.update(changes.pop("security", {}))
    cache: dict[str, Any] = {"url": cache_url}
    if redis_prefix is not None:
        cache["key_prefix"] = redis_prefix
    cache.update(changes.pop("cache", {}))
    return test_settings(storage_url, security=security, cache=cache, **changes)


@module("echo", capacity=50)
async def echo(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Return the payload."""
    await ctx.progress(50, "echoing")
    return {"echo": robot.payload}


class Recorder:
    """A plugin that records every robot event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Robot]] = []
        self.lifecycle: list[str] = []
        self._changed = anyio.Event()

    def _add(self, name: str, robot: Robot) -> None:
        self.events.append((name, robot))
        self._changed.set()
        self._changed = anyio.Event()

    def of(self, name: str, robot_id: str) -> list[Robot]:
        return [r for n, r in self.events if n == name and r.id == robot_id]

    async def wait_for(self, name: str, robot_id: str,
                       where: Callable[[Robot], bool] = lambda r: True) -> Robot:
        with anyio.fail_after(10):
            while True:
                for robot in self.of(name, robot_id):
                    if where(robot):
                        return robot
                await self._changed.wait()

    @hookimpl
    def on_robot_created(self, robot: Robot) -> None:
        self._add("created", robot)

    @hookimpl
    async def on_robot_progress(self, robot: Robot) -> None:
        self._add("progress", robot)

    @hookimpl
    def on_robot_finished(self, robot: Robot) -> None:
        self._add("finished", robot)

    @hookimpl
    def on_startup(self, orchestrator: Orchestrator) -> None:
        self.lifecycle.append("startup")

    @hookimpl
    def on_shutdown(self, orchestrator: Orchestrator) -> None:
        self.lifecycle.append("shutdown")


async def _all(*calls: Callable[[], Any]) -> list[Any]:
    """Run calls concurrently; each result (or the error it raised), in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except Exception as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return results


async def _read_store(url: str, robot_id: str) -> tuple[Robot | None, list[Any]]:
    """The robot and its executions, read straight from a SQLite file."""
    driver = SQLiteDriver(url)
    await driver.open()
    try:
        return await driver.get_robot(robot_id), await driver.list_executions(robot_id)
    finally:
        await driver.close()


# == running robots =======================================================================


async def test_a_thousand_echo_robots_all_succeed_with_their_own_results(
    storage_url: str, cache_url: str, redis_prefix: str
) -> None:
    settings = flow_settings(storage_url, cache_url, redis_prefix,
                             worker={"concurrency": 50})
    async with running_orchestrator(echo, settings=settings) as orch:
        payloads = [{"n": i, "text": f"robot number {i}"} for i in range(1000)]
        submitted = await _all(*(
            (lambda p=p: orch.submit("echo", p, api_key=TEST_API_KEY)) for p in payloads
        ))
        assert all(isinstance(r, Robot) for r in submitted), submitted[:3]
        assert len({r.id for r in submitted}) == 1000
        with anyio.fail_after(120):
            finished = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=60)
                        for r in submitted]
    for payload, robot in zip(payloads, finished, strict=True):
        assert robot.status is SUCCEEDED, robot
        assert robot.result == {"echo": payload}
        assert robot.error is None
        assert robot.attempts == 1
        assert robot.progress == 100
        assert robot.module == "echo"
        assert robot.owner == TEST_PRINCIPAL


async def test_a_plain_function_module_runs_in_a_thread_and_never_blocks_the_loop(
    sqlite_url: str,
) -> None:
    gate = threading.Event()
    threads: list[int] = []

    @module("scan")
    def scan(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        threads.append(threading.get_ident())
        ctx.progress_from_thread(40, "waiting for the scanner")
        if not gate.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        return {"pages": robot.payload["pages"]}

    recorder = Recorder()
    try:
        async with running_orchestrator(scan, settings=flow_settings(sqlite_url),
                                        plugins=[recorder]) as orch:
            robot = await orch.submit("scan", {"pages": 3}, api_key=TEST_API_KEY)
            await recorder.wait_for("progress", robot.id)
            # The function is blocked in its thread, yet the loop answers us.
            current = await orch.get(robot.id, api_key=TEST_API_KEY)
            assert current.status is RUNNING
            assert current.progress == 40
            gate.set()
            done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
    finally:
        gate.set()
    assert done.status is SUCCEEDED
    assert done.result == {"pages": 3}
    assert threads
    assert threads[0] != threading.get_ident()


async def test_progress_is_stored_never_decreases_and_reaches_100_on_success(
    sqlite_url: str,
) -> None:
    go = anyio.Event()

    @module("download")
    async def download(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        await ctx.progress(10, "connecting")
        await ctx.progress(60, "downloading")
        await go.wait()
        await ctx.progress(30, "a late report, lower than before")
        await ctx.progress(80, "verifying")
        return {"bytes": 1024}

    recorder = Recorder()
    async with running_orchestrator(download, settings=flow_settings(sqlite_url),
                                    plugins=[recorder]) as orch:
        robot = await orch.submit("download", {}, api_key=TEST_API_KEY)
        await recorder.wait_for("progress", robot.id, lambda r: r.progress == 60)
        stored = await orch.driver.get_robot(robot.id)  # the store, not the cache
        assert stored is not None
        assert (stored.status, stored.progress, stored.progress_message) == (
            RUNNING, 60, "downloading")
        assert (await orch.get(robot.id, api_key=TEST_API_KEY)).progress == 60
        go.set()
        done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
    seen = [r.progress for r in recorder.of("progress", robot.id)]
    assert seen == [10, 60, 60, 80]
    assert seen == sorted(seen)
    assert done.status is SUCCEEDED
    assert done.progress == 100


async def test_a_robot_whose_module_raises_is_retried_then_fails_with_its_error(
    storage_url: str,
) -> None:
    attempts_seen: list[int] = []

    @module("partner", max_attempts=3)
    async def partner(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        attempts_seen.append(ctx.attempt)
        raise ConnectionRefusedError("the partner API refused the connection")

    async with running_orchestrator(partner, settings=flow_settings(storage_url)) as orch:
        robot = await orch.process_robot("partner", {}, api_key=TEST_API_KEY, timeout=30)
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
    error = ErrorInfo("ConnectionRefusedError", "the partner API refused the connection")
    assert robot.status is FAILED
    assert robot.error == error
    assert robot.result is None
    assert robot.attempts == robot.max_attempts == 3
    assert attempts_seen == [1, 2, 3]
    assert [e.attempt for e in executions] == [1, 2, 3]
    assert all(e.status is ExecutionStatus.FAILED and e.error == error for e in executions)
    # Attempts follow one another: each starts after the previous one ended.
    for before, after in itertools.pairwise(executions):
        assert before.finished_at is not None
        assert after.started_at >= before.finished_at


async def test_text_no_store_can_hold_is_stored_cleaned_not_lost(storage_url: str) -> None:
    """A module's progress message and error text may hold what a store refuses (a NUL,
    which PostgreSQL cannot store; a lone surrogate, which is not UTF-8): the robot still
    ends as it should, with that character replaced, instead of its writes failing."""
    reported = anyio.Event()

    @module("scanner", max_attempts=1)
    async def scanner(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        await ctx.progress(40, "page\x00 1 \ud800 of 3")
        reported.set()
        raise ValueError("bad byte \x00 and \udfff in the scan")

    recorder = Recorder()
    async with running_orchestrator(scanner, settings=flow_settings(storage_url),
                                    plugins=[recorder]) as orch:
        robot = await orch.submit("scanner", {}, api_key=TEST_API_KEY)
        done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
    assert reported.is_set()
    assert [r.progress_message for r in recorder.of("progress", robot.id)] == [
        "page\ufffd 1 \ufffd of 3"]
    assert done.status is FAILED
    assert done.error == ErrorInfo("ValueError", "bad byte \ufffd and \ufffd in the scan")
    assert [e.error for e in executions] == [done.error]


async def test_a_module_without_max_attempts_gets_the_configured_default(
    sqlite_url: str,
) -> None:
    @module("fragile")
    async def fragile(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        raise RuntimeError("nope")

    settings = flow_settings(sqlite_url, resilience={"default_max_attempts": 2})
    async with running_orchestrator(fragile, settings=settings) as orch:
        robot = await orch.process_robot("fragile", {}, api_key=TEST_API_KEY, timeout=30)
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
    assert robot.status is FAILED
    assert robot.attempts == robot.max_attempts == 2
    assert len(executions) == 2


async def test_a_module_that_fails_twice_then_succeeds_ends_succeeded(sqlite_url: str) -> None:
    @module("flaky", max_attempts=3)
    async def flaky(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        if ctx.attempt < 3:
            raise ConnectionResetError(f"attempt {ctx.attempt} lost the connection")
        return {"attempt": ctx.attempt}

    async with running_orchestrator(flaky, settings=flow_settings(sqlite_url)) as orch:
        robot = await orch.process_robot("flaky", {}, api_key=TEST_API_KEY, timeout=30)
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
    assert robot.status is SUCCEEDED
    assert robot.result == {"attempt": 3}
    assert robot.error is None
    assert robot.attempts == 3
    assert [e.status for e in executions] == [
        ExecutionStatus.FAILED, ExecutionStatus.FAILED, ExecutionStatus.SUCCEEDED]
    assert executions[0].error == ErrorInfo("ConnectionResetError",
                                            "attempt 1 lost the connection")


async def test_a_timeout_error_raised_inside_a_module_is_an_ordinary_retried_failure(
    sqlite_url: str,
) -> None:
    """Only the module's own deadline means timed_out; a socket or inner timeout is retried."""

    @module("slow_network", timeout=60, max_attempts=3)
    async def slow_network(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise TimeoutError("the partner did not answer within 5 s")
        if ctx.attempt == 2:
            with anyio.fail_after(0.01):  # the module's own, inner deadline
                await anyio.sleep_forever()
        return {"attempt": ctx.attempt}

    async with running_orchestrator(slow_network, settings=flow_settings(sqlite_url)) as orch:
        robot = await orch.process_robot("slow_network", {}, api_key=TEST_API_KEY, timeout=30)
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
    assert robot.status is SUCCEEDED
    assert robot.result == {"attempt": 3}
    assert [e.status for e in executions] == [
        ExecutionStatus.FAILED, ExecutionStatus.FAILED, ExecutionStatus.SUCCEEDED]
    assert executions[0].error == ErrorInfo("TimeoutError",
                                            "the partner did not answer within 5 s")
    assert executions[1].error is not None
    assert executions[1].error.type == "TimeoutError"


async def test_a_robot_that_outlives_its_module_timeout_ends_timed_out(sqlite_url: str) -> None:
    saw: list[str] = []

    @module("stuck", timeout=0.2, max_attempts=3)
    async def stuck(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            saw.append("cancelled")
            raise
        return {}

    async with running_orchestrator(stuck, settings=flow_settings(sqlite_url)) as orch:
        robot = await orch.process_robot("stuck", {}, api_key=TEST_API_KEY, timeout=30)
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
    assert robot.status is TIMED_OUT
    assert robot.error is not None
    assert robot.error.type == "timeout"
    assert robot.result is None
    assert robot.attempts == 1  # a timeout is final
    assert [e.status for e in executions] == [ExecutionStatus.TIMED_OUT]
    assert saw == ["cancelled"]  # the module was stopped, not left running


# == cancellation =========================================================================


async def test_a_queued_robot_can_be_cancelled_and_its_module_never_runs_it(
    sqlite_url: str,
) -> None:
    release = anyio.Event()
    blocker_started = anyio.Event()
    ran: list[str] = []

    @module("printer", capacity=1)
    async def printer(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        ran.append(robot.id)
        if robot.payload.get("block"):
            blocker_started.set()
            await release.wait()
        return {"printed": robot.payload}

    async with running_orchestrator(printer, settings=flow_settings(sqlite_url)) as orch:
        blocker = await orch.submit("printer", {"block": True}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await blocker_started.wait()
        victim = await orch.submit("printer", {"n": 1}, api_key=TEST_API_KEY)
        assert victim.status is QUEUED
        cancelled = await orch.cancel(victim.id, api_key=TEST_API_KEY)
        assert cancelled.status is CANCELLED
        assert cancelled.error is not None
        assert cancelled.error.type == "cancelled"
        release.set()
        assert (await orch.wait(blocker.id, api_key=TEST_API_KEY, timeout=10)).status \
            is SUCCEEDED
        # Robots of one module run in order: a robot submitted after the victim runs
        # only once the victim had its chance.
        later = await orch.process_robot("printer", {"n": 2}, api_key=TEST_API_KEY,
                                         timeout=10)
        assert later.status is SUCCEEDED
        final = await orch.get(victim.id, api_key=TEST_API_KEY)
        victim_executions = await orch.executions(victim.id, api_key=TEST_API_KEY)
    assert ran == [blocker.id, later.id]
    assert final.status is CANCELLED
    assert victim_executions == []


async def test_a_running_robot_can_be_cancelled_and_its_module_sees_it(
    storage_url: str,
) -> None:
    started = anyio.Event()
    stopped = anyio.Event()
    saw: list[str] = []

    @module("crawler")
    async def crawler(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        if robot.payload.get("quick"):
            return {"quick": True}
        try:
            await ctx.progress(5, "crawling")
            started.set()
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            saw.append("cancelled")
            raise
        finally:
            stopped.set()
        return {"crawled": True}

    recorder = Recorder()
    async with running_orchestrator(crawler, settings=flow_settings(storage_url),
                                    plugins=[recorder]) as orch:
        robot = await orch.submit("crawler", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await started.wait()
        cancelled = await orch.cancel(robot.id, api_key=TEST_API_KEY)
        assert cancelled.status is CANCELLED
        with anyio.fail_after(10):
            await stopped.wait()
        assert saw == ["cancelled"]
        # Let the worker go round again; nothing it does may change the cancelled robot.
        other = await orch.process_robot("crawler", {"quick": True}, api_key=TEST_API_KEY,
                                         timeout=10)
        assert other.status is SUCCEEDED
        final = await orch.driver.get_robot(robot.id)
        executions = await orch.executions(robot.id, api_key=TEST_API_KEY)
        waited = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=1)
    assert final is not None
    assert (final.status, final.progress, final.result) == (CANCELLED, 5, None)
    assert waited.status is CANCELLED
    assert [e.status for e in executions] == [ExecutionStatus.CANCELLED]
    assert [r.status for r in recorder.of("finished", robot.id)] == [CANCELLED]


async def test_a_module_that_swallows_cancellation_still_ends_cancelled(
    sqlite_url: str,
) -> None:
    started = anyio.Event()
    stopped = anyio.Event()

    @module("stubborn")
    async def stubborn(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        if robot.payload.get("quick"):
            return {"quick": True}
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            pass  # a badly written module: it ignores the cancellation and returns
        finally:
            stopped.set()
        return {"sneaked": "a result"}

    async with running_orchestrator(stubborn, settings=flow_settings(sqlite_url)) as orch:
        robot = await orch.submit("stubborn", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await started.wait()
        await orch.cancel(robot.id, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await stopped.wait()
        # Let the worker go round again; the module's late result must not land.
        other = await orch.process_robot("stubborn", {"quick": True}, api_key=TEST_API_KEY,
                                         timeout=10)
        final = await orch.driver.get_robot(robot.id)
    assert other.status is SUCCEEDED
    assert final is not None
    assert (final.status, final.result) == (CANCELLED, None)


async def test_a_wait_that_finds_its_robot_ended_elsewhere_leaves_no_waiter_behind(
    storage_url: str,
) -> None:
    # An API process (no worker) and a worker on one store: the API's wait reads the robot
    # the worker ended. A waiter left behind per waited robot would grow without end.
    async with Orchestrator(flow_settings(storage_url, worker={"enabled": False})) as api, \
            Orchestrator(flow_settings(storage_url), modules=[echo]):
        for n in range(3):
            robot = await api.process_robot("echo", {"n": n}, api_key=ALICE_KEY, timeout=30)
            assert robot.status is SUCCEEDED
            assert robot.result == {"echo": {"n": n}}
        assert api._waiters == {}


async def test_cancelling_a_finished_robot_is_a_conflict(sqlite_url: str) -> None:
    async with running_orchestrator(echo, settings=flow_settings(sqlite_url)) as orch:
        done = await orch.process_robot("echo", {"x": 1}, api_key=TEST_API_KEY, timeout=10)
        assert done.status is SUCCEEDED
        with pytest.raises(ConflictError) as caught:
            await orch.cancel(done.id, api_key=TEST_API_KEY)
        assert caught.value.status == 409
        after = await orch.get(done.id, api_key=TEST_API_KEY)
    assert (after.status, after.result) == (SUCCEEDED, {"echo": {"x": 1}})


async def test_cancelling_twice_is_a_conflict_the_second_time(sqlite_url: str) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        robot = await orch.submit("echo", {}, api_key=TEST_API_KEY)
        await orch.cancel(robot.id, api_key=TEST_API_KEY)
        with pytest.raises(ConflictError):
            await orch.cancel(robot.id, api_key=TEST_API_KEY)


# == idempotency ==========================================================================


async def test_fifty_concurrent_submissions_with_one_key_create_exactly_one_robot(
    storage_url: str,
) -> None:
    key = "invoice-2024-0042"
    recorder = Recorder()
    async with running_orchestrator(echo, settings=flow_settings(storage_url),
                                    plugins=[recorder]) as orch:
        robots = await _all(*(
            (lambda i=i: orch.submit("echo", {"try": i}, api_key=ALICE_KEY,
                                     idempotency_key=key))
            for i in range(50)
        ))
        assert all(isinstance(r, Robot) for r in robots), [r for r in robots
                                                           if not isinstance(r, Robot)][:3]
        ids = {r.id for r in robots}
        assert len(ids) == 1
        [robot_id] = ids
        done = await orch.wait(robot_id, api_key=ALICE_KEY, timeout=10)
        # The same key later, even after the robot ended, still gives the same robot.
        again = await orch.submit("echo", {"try": "late"}, api_key=ALICE_KEY,
                                  idempotency_key=key)
        listed = (await orch.list(api_key=ALICE_KEY, limit=500)).items
    assert again.id == robot_id
    assert again.status is SUCCEEDED
    assert done.status is SUCCEEDED
    assert [r.id for r in listed] == [robot_id]
    assert len([r for n, r in recorder.events if n == "created"]) == 1


async def test_the_same_key_from_another_principal_is_another_robot(storage_url: str) -> None:
    key = "shared-looking-key"
    settings = flow_settings(storage_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        alices = await orch.submit("echo", {"who": "alice"}, api_key=ALICE_KEY,
                                   idempotency_key=key)
        bobs = await orch.submit("echo", {"who": "bob"}, api_key=BOB_KEY, idempotency_key=key)
        bobs_again = await orch.submit("echo", {}, api_key=BOB_KEY, idempotency_key=key)
    assert alices.id != bobs.id
    assert (alices.owner, bobs.owner) == ("alice", "bob")
    assert bobs_again.id == bobs.id
    assert bobs.payload == {"who": "bob"}


# == tenants ==============================================================================


async def test_tenants_never_see_each_others_robots(storage_url: str) -> None:
    settings = flow_settings(storage_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        alices = [await orch.submit("echo", {"i": i}, api_key=ALICE_KEY) for i in range(3)]
        bobs = await orch.submit("echo", {"mine": True}, api_key=BOB_KEY)
        target = alices[0].id

        with pytest.raises(NotFoundError) as missing:
            await orch.get("01000000-0000-7000-8000-000000000000", api_key=BOB_KEY)
        refusals = []
        for attempt in (
            lambda: orch.get(target, api_key=BOB_KEY),
            lambda: orch.cancel(target, api_key=BOB_KEY),
            lambda: orch.wait(target, api_key=BOB_KEY, timeout=5),
            lambda: orch.executions(target, api_key=BOB_KEY),
        ):
            with pytest.raises(NotFoundError) as caught:
                await attempt()
            refusals.append(caught.value)
        bob_ids = {r.id for r in (await orch.list(api_key=BOB_KEY, limit=500)).items}
        bob_queued = {r.id for r in (await orch.list(api_key=BOB_KEY, status="queued",
                                                     kind="echo", limit=500)).items}
        untouched = await orch.get(target, api_key=ALICE_KEY)
    # 404, exactly like a robot that does not exist: not 403, nothing to learn.
    for refusal in refusals:
        assert refusal.status == 404
        assert type(refusal) is type(missing.value)
        assert set(refusal.to_dict()["error"]) == set(missing.value.to_dict()["error"])
    assert bob_ids == bob_queued == {bobs.id}
    assert untouched.status is QUEUED  # bob's cancel did nothing


async def test_an_admin_principal_sees_every_tenants_robots(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings.from_env(env_file=None, environ={
        "RFMVP_STORAGE_URL": sqlite_url,
        "RFMVP_API_KEYS": f"alice:{ALICE_KEY},bob:{BOB_KEY},root:{ROOT_KEY}",
        "RFMVP_ADMIN_PRINCIPALS": "root",
        "RFMVP_RATE_LIMIT": "none",
        "RFMVP_WORKER_ENABLED": "false",
        "RFMVP_AUDIT_FLUSH_INTERVAL": "0.01",
    })
    async with running_orchestrator(echo, settings=settings) as orch:
        alices = await orch.submit("echo", {}, api_key=ALICE_KEY)
        bobs = await orch.submit("echo", {}, api_key=BOB_KEY)
        seen = {r.id for r in (await orch.list(api_key=ROOT_KEY, limit=500)).items}
        got = await orch.get(alices.id, api_key=ROOT_KEY)
        cancelled = await orch.cancel(bobs.id, api_key=ROOT_KEY)
        alice_sees = {r.id for r in (await orch.list(api_key=ALICE_KEY, limit=500)).items}
    assert seen == {alices.id, bobs.id}
    assert got.owner == "alice"
    assert cancelled.status is CANCELLED
    assert alice_sees == {alices.id}


@pytest.mark.parametrize("count", [23, 25])
async def test_paging_through_the_list_returns_every_robot_exactly_once(
    sqlite_url: str, count: int
) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        mine = []
        for i in range(count):
            mine.append((await orch.submit("echo", {"i": i}, api_key=ALICE_KEY)).id)
            if i % 4 == 0:
                await orch.submit("echo", {"noise": i}, api_key=BOB_KEY)
        seen: list[str] = []
        pages = 0
        cursor = None
        while True:
            page = await orch.list(api_key=ALICE_KEY, limit=5, cursor=cursor)
            pages += 1
            assert len(page.items) <= 5
            seen += [r.id for r in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
            assert pages < 100
    assert len(seen) == len(set(seen)) == count
    assert set(seen) == set(mine)
    assert seen == sorted(mine, reverse=True)  # newest first
    assert pages == -(-count // 5)  # no empty page at the end


# == rate limits and authentication =======================================================


async def test_the_request_over_the_rate_limit_is_refused_with_retry_headers(
    sqlite_url: str,
) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False},
                             security={"rate_limit": RateLimit(5, 60.0)})
    async with running_orchestrator(echo, settings=settings) as orch:
        for i in range(5):
            await orch.submit("echo", {"i": i}, api_key=ALICE_KEY)
        with pytest.raises(RateLimitedError) as caught:
            await orch.submit("echo", {"i": 5}, api_key=ALICE_KEY)
        with pytest.raises(RateLimitedError):
            await orch.list(api_key=ALICE_KEY)  # reads count against the same limit
        # The limit is per principal: bob is not held back by alice.
        await orch.submit("echo", {"bob": True}, api_key=BOB_KEY)
        alices = [r for r in (await orch.list(api_key=ROOT_KEY, limit=500)).items
                  if r.owner == "alice"]
    error = caught.value
    assert error.status == 429
    headers = error.headers()
    assert 1 <= int(headers["Retry-After"]) <= 12  # one more request in 60 s / 5
    assert headers["RateLimit-Limit"] == "5"
    assert headers["RateLimit-Remaining"] == "0"
    assert int(headers["RateLimit-Reset"]) >= 1
    assert error.to_dict()["error"]["type"] == "rate_limited"
    assert len(alices) == 5  # the refused submission created nothing


async def test_a_hundred_concurrent_requests_against_5_a_minute_admit_exactly_5(
    sqlite_url: str, cache_url: str, redis_prefix: str
) -> None:
    settings = flow_settings(sqlite_url, cache_url, redis_prefix, worker={"enabled": False},
                             security={"rate_limit": RateLimit(5, 60.0)})
    async with running_orchestrator(echo, settings=settings) as orch:
        results = await _all(*(
            (lambda i=i: orch.submit("echo", {"i": i}, api_key=ALICE_KEY)) for i in range(100)
        ))
    admitted = [r for r in results if isinstance(r, Robot)]
    refused = [r for r in results if isinstance(r, RateLimitedError)]
    assert (len(admitted), len(refused)) == (5, 95), [r for r in results
                                                      if not isinstance(r, Robot)][:1]


async def test_a_missing_or_invalid_key_is_unauthenticated(sqlite_url: str) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        robot = await orch.submit("echo", {}, api_key=ALICE_KEY)
        calls = []
        for key in (None, "", WRONG_KEY, ALICE_KEY + " ", ALICE_KEY.upper()):
            calls += [
                lambda k=key: orch.submit("echo", {}, api_key=k),
                lambda k=key: orch.get(robot.id, api_key=k),
                lambda k=key: orch.list(api_key=k),
                lambda k=key: orch.cancel(robot.id, api_key=k),
            ]
        for call in calls:
            with pytest.raises(AuthenticationError) as caught:
                await call()
            assert caught.value.status == 401
            assert "WWW-Authenticate" in caught.value.headers()
            assert ALICE_KEY not in str(caught.value)
        listed = (await orch.list(api_key=ROOT_KEY, limit=500)).items
        still = await orch.get(robot.id, api_key=ALICE_KEY)
    assert [r.id for r in listed] == [robot.id]
    assert still.status is QUEUED


async def test_repeated_auth_failures_from_one_address_are_rate_limited(
    sqlite_url: str,
) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False},
                             security={"auth_failure_limit": RateLimit(3, 60.0)})
    guesser, bystander = "198.51.100.7", "198.51.100.8"
    async with running_orchestrator(echo, settings=settings) as orch:
        for i in range(3):
            with pytest.raises(AuthenticationError):
                await orch.get("x", api_key=f"guess-{i}-abcdefgh", client=guesser)
        with pytest.raises(RateLimitedError) as caught:
            await orch.get("x", api_key="guess-4-abcdefgh", client=guesser)
        # Another address is not held back by the guesser's failures.
        with pytest.raises(AuthenticationError):
            await orch.get("x", api_key="typo-abcdefgh", client=bystander)
    assert caught.value.status == 429
    assert int(caught.value.headers()["Retry-After"]) >= 1


# == input sanitization and validation hooks ==============================================


async def test_an_unknown_kind_is_a_validation_error_naming_kind(sqlite_url: str) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        with pytest.raises(ValidationError) as caught:
            await orch.submit("teleport", {}, api_key=ALICE_KEY)
        listed = (await orch.list(api_key=ALICE_KEY)).items
    assert caught.value.status == 422
    assert caught.value.path == "$.kind"
    assert caught.value.to_dict()["error"]["path"] == "$.kind"
    assert "teleport" in caught.value.message
    assert listed == []


@pytest.mark.parametrize("payload", [[1, 2, 3], "a string", 42, None, True, ("a", "b")])
async def test_a_payload_that_is_not_a_json_object_is_refused(
    sqlite_url: str, payload: Any
) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        with pytest.raises(ValidationError) as caught:
            await orch.submit("echo", payload, api_key=ALICE_KEY)
        listed = (await orch.list(api_key=ALICE_KEY)).items
    assert caught.value.status == 422
    assert caught.value.path == "$.payload"
    assert listed == []


async def test_a_validate_robot_hook_can_refuse_a_request(sqlite_url: str) -> None:
    class NoPasswords:
        def __init__(self) -> None:
            self.principals: list[str] = []

        @hookimpl
        def validate_robot(self, kind: str, payload: dict[str, Any],
                           principal: Any) -> str | None:
            self.principals.append(principal.id)
            if "password" in payload:
                return "payloads must not carry passwords; pass a secret reference"
            return None

    plugin = NoPasswords()
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings, plugins=[plugin]) as orch:
        with pytest.raises(ValidationError) as caught:
            await orch.submit("echo", {"user": "a", "password": "hunter2"}, api_key=ALICE_KEY)
        accepted = await orch.submit("echo", {"user": "a", "secret_ref": "vault:x"},
                                     api_key=ALICE_KEY)
        listed = (await orch.list(api_key=ALICE_KEY)).items
    assert caught.value.status == 422
    assert "must not carry passwords" in caught.value.message
    assert "hunter2" not in str(caught.value.to_dict())
    assert [r.id for r in listed] == [accepted.id]
    assert plugin.principals == ["alice", "alice"]


# == audit ================================================================================


async def test_every_request_accepted_or_refused_leaves_an_audit_record_without_keys(
    sqlite_url: str,
) -> None:
    client = "203.0.113.7"
    hold = anyio.Event()

    @module("hold")
    async def hold_module(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        await hold.wait()
        return {}

    settings = flow_settings(sqlite_url, security={"rate_limit": RateLimit(20, 60.0)})
    expected: dict[str, tuple[str, str, str | None]] = {}

    async def attempt(rid: str, action: str, outcome: str, principal: str | None,
                      call: Callable[[], Any]) -> Any:
        expected[rid] = (action, outcome, principal)
        try:
            return await call()
        except Exception as exc:
            return exc

    async with running_orchestrator(echo, hold_module, settings=settings) as orch:
        robot = await attempt("submit-ok", "robots.submit", "created", "alice",
                              lambda: orch.submit("echo", {"a": 1}, api_key=ALICE_KEY,
                                                  idempotency_key="k-1", client=client,
                                                  request_id="submit-ok"))
        await attempt("submit-again", "robots.submit", "existing", "alice",
                      lambda: orch.submit("echo", {"a": 1}, api_key=ALICE_KEY,
                                          idempotency_key="k-1", client=client,
                                          request_id="submit-again"))
        await attempt("submit-wrong-key", "robots.submit", "refused:unauthenticated", None,
                      lambda: orch.submit("echo", {}, api_key=WRONG_KEY, client=client,
                                          request_id="submit-wrong-key"))
        await attempt("submit-no-key", "robots.submit", "refused:unauthenticated", None,
                      lambda: orch.submit("echo", {}, api_key=None, client=client,
                                          request_id="submit-no-key"))
        await attempt("submit-unknown-kind", "robots.submit", "refused:validation_error",
                      "alice", lambda: orch.submit("nope", {}, api_key=ALICE_KEY,
                                                   client=client,
                                                   request_id="submit-unknown-kind"))
        await attempt("submit-not-object", "robots.submit", "refused:validation_error",
                      "alice", lambda: orch.submit("echo", [1], api_key=ALICE_KEY,
                                                   client=client,
                                                   request_id="submit-not-object"))
        await attempt("get-ok", "robots.get", "ok", "alice",
                      lambda: orch.get(robot.id, api_key=ALICE_KEY, client=client,
                                       request_id="get-ok"))
        await attempt("get-other-tenant", "robots.get", "refused:not_found", "bob",
                      lambda: orch.get(robot.id, api_key=BOB_KEY, client=client,
                                       request_id="get-other-tenant"))
        await attempt("list-ok", "robots.list", "ok", "alice",
                      lambda: orch.list(api_key=ALICE_KEY, client=client,
                                        request_id="list-ok"))
        await orch.wait(robot.id, api_key=ALICE_KEY, timeout=10)
        await attempt("cancel-finished", "robots.cancel", "refused:conflict", "alice",
                      lambda: orch.cancel(robot.id, api_key=ALICE_KEY, client=client,
                                          request_id="cancel-finished"))
        held = await attempt("submit-hold", "robots.submit", "created", "alice",
                             lambda: orch.submit("hold", {}, api_key=ALICE_KEY, client=client,
                                                 request_id="submit-hold"))
        await attempt("cancel-ok", "robots.cancel", "cancelled", "alice",
                      lambda: orch.cancel(held.id, api_key=ALICE_KEY, client=client,
                                          request_id="cancel-ok"))
        for i in range(20):
            await attempt(f"flood-{i}", "robots.list", "ok", TEST_PRINCIPAL,
                          lambda rid=f"flood-{i}": orch.list(api_key=TEST_API_KEY,
                                                             client=client, request_id=rid))
        limited = await attempt("flood-refused", "robots.list", "refused:rate_limited",
                                TEST_PRINCIPAL,
                                lambda: orch.list(api_key=TEST_API_KEY, client=client,
                                                  request_id="flood-refused"))
        assert isinstance(limited, RateLimitedError)
        await orch.audit.flush()
        records = await orch.driver.list_audit(after_seq=0, limit=10_000)

    by_request: dict[str, list[Any]] = {}
    for _, event in records:
        by_request.setdefault(event.request_id, []).append(event)
    for rid, (action, outcome, principal) in expected.items():
        assert len(by_request.get(rid, [])) == 1, (rid, by_request.get(rid))
        event = by_request[rid][0]
        assert (event.action, event.outcome, event.principal) == (action, outcome, principal), rid
        assert event.client == client
    assert by_request["submit-ok"][0].target == robot.id
    assert by_request["get-other-tenant"][0].target == robot.id
    assert by_request["submit-wrong-key"][0].details == {"status": 401}
    assert by_request["flood-refused"][0].details == {"status": 429}

    # The chain links every record to the one before it.
    assert verify_chain(records, None) is None

    # No key, and no hash of a key, is anywhere in the audit table.
    with sqlite3.connect(sqlite_path(sqlite_url)) as conn:
        rows = conn.execute("SELECT * FROM audit_log").fetchall()
    raw = "\n".join(repr(row) for row in rows)
    assert len(rows) == len(records)
    for key in (TEST_API_KEY, ALICE_KEY, BOB_KEY, ROOT_KEY, WRONG_KEY):
        digest = hash_key(SECRET_KEY.encode(), key)
        for form in (key, digest.hex(), base64.b64encode(digest).decode(),
                     hashlib.sha256(key.encode()).hexdigest()):
            assert form not in raw


async def test_an_edited_audit_record_breaks_the_chain(sqlite_url: str) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        await orch.submit("echo", {}, api_key=ALICE_KEY, request_id="honest")
        with pytest.raises(AuthenticationError):
            await orch.submit("echo", {}, api_key=WRONG_KEY, request_id="refused")
        await orch.list(api_key=ALICE_KEY, request_id="after")
    with sqlite3.connect(sqlite_path(sqlite_url)) as conn:
        (seq,) = conn.execute("SELECT seq FROM audit_log WHERE request_id = 'refused'"
                              ).fetchone()
        conn.execute("UPDATE audit_log SET outcome = 'created' WHERE seq = ?", (seq,))
    driver = SQLiteDriver(sqlite_url)
    await driver.open()
    try:
        records = await driver.list_audit(after_seq=0, limit=100)
    finally:
        await driver.close()
    assert verify_chain(records, None) == seq


async def test_a_rate_limited_refusal_is_audited_with_the_limited_principal(
    sqlite_url: str,
) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False},
                             security={"rate_limit": RateLimit(1, 60.0)})
    async with running_orchestrator(echo, settings=settings) as orch:
        await orch.list(api_key=ALICE_KEY, request_id="first")
        with pytest.raises(RateLimitedError):
            await orch.list(api_key=ALICE_KEY, request_id="limited")
        await orch.audit.flush()
        records = await orch.driver.list_audit(after_seq=0, limit=100)
    [event] = [e for _, e in records if e.request_id == "limited"]
    assert event.outcome == "refused:rate_limited"
    assert event.principal == "alice"


async def test_listing_modules_and_executions_is_audited_too(sqlite_url: str) -> None:
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        robot = await orch.submit("echo", {}, api_key=ALICE_KEY)
        await orch.audit.flush()
        before = len(await orch.driver.list_audit(after_seq=0, limit=10_000))
        await orch.module_table(api_key=ALICE_KEY)
        await orch.executions(robot.id, api_key=ALICE_KEY)
        with pytest.raises(AuthenticationError):
            await orch.module_table(api_key=WRONG_KEY)
        with pytest.raises(AuthenticationError):
            await orch.executions(robot.id, api_key=WRONG_KEY)
        await orch.audit.flush()
        after = len(await orch.driver.list_audit(after_seq=0, limit=10_000))
    assert after == before + 4


# == observability and plugins ============================================================


async def test_every_step_of_the_flow_is_timed_under_its_operation_name(
    sqlite_url: str,
) -> None:
    async with running_orchestrator(echo, settings=flow_settings(sqlite_url)) as orch:
        robot = await orch.process_robot("echo", {}, api_key=TEST_API_KEY, timeout=10)
        assert robot.status is SUCCEEDED
        operations = set(orch.tracker.operations())
        counts = {name: orch.tracker.stats(name) for name in OPERATIONS}
    assert set(OPERATIONS) <= operations, set(OPERATIONS) - operations
    assert all(stats is not None and stats.count >= 1 for stats in counts.values()), counts


async def test_robot_hooks_fire_on_creation_progress_and_finish(sqlite_url: str) -> None:
    recorder = Recorder()
    async with running_orchestrator(echo, settings=flow_settings(sqlite_url),
                                    plugins=[recorder]) as orch:
        robot = await orch.submit("echo", {"hello": "hooks"}, api_key=TEST_API_KEY)
        finished = await recorder.wait_for("finished", robot.id)
        assert recorder.lifecycle == ["startup"]
    assert recorder.lifecycle == ["startup", "shutdown"]
    names = [n for n, r in recorder.events if r.id == robot.id]
    assert names == ["created", "progress", "finished"]
    created = recorder.of("created", robot.id)[0]
    assert created.status is QUEUED
    assert created.payload == {"hello": "hooks"}
    assert recorder.of("progress", robot.id)[0].progress == 50
    assert finished.status is SUCCEEDED
    assert finished.result == {"echo": {"hello": "hooks"}}


async def test_a_select_module_hook_overrides_the_choice(sqlite_url: str) -> None:
    def translator(name: str) -> Module:
        @module(name, kinds=["translate"])
        async def translate(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
            return {"by": name}
        return translate

    class PreferB:
        def __init__(self) -> None:
            self.offered: list[list[str]] = []

        @hookimpl
        def select_module(self, kind: str, candidates: Any) -> str | None:
            self.offered.append(sorted(c.name for c in candidates))
            return "translate_b" if kind == "translate" else None

    plugin = PreferB()
    async with running_orchestrator(translator("translate_a"), translator("translate_b"),
                                    settings=flow_settings(sqlite_url),
                                    plugins=[plugin]) as orch:
        submitted = [await orch.submit("translate", {"i": i}, api_key=TEST_API_KEY)
                     for i in range(20)]
        done = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=10) for r in submitted]
    assert {r.module for r in submitted} == {"translate_b"}
    assert all(r.status is SUCCEEDED and r.result == {"by": "translate_b"} for r in done)
    assert plugin.offered
    assert all(o == ["translate_a", "translate_b"] for o in plugin.offered)


async def test_a_plugin_named_in_rfmvp_plugins_registers_its_modules_and_hooks(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"rfmvp_flow_plugin_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
        """A plugin a user drops on the path: no registration code at all."""
        from robotframework_mvp import hookimpl, module

        finished = []


        @module("shout", kinds=["shout", "yell"])
        async def shout(robot, ctx):
            await ctx.progress(50)
            return {"text": robot.payload["text"].upper()}


        @module("whisper")
        def whisper(robot, ctx):
            return {"text": robot.payload["text"].lower()}


        @hookimpl
        def on_robot_finished(robot):
            finished.append(robot.id)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        settings = flow_settings(sqlite_url, plugins=(name,))
        async with running_orchestrator(settings=settings) as orch:
            assert {"shout", "whisper"} <= set(orch.modules)
            yelled = await orch.process_robot("yell", {"text": "Hi there"},
                                              api_key=TEST_API_KEY, timeout=10)
            whispered = await orch.process_robot("whisper", {"text": "Hi there"},
                                                 api_key=TEST_API_KEY, timeout=10)
        plugin = sys.modules[name]
        assert (yelled.status, yelled.result) == (SUCCEEDED, {"text": "HI THERE"})
        assert (whispered.status, whispered.result) == (SUCCEEDED, {"text": "hi there"})
        assert yelled.module == "shout"
        assert set(plugin.finished) == {yelled.id, whispered.id}

        # Another orchestrator in the same process knows nothing of that plugin.
        other_settings = flow_settings(f"sqlite:///{tmp_path / 'other.db'}")
        async with running_orchestrator(echo, settings=other_settings) as other:
            assert "shout" not in other.modules
            with pytest.raises(ValidationError):
                await other.submit("yell", {"text": "x"}, api_key=TEST_API_KEY)
    finally:
        sys.modules.pop(name, None)


async def test_a_plugin_that_cannot_be_imported_fails_startup_naming_rfmvp_plugins(
    sqlite_url: str,
) -> None:
    settings = flow_settings(sqlite_url, plugins=("no_such_rfmvp_plugin_module",))
    with pytest.raises(ConfigError, match="RFMVP_PLUGINS"):
        async with running_orchestrator(echo, settings=settings):
            pass  # pragma: no cover


# == shutdown and leases ==================================================================


async def test_shutdown_hands_a_robot_that_outlives_the_grace_period_back_to_the_queue(
    sqlite_url: str,
) -> None:
    started = anyio.Event()
    saw: list[str] = []

    @module("report", timeout=120)
    async def slow_report(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            saw.append("cancelled")
            raise
        return {}

    settings = flow_settings(sqlite_url, worker={"shutdown_grace_seconds": 0.2})
    async with Orchestrator(settings, modules=[slow_report]) as orch:
        robot = await orch.submit("report", {"month": "may"}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await started.wait()

    stored, executions = await _read_store(sqlite_url, robot.id)
    assert stored is not None
    assert stored.status is QUEUED
    assert stored.attempts == 0  # a graceful hand-back is not charged
    assert stored.lease_token is None
    assert [e.status for e in executions] == [ExecutionStatus.RELEASED]
    assert saw == ["cancelled"]

    # The next process on the same store picks it up and finishes it.
    @module("report")
    async def quick_report(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        return {"month": robot.payload["month"], "ready": True}

    async with Orchestrator(settings, modules=[quick_report]) as orch:
        done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
    assert done.status is SUCCEEDED
    assert done.result == {"month": "may", "ready": True}
    assert done.attempts == 1


async def test_shutdown_lets_a_robot_finish_within_the_grace_period(sqlite_url: str) -> None:
    started = anyio.Event()

    @module("brief")
    async def brief(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        started.set()
        await anyio.sleep(0.2)  # the work itself, well inside the grace period
        return {"done": True}

    settings = flow_settings(sqlite_url, worker={"shutdown_grace_seconds": 30.0})
    async with Orchestrator(settings, modules=[brief]) as orch:
        robot = await orch.submit("brief", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await started.wait()

    stored, executions = await _read_store(sqlite_url, robot.id)
    assert stored is not None
    assert (stored.status, stored.result, stored.attempts) == (SUCCEEDED, {"done": True}, 1)
    assert [e.status for e in executions] == [ExecutionStatus.SUCCEEDED]


class HeldCompletions(SQLiteDriver):
    """The real SQLite driver, whose completion writes wait until the test lets them go."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.writing = anyio.Event()
        self.release = anyio.Event()

    async def complete_many(self, completions: Any) -> list[Robot | None]:
        self.writing.set()
        await self.release.wait()
        return await super().complete_many(completions)


async def test_a_slot_frees_when_its_module_returns_while_the_completion_is_written(
    sqlite_url: str,
) -> None:
    driver = HeldCompletions(sqlite_url)

    class Store:
        @hookimpl
        def storage_driver(self, url: str, settings: Settings) -> SQLiteDriver:
            return driver

    ran: list[int] = []
    both_ran = anyio.Event()

    @module("stamp", capacity=1)
    async def stamp(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        ran.append(robot.payload["n"])
        if len(ran) == 2:
            both_ran.set()
        return {"n": robot.payload["n"]}

    settings = flow_settings(sqlite_url, worker={"concurrency": 1})
    async with Orchestrator(settings, modules=[stamp], plugins=[Store()]) as orch:
        first = await orch.submit("stamp", {"n": 1}, api_key=TEST_API_KEY)
        second = await orch.submit("stamp", {"n": 2}, api_key=TEST_API_KEY)
        try:
            with anyio.fail_after(10):
                await driver.writing.wait()
                # The first robot's completion is held; the one slot already runs the next.
                await both_ran.wait()
            assert (await orch.get(first.id, api_key=TEST_API_KEY)).status is RUNNING
        finally:
            driver.release.set()
        done = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=10) for r in (first, second)]
    assert [(r.status, r.result, r.attempts) for r in done] == [
        (SUCCEEDED, {"n": 1}, 1), (SUCCEEDED, {"n": 2}, 1)]
    assert ran == [1, 2]


class HeldAndCountedCompletions(HeldCompletions):
    """HeldCompletions that also counts the completion writes that ran to their end, and
    lets the held one go when the worker hands robots back at its stop."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.written = 0

    async def complete_many(self, completions: Any) -> list[Robot | None]:
        robots = await super().complete_many(completions)
        self.written += 1
        return robots

    async def release_robots(self, leases: Any, now: Any) -> int:
        released = await super().release_robots(leases, now)
        self.release.set()
        return released


def _stamp_store(driver: SQLiteDriver) -> object:
    class Store:
        @hookimpl
        def storage_driver(self, url: str, settings: Settings) -> SQLiteDriver:
            return driver

    return Store()


@module("stamp-once")
async def stamp_once(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"stamped": True}


async def test_cancelling_a_robot_whose_completion_is_being_written_lets_the_write_end(
    sqlite_url: str,
) -> None:
    """The completion is already on its way to the store: the cancel decides there (the
    robot is cancelled, the write finds it so), and the write is never cut off."""
    driver = HeldAndCountedCompletions(sqlite_url)
    async with Orchestrator(flow_settings(sqlite_url), modules=[stamp_once],
                            plugins=[_stamp_store(driver)]) as orch:
        robot = await orch.submit("stamp-once", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await driver.writing.wait()
        cancelled = await orch.cancel(robot.id, api_key=TEST_API_KEY)
        driver.release.set()
        with anyio.fail_after(10):
            while driver.written == 0:  # noqa: ASYNC110 - the driver's own counter
                await anyio.sleep(0.01)
        final = await orch.get(robot.id, api_key=TEST_API_KEY)
    assert cancelled.status is CANCELLED
    assert final.status is CANCELLED
    assert driver.written == 1


async def test_stopping_while_a_completion_is_written_lets_the_write_end(
    sqlite_url: str,
) -> None:
    """A stop after the grace period hands running robots back; a completion already
    being written still ends (it is shielded), after the hand-back, and finds the lease
    gone: the robot is queued again, uncharged, and nothing was cut off mid-write."""
    driver = HeldAndCountedCompletions(sqlite_url)
    settings = flow_settings(sqlite_url, worker={"shutdown_grace_seconds": 0.05})
    async with Orchestrator(settings, modules=[stamp_once],
                            plugins=[_stamp_store(driver)]) as orch:
        robot = await orch.submit("stamp-once", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await driver.writing.wait()
    stored, executions = await _read_store(sqlite_url, robot.id)
    assert driver.written == 1
    assert stored is not None
    assert (stored.status, stored.attempts) == (QUEUED, 0)
    assert [e.status for e in executions] == [ExecutionStatus.RELEASED]


class HeldFinishHook:
    """An on_robot_finished hook that says it began, then waits for ``gate`` to end."""

    def __init__(self) -> None:
        self.entered, self.gate = anyio.Event(), anyio.Event()
        self.finished: list[str] = []

    @hookimpl
    async def on_robot_finished(self, robot: Robot) -> None:
        self.entered.set()
        await self.gate.wait()
        self.finished.append(robot.id)


async def test_stopping_while_a_finished_robot_s_hooks_run_lets_them_end(
    sqlite_url: str,
) -> None:
    """A robot whose completion is written is finished: its on_robot_finished hooks run
    to their end even when the worker stops meanwhile and gives its robots up."""
    hook = HeldFinishHook()

    class GateOnRelease(SQLiteDriver):
        async def release_robots(self, leases: Any, now: Any) -> int:
            hook.gate.set()  # the worker is giving its robots up: the stop is under way
            return await super().release_robots(leases, now)

    driver = GateOnRelease(sqlite_url)
    settings = flow_settings(sqlite_url, worker={"shutdown_grace_seconds": 0.05})
    async with Orchestrator(settings, modules=[stamp_once],
                            plugins=[_stamp_store(driver), hook]) as orch:
        robot = await orch.submit("stamp-once", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await hook.entered.wait()
    assert hook.finished == [robot.id]
    stored, _ = await _read_store(sqlite_url, robot.id)
    assert stored is not None
    assert stored.status is SUCCEEDED


async def test_a_late_progress_report_does_not_cut_off_the_finished_robot_s_hooks(
    sqlite_url: str,
) -> None:
    """A module may leave a task behind that reports progress after the robot ended. The
    report finds the lease gone; it must not cancel the robot's scope, in which the
    finished robot's hooks still run."""
    hook = HeldFinishHook()  # its gate: the late report has been made
    leftovers: list[asyncio.Task[None]] = []

    @module("leaves-a-task")
    async def leaves_a_task(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        async def late() -> None:
            await hook.entered.wait()
            await ctx.progress(90, "after the end")
            hook.gate.set()

        leftovers.append(asyncio.get_running_loop().create_task(late()))
        return {"ok": True}

    async with Orchestrator(flow_settings(sqlite_url), modules=[leaves_a_task],
                            plugins=[hook]) as orch:
        robot = await orch.submit("leaves-a-task", {}, api_key=TEST_API_KEY)
        done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
        with anyio.fail_after(10):
            await hook.gate.wait()
            while not hook.finished:  # noqa: ASYNC110 - the hook's own list
                await anyio.sleep(0.01)
    assert done.status is SUCCEEDED
    assert hook.finished == [robot.id]
    await leftovers[0]


class HeldCreates(SQLiteDriver):
    """The real SQLite driver: notes the robots of each write that creates them (queued,
    or already claimed); the first such write waits until the test lets it go, and a
    write with a robot whose payload says ``refuse`` fails."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.writes: list[list[int]] = []
        self.release = anyio.Event()

    async def _hold(self, robots: Sequence[Robot]) -> None:
        self.writes.append([r.payload["n"] for r in robots])
        if len(self.writes) == 1:
            await self.release.wait()
        if any(r.payload.get("refuse") for r in robots):
            raise ValueError("this store refuses robots that ask for it")

    async def create_robots(self, robots: Any) -> list[tuple[Robot, bool]]:
        await self._hold(robots)
        return await super().create_robots(robots)

    async def create_and_claim_many(self, robots: Any, **kwargs: Any) -> Any:
        await self._hold(robots)
        return await super().create_and_claim_many(robots, **kwargs)


async def _submit_one_by_one_while_the_first_write_is_held(
    sqlite_url: str, payloads: list[dict[str, Any]], worker: dict[str, Any],
) -> tuple[HeldCreates, dict[int, Robot | Exception], dict[int, Robot]]:
    """Submit the first payload; once its write is under way, the others, each on its
    own; let the write go once they all wait for the next. Returns the driver, what each
    submission returned (or raised), and (worker on) each created robot once it ended."""
    driver = HeldCreates(sqlite_url)

    class Store:
        @hookimpl
        def storage_driver(self, url: str, settings: Settings) -> SQLiteDriver:
            return driver

    outcomes: dict[int, Robot | Exception] = {}
    ended: dict[int, Robot] = {}
    settings = flow_settings(sqlite_url, worker=worker)
    async with Orchestrator(settings, modules=[echo], plugins=[Store()]) as orch:

        async def submit(payload: dict[str, Any]) -> None:
            try:
                outcomes[payload["n"]] = await orch.submit("echo", payload,
                                                           api_key=TEST_API_KEY)
            except ValueError as exc:
                outcomes[payload["n"]] = exc

        def queued() -> int:
            return orch.state._creates.queued + orch.state._creates_claimed.queued

        async with anyio.create_task_group() as tg:
            tg.start_soon(submit, payloads[0])
            with anyio.fail_after(10):
                while not driver.writes:  # the first submission's write is under way
                    await anyio.lowlevel.checkpoint()
            for payload in payloads[1:]:
                tg.start_soon(submit, payload)
            with anyio.fail_after(10):
                while queued() < len(payloads) - 1:
                    await anyio.lowlevel.checkpoint()
            driver.release.set()
        for n, outcome in outcomes.items():
            if isinstance(outcome, Robot):
                stored = await orch.driver.get_robot(outcome.id)
                assert stored is not None
                assert stored.payload["n"] == n
                if worker.get("enabled", True):
                    ended[n] = await orch.wait(outcome.id, api_key=TEST_API_KEY, timeout=10)
    return driver, outcomes, ended


async def test_robots_submitted_one_at_a_time_meanwhile_share_one_write(
    sqlite_url: str,
) -> None:
    driver, outcomes, _ = await _submit_one_by_one_while_the_first_write_is_held(
        sqlite_url, [{"n": n} for n in range(20)], worker={"enabled": False})
    assert driver.writes == [[0], list(range(1, 20))]
    assert all(isinstance(o, Robot) and o.status is QUEUED for o in outcomes.values())
    assert len({o.id for o in outcomes.values() if isinstance(o, Robot)}) == 20


async def test_a_robot_the_store_refuses_fails_only_its_own_submission(
    sqlite_url: str,
) -> None:
    payloads: list[dict[str, Any]] = [{"n": n} for n in range(6)]
    payloads[3]["refuse"] = True
    driver, outcomes, _ = await _submit_one_by_one_while_the_first_write_is_held(
        sqlite_url, payloads, worker={"enabled": False})
    # The shared write failed; each robot was then written alone.
    assert driver.writes == [[0], [1, 2, 3, 4, 5], [1], [2], [3], [4], [5]]
    assert isinstance(outcomes[3], ValueError)
    assert all(isinstance(outcomes[n], Robot) for n in (0, 1, 2, 4, 5))


async def test_robots_submitted_to_free_slots_meanwhile_are_created_claimed_in_one_write(
    sqlite_url: str,
) -> None:
    driver, _, ended = await _submit_one_by_one_while_the_first_write_is_held(
        sqlite_url, [{"n": n} for n in range(10)], worker={"concurrency": 20})
    assert driver.writes == [[0], list(range(1, 10))]
    assert [(ended[n].status, ended[n].result, ended[n].attempts) for n in range(10)] == [
        (SUCCEEDED, {"echo": {"n": n}}, 1) for n in range(10)]


async def test_a_robot_the_store_refuses_to_create_claimed_fails_only_its_submission(
    sqlite_url: str,
) -> None:
    payloads: list[dict[str, Any]] = [{"n": n, "refuse": n == 2} for n in range(5)]
    driver, outcomes, ended = await _submit_one_by_one_while_the_first_write_is_held(
        sqlite_url, payloads, worker={"concurrency": 20})
    # The shared write failed; each robot was then written alone.
    assert driver.writes == [[0], [1, 2, 3, 4], [1], [2], [3], [4]]
    assert isinstance(outcomes[2], ValueError)
    assert sorted(ended) == [0, 1, 3, 4]
    assert all(r.status is SUCCEEDED and r.attempts == 1 for r in ended.values())


class CountingClaimedCreates(SQLiteDriver):
    """The real SQLite driver, noting which robots it created already claimed."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.created_claimed: list[str] = []

    async def create_and_claim(self, robot: Robot, **kwargs: Any) -> Any:
        claim = await super().create_and_claim(robot, **kwargs)
        if claim is not None:
            self.created_claimed.append(robot.id)
        return claim


async def test_a_robot_for_a_free_local_slot_is_created_claimed_and_one_for_a_busy_module_queued(
    sqlite_url: str,
) -> None:
    driver = CountingClaimedCreates(sqlite_url)

    class Store:
        @hookimpl
        def storage_driver(self, url: str, settings: Settings) -> SQLiteDriver:
            return driver

    release = anyio.Event()
    blocking = anyio.Event()

    @module("press", capacity=1)
    async def press(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        if robot.payload.get("block"):
            blocking.set()
            await release.wait()
        return {"n": robot.payload.get("n")}

    async with Orchestrator(flow_settings(sqlite_url), modules=[press],
                            plugins=[Store()]) as orch:
        idle = await orch.process_robot("press", {"n": 1}, api_key=TEST_API_KEY, timeout=10)
        blocker = await orch.submit("press", {"block": True}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await blocking.wait()
        queued = await orch.submit("press", {"n": 2}, api_key=TEST_API_KEY)  # no free slot
        assert queued.status is QUEUED
        release.set()
        done = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=10)
                for r in (blocker, queued)]
        executions = [await orch.executions(r.id, api_key=TEST_API_KEY)
                      for r in (idle, blocker, queued)]
    assert [r.status for r in [idle, *done]] == [SUCCEEDED] * 3
    assert [r.attempts for r in [idle, *done]] == [1, 1, 1]
    assert [[e.status for e in ex] for ex in executions] == [[ExecutionStatus.SUCCEEDED]] * 3
    assert driver.created_claimed == [idle.id, blocker.id]


async def _stored_status(url: str, robot_id: str) -> RobotStatus:
    stored, _ = await _read_store(url, robot_id)
    assert stored is not None
    return stored.status


async def test_a_quick_modules_robots_are_claimed_ahead_and_each_runs_once_or_goes_back(
    sqlite_url: str,
) -> None:
    release = anyio.Event()
    blocking = anyio.Event()
    ran: list[int] = []

    @module("stamp", capacity=1)
    async def stamp(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        ran.append(robot.payload["n"])
        if robot.payload.get("block"):
            blocking.set()
            await release.wait()
        return {"n": robot.payload["n"]}

    async def until_running(robots: list[Robot], count: int) -> None:
        with anyio.fail_after(10):
            while [await _stored_status(sqlite_url, r.id) for r in robots].count(RUNNING) \
                    < count:  # noqa: ASYNC110 - the store is the only signal here
                await anyio.sleep(0.01)

    # Robots come from another process (an API orchestrator without a worker): a worker
    # fed by its own process gets them claimed at creation and claims nothing ahead.
    worker_settings = flow_settings(sqlite_url, worker={"concurrency": 1})
    api_settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with Orchestrator(worker_settings, modules=[stamp]) as orch, \
            Orchestrator(api_settings, modules=[stamp]) as api:
        for n in range(25):  # a history of quick attempts: the module now counts as quick
            robot = await api.submit("stamp", {"n": n}, api_key=TEST_API_KEY)
            await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
        blocker = await api.submit("stamp", {"n": 100, "block": True}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await blocking.wait()
        ahead = list(await api.submit_many(
            [SubmitRequest(kind="stamp", payload={"n": 200 + i}) for i in range(AHEAD + 1)],
            api_key=TEST_API_KEY))
        await until_running(ahead, AHEAD)  # the one slot is busy: AHEAD are claimed ahead
        statuses = [await _stored_status(sqlite_url, r.id) for r in ahead]
        assert statuses == [RUNNING] * AHEAD + [QUEUED]
        cancelled = await orch.cancel(ahead[0].id, api_key=TEST_API_KEY)  # waiting, leased
        assert cancelled.status is CANCELLED
        release.set()
        done = [await orch.wait(r.id, api_key=TEST_API_KEY, timeout=10)
                for r in (blocker, *ahead[1:])]
        # Claimed ahead again, then stopped before a slot frees: handed back uncharged.
        release, blocking = anyio.Event(), anyio.Event()
        second = await api.submit("stamp", {"n": 300, "block": True}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await blocking.wait()
        late = list(await api.submit_many(
            [SubmitRequest(kind="stamp", payload={"n": 400 + i}) for i in range(2)],
            api_key=TEST_API_KEY))
        await until_running(late, 2)
        release.set()
        assert (await orch.wait(second.id, api_key=TEST_API_KEY, timeout=10)).status \
            is SUCCEEDED
    assert [r.status for r in done] == [SUCCEEDED] * (AHEAD + 1)
    assert [r.attempts for r in done] == [1] * (AHEAD + 1)
    assert 200 not in ran, "the cancelled robot never ran"
    assert all(ran.count(200 + i) == 1 for i in range(1, AHEAD + 1))
    for robot in late:  # never started here: back in the queue, the attempt not charged,
        stored, executions = await _read_store(sqlite_url, robot.id)  # or run in time
        assert stored is not None
        if robot.payload["n"] in ran:
            assert stored.status is SUCCEEDED
        else:
            assert (stored.status, stored.attempts) == (QUEUED, 0)
            assert [e.status for e in executions] == [ExecutionStatus.RELEASED]


async def test_a_worker_that_lost_its_lease_writes_nothing_more(sqlite_url: str) -> None:
    started = anyio.Event()
    go = anyio.Event()
    stopped = anyio.Event()
    saw: list[str] = []

    @module("courier")
    async def courier(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        try:
            await ctx.progress(10, "picked up")
            started.set()
            await go.wait()
            await ctx.progress(90, "delivered")  # the lease is gone: this must not land
            saw.append("kept going")
            return {"delivered": True}
        except anyio.get_cancelled_exc_class():
            saw.append("cancelled")
            raise
        finally:
            stopped.set()

    recorder = Recorder()
    async with running_orchestrator(courier, settings=flow_settings(sqlite_url),
                                    plugins=[recorder]) as orch:
        robot = await orch.submit("courier", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await started.wait()
        # Behind the worker's back (another process, an operator): the lease is gone.
        taken = await orch.state.cancel(robot.id)
        assert taken is not None
        assert taken.status is CANCELLED
        go.set()
        with anyio.fail_after(10):
            await stopped.wait()
        stored = await orch.driver.get_robot(robot.id)
        executions = await orch.driver.list_executions(robot.id)
    assert saw == ["cancelled"]
    assert stored is not None
    assert (stored.status, stored.progress, stored.progress_message, stored.result) == (
        CANCELLED, 10, "picked up", None)
    assert [e.status for e in executions] == [ExecutionStatus.CANCELLED]
    assert [r.progress for r in recorder.of("progress", robot.id)] == [10]
    assert recorder.of("finished", robot.id) == []


async def test_a_worker_learns_at_its_next_heartbeat_that_its_lease_is_gone(
    sqlite_url: str,
) -> None:
    started = anyio.Event()
    stopped = anyio.Event()

    @module("silent")
    async def silent(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        started.set()
        try:
            await anyio.sleep_forever()  # never reports progress: only heartbeats notice
        finally:
            stopped.set()
        return {"finished": True}

    settings = flow_settings(sqlite_url, worker={"lease_seconds": 0.3})
    async with running_orchestrator(silent, settings=settings) as orch:
        robot = await orch.submit("silent", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(10):
            await started.wait()
        await orch.state.cancel(robot.id)
        with anyio.fail_after(10):
            await stopped.wait()
        stored = await orch.driver.get_robot(robot.id)
    assert stored is not None
    assert (stored.status, stored.result) == (CANCELLED, None)


async def test_requests_that_find_the_module_records_stale_share_one_reload(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a second the balancer's records of other processes' modules turn stale, and
    every request in flight asks for a reload: one read of the store serves them all."""
    async with running_orchestrator(echo, settings=test_settings(sqlite_url)) as orch:
        # The startup health round ends with a reload of its own: let it pass first.
        with anyio.fail_after(10):
            while True:
                if orch.background.iterations.get("health"):
                    break
                await anyio.sleep(0.01)
        reads = 0
        real = orch.state.list_modules

        async def counted() -> Any:
            nonlocal reads
            reads += 1
            return await real()

        monkeypatch.setattr(orch.state, "list_modules", counted)
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(orch.refresh_modules)
        assert reads == 1
        await orch.refresh_modules()  # and the next one, after it, reads again
        assert reads == 2


async def test_a_kind_registered_while_a_reload_is_under_way_is_found_by_the_next_submit(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A submission of a kind it does not know reloads the module records. If a reload
    is already under way, it may have read before another process registered the kind:
    sharing it would refuse the robot, so the submission waits for it and reads again."""
    settings = test_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(settings=settings) as api:
        with anyio.fail_after(10):  # the startup health round's own reload first
            while True:
                if api.background.iterations.get("health"):
                    break
                await anyio.sleep(0.01)
        read_done, gate = anyio.Event(), anyio.Event()
        reads = 0
        real = api.state.list_modules

        async def held_after_reading() -> Any:
            nonlocal reads
            reads += 1
            records = await real()
            read_done.set()
            await gate.wait()
            return records

        monkeypatch.setattr(api.state, "list_modules", held_after_reading)
        robots: list[Robot] = []

        async def submit() -> None:
            robots.append(await api.submit("far", {}, api_key=TEST_API_KEY))

        async with anyio.create_task_group() as tg:
            tg.start_soon(api.refresh_modules)  # a reload that reads before "far" exists
            await read_done.wait()
            await api.state.upsert_modules(
                [ModuleRecord(name="far", kinds=("far",), capacity=2, max_attempts=7)])
            tg.start_soon(submit)
            await anyio.wait_all_tasks_blocked()  # the submission waits for that reload
            gate.set()
    assert reads == 2
    assert [(r.kind, r.module, r.max_attempts) for r in robots] == [("far", "far", 7)]


async def test_a_status_read_from_the_store_never_replaces_a_newer_one_in_the_cache(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cache miss reads the store; if the robot changes while that read is under way
    (its new state written through to the cache), the older state read must not then be
    put in the cache over it."""
    settings = flow_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(echo, settings=settings) as orch:
        first, _ = await orch.submit_many(  # a batch: not in the cache until read
            [SubmitRequest(kind="echo", payload={"n": n}) for n in range(2)],
            api_key=TEST_API_KEY)
        real = orch.state.driver.get_robot

        async def read_then_cancelled(robot_id: str) -> Any:
            stored = await real(robot_id)  # queued, as the store says now...
            await orch.state.cancel(robot_id)  # ...and then the robot changes
            return stored

        monkeypatch.setattr(orch.state.driver, "get_robot", read_then_cancelled)
        assert (await orch.state.get_robot(first.id)).status is RobotStatus.QUEUED
        monkeypatch.setattr(orch.state.driver, "get_robot", real)
        assert (await orch.state.get_robot(first.id)).status is CANCELLED
