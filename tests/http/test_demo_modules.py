"""The demo modules the example servers run (``examples/modules/demo.py``)."""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import pytest

from modules import demo
from robotframework_mvp import Principal, Robot, hookimpl
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator

pytestmark = pytest.mark.anyio
PRINCIPAL = Principal(id="p", tenant="p")


class ProgressLog:
    def __init__(self) -> None:
        self.seen: list[tuple[float, float, str | None]] = []

    @hookimpl
    def on_robot_progress(self, robot: Robot) -> None:
        self.seen.append((time.monotonic(), robot.progress, robot.progress_message))


async def test_sleep_reports_progress_at_least_every_half_second() -> None:
    log = ProgressLog()
    async with running_orchestrator(demo.echo, demo.sleep, plugins=[log]) as orch:
        started = time.monotonic()
        robot = await orch.process_robot("sleep", {"seconds": 1.2}, api_key=TEST_API_KEY,
                                         timeout=10)
    assert robot.status == "succeeded"
    assert robot.result == {"slept": 1.2}
    assert robot.progress == 100
    assert robot.progress_message == "slept 1.2 of 1.2 s"
    times = [started] + [t for t, _, _ in log.seen]
    assert max(b - a for a, b in itertools.pairwise(times)) <= 0.5 + 0.2
    assert [p for _, p, _ in log.seen] == sorted(p for _, p, _ in log.seen)
    assert log.seen[-1][1:] == (100, "slept 1.2 of 1.2 s")
    assert all(m and m.startswith("slept ") and m.endswith(" of 1.2 s") for _, _, m in log.seen)


async def test_echo_and_zero_second_sleep() -> None:
    async with running_orchestrator(demo.echo, demo.sleep) as orch:
        echoed = await orch.process_robot("echo", {"a": [1, {"b": None}]}, api_key=TEST_API_KEY)
        slept = await orch.process_robot("sleep", {"seconds": 0}, api_key=TEST_API_KEY)
    assert echoed.result == {"echo": {"a": [1, {"b": None}]}}
    assert slept.result == {"slept": 0}
    assert slept.progress == 100


@pytest.mark.parametrize("seconds", [-1, 3600.5, "5", True, None, math.nan, [1]])
def test_sleep_refuses_a_bad_duration(seconds: Any) -> None:
    message = demo.validate_robot("sleep", {"seconds": seconds}, PRINCIPAL)
    assert message is not None
    assert "payload.seconds must be a number from 0 to 3600" in message
    with pytest.raises(ValueError, match="from 0 to 3600"):
        demo._seconds({"seconds": seconds})


@pytest.mark.parametrize("seconds", [0, 0.5, 1, 3600])
def test_sleep_accepts_a_good_duration(seconds: float) -> None:
    assert demo.validate_robot("sleep", {"seconds": seconds}, PRINCIPAL) is None
    assert demo.validate_robot("echo", {"anything": "goes"}, PRINCIPAL) is None
