"""Waits for robots that run in another process: the deployed shape of an API process.

Two orchestrators share one PostgreSQL and one Redis: an API process (worker off) and a
worker process. The API process's store polls are pushed out of reach (``_WAIT_POLL``),
so a wait that returns a finished robot can only have heard it end. Nothing here
sleeps and hopes: each test waits on an observable condition under ``fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio

from robotframework_mvp import ModuleContext, Orchestrator, Robot, RobotStatus, module
from robotframework_mvp import orchestrator as orchestrator_module
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

#: a robot of kind "hold" runs until the test sets this event
RELEASE: dict[str, anyio.Event] = {}


@module("quick", kinds=["quick"], capacity=4)
async def quick(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
    return {"done": True}


@module("hold", kinds=["hold"], capacity=4)
async def hold(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
    await RELEASE[robot.payload["name"]].wait()
    return {"released": True}


@pytest.fixture
async def api_and_worker(
    postgres_url: str, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Orchestrator, Orchestrator]]:
    # Polls far beyond every deadline below: only an announcement can end a wait early.
    monkeypatch.setattr(orchestrator_module, "_WAIT_POLL", (300.0, 300.0))
    cache = {"url": redis_url, "key_prefix": redis_prefix}
    async with Orchestrator(test_settings(postgres_url, cache=cache), modules=[quick, hold],
                            ) as worker, \
            Orchestrator(test_settings(postgres_url, cache=cache, worker={"enabled": False}),
                         modules=[quick, hold]) as api:
        yield api, worker


async def test_a_wait_on_an_api_process_answers_as_soon_as_the_robot_ends_elsewhere(
    api_and_worker: tuple[Orchestrator, Orchestrator],
) -> None:
    api, _ = api_and_worker
    with anyio.fail_after(20):
        for _ in range(5):
            robot = await api.process_robot("quick", {}, api_key=TEST_API_KEY, timeout=60)
            assert robot.status is RobotStatus.SUCCEEDED
            assert robot.result == {"done": True}
    assert api.remote_ends.subscribed
    assert api.remote_ends.ids_heard >= 5
    assert api.wait_answers["heard"] == 5
    assert api.wait_answers["polled"] == api.wait_answers["here"] == 0
    # A status read on the API process shows the end too: the API process's own cached
    # "queued", written behind, never replaced the worker's "succeeded".
    assert (await api.get(robot.id, api_key=TEST_API_KEY)).status is RobotStatus.SUCCEEDED


async def test_waits_still_answer_after_the_subscription_lost_its_connection(
    api_and_worker: tuple[Orchestrator, Orchestrator], redis_url: str,
) -> None:
    api, _ = api_and_worker
    RELEASE["after-kill"] = anyio.Event()
    robot = await api.submit("hold", {"name": "after-kill"}, api_key=TEST_API_KEY)
    result: list[Robot] = []

    async def wait() -> None:
        result.append(await api.wait(robot.id, api_key=TEST_API_KEY, timeout=60))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            while not api.remote_ends.subscribed:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            killer = redis.asyncio.Redis.from_url(redis_url)
            try:
                assert await killer.client_kill_filter(_type="pubsub") >= 1
            finally:
                await killer.aclose()
            while api.remote_ends.subscriptions < 2:  # noqa: ASYNC110 (subscribed again)
                await anyio.sleep(0.01)
            RELEASE["after-kill"].set()
    assert result[0].status is RobotStatus.SUCCEEDED
    assert result[0].result == {"released": True}


async def test_a_wait_on_a_robot_this_process_runs_needs_no_subscription(
    postgres_url: str, redis_url: str, redis_prefix: str,
) -> None:
    settings = test_settings(postgres_url, cache={"url": redis_url, "key_prefix": redis_prefix})
    async with Orchestrator(settings, modules=[quick]) as orch:
        robot = await orch.process_robot("quick", {}, api_key=TEST_API_KEY, timeout=10)
        assert robot.status is RobotStatus.SUCCEEDED
        assert orch.remote_ends.subscriptions == 0
        assert orch.wait_answers["here"] == 1
