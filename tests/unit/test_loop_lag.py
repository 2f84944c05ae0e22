"""The event-loop lag monitor sees the loop held up, by exactly as long as it was."""

from __future__ import annotations

import time

import anyio
import pytest

from robotframework_mvp.loop_lag import LoopLagMonitor

pytestmark = pytest.mark.anyio


async def _samples_beyond(monitor: LoopLagMonitor, count: int) -> None:
    with anyio.fail_after(5):
        while monitor.samples <= count:  # noqa: ASYNC110 - the monitor's own counter
            await anyio.sleep(0.001)


@pytest.mark.parametrize("block_ms", [30, 80])
async def test_a_blocked_loop_shows_up_as_lag_as_long_as_the_block(block_ms: int) -> None:
    monitor = LoopLagMonitor(interval=0.001)
    async with anyio.create_task_group() as tg:
        tg.start_soon(monitor.run)
        await _samples_beyond(monitor, 2)
        before = monitor.samples
        # The monitor's timer falls due within 1 ms; the loop cannot run it until the
        # block ends, so its next sample is at least the block minus that millisecond.
        time.sleep(block_ms / 1000)  # noqa: ASYNC251 - blocking the loop is the point
        await _samples_beyond(monitor, before)
        tg.cancel_scope.cancel()
    assert monitor.metrics.stats().max_ms >= block_ms - 1
    _, count, total_ms = monitor.metrics.histogram()
    assert count == monitor.samples
    assert total_ms >= block_ms - 1


def test_an_interval_that_is_not_above_zero_is_refused() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="above 0"):
            LoopLagMonitor(interval=bad)
