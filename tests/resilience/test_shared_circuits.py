"""Circuit states shared through a real Redis: open in one process means open in all,
for the shared open period; then each process goes by its own breaker again."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
import redis.asyncio as aredis

from robotframework_mvp import ModuleContext, Robot, RobotStatus, SubmitRequest, module
from robotframework_mvp.metrics import render_metrics
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis]

OPEN_SECONDS = 1.5


def gate(runs: list[str], broken: list[bool]) -> Any:
    @module("gate", max_attempts=1, capacity=4)
    async def run(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        runs.append(robot.id)
        if broken[0]:
            raise RuntimeError("gate is broken here")
        return {}

    return run


async def test_a_circuit_opened_by_one_process_holds_every_process_until_the_period_ends(
    postgres_url: str, redis_url: str, redis_prefix: str,
) -> None:
    settings = test_settings(
        postgres_url, cache={"url": redis_url, "key_prefix": redis_prefix},
        resilience={"breaker_window": 3, "breaker_minimum_calls": 3,
                    "breaker_open_seconds": OPEN_SECONDS, "breaker_half_open_calls": 1},
        background={"reaper_interval": 0.1})
    runs_a: list[str] = []
    runs_b: list[str] = []
    broken_a, broken_b = [True], [False]
    async with Orchestrator(settings, modules=[gate(runs_a, broken_a)]) as a, \
            Orchestrator(settings, modules=[gate(runs_b, broken_b)]) as b:
        # Robots land in either process; A fails them all until its breaker opens.
        with anyio.fail_after(30):
            while a.circuits.breakers["gate"].state.value != "open":
                await a.process_robot("gate", {}, api_key=TEST_API_KEY, timeout=10)
        opened_at = time.monotonic()

        client = aredis.Redis.from_url(redis_url)
        try:
            raw = await client.get(f"{redis_prefix}circuit:gate")
            ttl = await client.pttl(f"{redis_prefix}circuit:gate")
        finally:
            await client.aclose()
        assert raw is not None, "the opening process published it"
        assert 0 < ttl <= OPEN_SECONDS * 1000
        assert json.loads(raw)["until"] > time.time()

        await b.circuits.refresh_shared(force=True)
        assert b.circuits.breakers["gate"].state.value == "closed", "B counts its own calls"
        assert b.circuits.state("gate") == "open", "... and honours A's open period"
        assert b.circuits.permits("gate") == 0
        health = await b.health()
        assert health["components"]["circuits"]["open"] == ["gate"]
        assert health["components"]["circuits"]["modules"]["gate"]["shared_open_seconds_left"] > 0
        assert 'rfmvp_circuit_state{name="module:gate",state="open"} 1.0' in \
            await render_metrics(b)

        # Robots submitted now wait queued: neither process claims them.
        ran_before = len(runs_a) + len(runs_b)
        waiting = await b.submit_many([SubmitRequest(kind="gate", payload={}) for _ in range(6)],
                                      api_key=TEST_API_KEY)
        await anyio.sleep(0.5)
        assert time.monotonic() - opened_at < OPEN_SECONDS, "the check ran inside the period"
        assert len(runs_a) + len(runs_b) == ran_before
        for robot in waiting:
            assert (await b.get(robot.id, api_key=TEST_API_KEY)).status is RobotStatus.QUEUED

        # A's module is mended; once the shared period ends both take the robots again.
        broken_a[0] = False
        done = [await b.wait(r.id, api_key=TEST_API_KEY, timeout=15) for r in waiting]
        assert all(r.status is RobotStatus.SUCCEEDED for r in done)
        first_run = min(r.started_at for r in done if r.started_at is not None)
        assert (first_run - done[0].created_at).total_seconds() >= 0.3
        assert b.circuits.state("gate") in ("closed", "half_open")
