"""Event-loop lag: how late the event loop runs a timer that is due.

Everything in a process (HTTP requests, the worker, the background loops) shares one event
loop. A callback that runs long, or a loop with more ready work than it can do, makes
everything that becomes ready meanwhile wait: under load that wait is most of a request's
tail latency, and no step timer sees it. The monitor sleeps ``interval`` over and over
and records how much later than asked it woke up, as Node.js's ``monitorEventLoopDelay``
does. A stall of ``d`` seconds shows up when a wake-up falls inside it, so long stalls
are seen at once and short ones in proportion to how often they happen.
"""

from __future__ import annotations

import anyio

from .performance import OperationMetrics

__all__ = ["LoopLagMonitor"]


class LoopLagMonitor:
    """Samples the loop's lag every ``interval`` seconds into ``metrics`` (ms)."""

    def __init__(self, interval: float, window_size: int = 600) -> None:
        if not interval > 0:
            raise ValueError(f"the loop lag interval must be above 0, got {interval}")
        self.interval = interval
        #: the last ``window_size`` lags (percentiles) and every lag since the start
        #: (histogram, count, sum), in milliseconds
        self.metrics = OperationMetrics("event_loop.lag", window_size)

    @property
    def samples(self) -> int:
        """Lags measured since the monitor started."""
        return self.metrics.count

    async def run(self) -> None:
        """Measure until cancelled (a task of the orchestrator's task group)."""
        interval = self.interval
        while True:
            asked = anyio.current_time() + interval
            await anyio.sleep(interval)
            # Negative (a timer run a hair early, within the clock's resolution) counts as 0.
            self.metrics.record((anyio.current_time() - asked) * 1000.0)
