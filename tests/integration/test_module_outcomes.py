"""How module outcomes and plugins are handled at the edges a user relies on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from robotframework_mvp import (
    AuthenticationError,
    ConfigError,
    ModuleContext,
    PermanentError,
    Principal,
    Robot,
    RobotStatus,
    ValidationError,
    hookimpl,
    module,
)
from robotframework_mvp.models import ModuleRecord
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator, test_settings

pytestmark = pytest.mark.anyio


@module("picky", max_attempts=5)
async def picky(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    raise PermanentError("payload needs a pdf_url")


@module("clock")
async def clock(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"now": datetime.now(UTC)}


@module("echo", capacity=4)
async def echo(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"echo": robot.payload}


async def test_a_permanent_error_fails_the_robot_at_once_without_retrying(
    sqlite_url: str,
) -> None:
    async with running_orchestrator(picky, settings=test_settings(sqlite_url)) as orch:
        robot = await orch.process_robot("picky", {}, api_key=TEST_API_KEY, timeout=10)
        assert robot.status is RobotStatus.FAILED
        assert robot.attempts == 1
        assert robot.error is not None
        assert (robot.error.type, robot.error.message) == ("PermanentError",
                                                           "payload needs a pdf_url")
        assert len(await orch.executions(robot.id, api_key=TEST_API_KEY)) == 1


async def test_a_result_that_is_not_json_fails_the_attempt_not_the_orchestrator(
    sqlite_url: str,
) -> None:
    async with running_orchestrator(clock, echo, settings=test_settings(sqlite_url)) as orch:
        robot = await orch.process_robot("clock", {}, api_key=TEST_API_KEY, timeout=10)
        assert robot.status is RobotStatus.FAILED
        assert robot.error is not None
        assert robot.error.type == "TypeError"
        assert "not JSON" in robot.error.message
        # The orchestrator still runs robots afterwards.
        after = await orch.process_robot("echo", {"ok": 1}, api_key=TEST_API_KEY, timeout=10)
        assert after.status is RobotStatus.SUCCEEDED


async def test_one_failing_observer_does_not_stop_the_others(sqlite_url: str) -> None:
    seen: list[str] = []
    counted = anyio.Event()

    class Broken:
        @hookimpl
        def on_robot_finished(self, robot: Robot) -> None:
            raise RuntimeError("observer bug")

    class Counting:
        @hookimpl
        def on_robot_finished(self, robot: Robot) -> None:
            seen.append(robot.id)
            counted.set()

    async with running_orchestrator(echo, settings=test_settings(sqlite_url),
                                    plugins=[Broken(), Counting()]) as orch:
        robot = await orch.process_robot("echo", {}, api_key=TEST_API_KEY, timeout=10)
        assert robot.status is RobotStatus.SUCCEEDED
        with anyio.fail_after(5):
            await counted.wait()
        assert seen == [robot.id]


async def test_an_async_authenticate_hook_that_declines_lets_the_static_keys_answer(
    sqlite_url: str,
) -> None:
    class TokenService:
        @hookimpl
        async def authenticate(self, credential: str, orchestrator: object) -> Principal | None:
            await anyio.lowlevel.checkpoint()
            if credential == "svc-token-123456":
                return Principal(id="svc", tenant="svc")
            return None

    async with running_orchestrator(echo, settings=test_settings(sqlite_url),
                                    plugins=[TokenService()]) as orch:
        mine = await orch.submit("echo", {}, api_key=TEST_API_KEY)
        theirs = await orch.submit("echo", {}, api_key="svc-token-123456")
        assert (mine.owner, theirs.owner) == ("tester", "svc")
        with pytest.raises(AuthenticationError):
            await orch.submit("echo", {}, api_key="nobody-knows-this-key")


async def test_a_misspelled_hook_name_fails_startup(sqlite_url: str) -> None:
    class Typo:
        @hookimpl
        def on_robot_finishd(self, robot: Robot) -> None:  # sic
            pass

    with pytest.raises(ConfigError, match="on_robot_finishd"):
        async with running_orchestrator(echo, settings=test_settings(sqlite_url),
                                        plugins=[Typo()]):
            pass


async def test_a_claimed_robot_reads_as_running_from_the_cache(sqlite_url: str) -> None:
    release = anyio.Event()
    started = anyio.Event()

    @module("gate")
    async def gate(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {}

    async with running_orchestrator(gate, settings=test_settings(sqlite_url)) as orch:
        robot = await orch.submit("gate", {}, api_key=TEST_API_KEY)
        with anyio.fail_after(5):
            await started.wait()
        hits_before = orch.cache.hits["robot"]
        seen = await orch.get(robot.id, api_key=TEST_API_KEY)
        assert seen.status is RobotStatus.RUNNING
        assert orch.cache.hits["robot"] == hits_before + 1
        release.set()


async def test_a_remote_module_gives_its_recorded_retry_budget(sqlite_url: str) -> None:
    settings = test_settings(sqlite_url, worker={"enabled": False})
    async with running_orchestrator(settings=settings) as api:
        await api.state.upsert_modules(
            [ModuleRecord(name="far", kinds=("far",), capacity=2, max_attempts=7)])
        robot = await api.submit("far", {}, api_key=TEST_API_KEY)
        assert (robot.module, robot.max_attempts) == ("far", 7)


async def test_module_records_nobody_refreshed_for_long_are_ignored(sqlite_url: str) -> None:
    settings = test_settings(sqlite_url, worker={"enabled": False},
                             background={"health_interval": 1.0, "scores_interval": 1.0})
    async with running_orchestrator(settings=settings) as api:
        old = datetime.now(UTC) - timedelta(hours=1)
        await api.driver.upsert_modules(
            [ModuleRecord(name="gone", kinds=("gone",), capacity=1)], old)
        with pytest.raises(ValidationError, match="unknown kind"):
            await api.submit("gone", {}, api_key=TEST_API_KEY)


async def test_readiness_needs_a_module_and_liveness_does_not(sqlite_url: str) -> None:
    from robotframework_mvp.http import HttpApi

    async with running_orchestrator(settings=test_settings(
            sqlite_url, worker={"enabled": False})) as bare:
        api = HttpApi(bare)
        assert (await api.health()).status == 200
        assert (await api.ready()).status == 503
    async with running_orchestrator(echo, settings=test_settings(sqlite_url)) as orch:
        assert (await HttpApi(orch).ready()).status == 200
