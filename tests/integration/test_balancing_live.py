"""Two real modules for one kind, in a real orchestrator: when one turns slow the robots
move to the other within one candidate refresh, and they come back after it recovers.

The slowness is switched on and off with an ``anyio.Event``; each round submits a batch
and waits for every robot to end, so a round's share is exact. The candidates are
rescored every ``RFMVP_CACHE_TTL_MODULE_CHOICE`` (50 ms here).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest

from robotframework_mvp import ModuleContext, Orchestrator, Robot, module
from robotframework_mvp.security.validator import SubmitRequest
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = pytest.mark.anyio

ROUND = 100
slow = anyio.Event()


@module("steady", kinds=["scan"], capacity=30)
async def steady(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    await anyio.sleep(0.002)
    return {}


@module("fickle", kinds=["scan"], capacity=30)
async def fickle(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    await anyio.sleep(0.5 if slow.is_set() else 0.002)
    return {}


async def _round(orch: Orchestrator) -> float:
    """Submit a batch, wait until every robot ended; the share of ``fickle``."""
    robots = await orch.submit_many([SubmitRequest(kind="scan", payload={})] * ROUND,
                                    api_key=TEST_API_KEY)
    with anyio.fail_after(30):
        for robot in robots:
            done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=30)
            assert done.status == "succeeded"
    await anyio.sleep(0.06)  # past one candidate refresh
    return Counter(r.module for r in robots)["fickle"] / ROUND


async def test_robots_move_off_a_module_that_turns_slow_and_back_when_it_recovers(
    sqlite_url: str,
) -> None:
    global slow
    slow = anyio.Event()
    settings = test_settings(sqlite_url, cache={"ttl_module_choice": 0.05},
                             worker={"concurrency": 60},
                             performance={"balancer_min_share": 0.1})
    async with Orchestrator(settings, modules=[steady, fickle]) as orch:
        await orch.background.check_health_once()
        before = [await _round(orch) for _ in range(3)]
        assert 0.25 < sum(before) / 3 < 0.75, before

        slow.set()
        await _round(orch)  # fickle turns slow during this round
        after = await _round(orch)  # one refresh later
        assert after < 0.3, after  # from about half
        stats = orch.module_stats["fickle"]
        assert stats.latency_p95_ms is not None
        assert stats.latency_p95_ms > 400

        # Recovered: the minimum share keeps sending it robots, which prove it is fast.
        global_slow = slow
        slow = anyio.Event()
        assert global_slow.is_set()
        shares = [await _round(orch) for _ in range(12)]
        assert max(shares[-3:]) > 0.3, shares
