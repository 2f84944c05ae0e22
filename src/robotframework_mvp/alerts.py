"""AlertMonitor: anomalies in this process's step latencies and error rates, as alerts.

It owns the ``AnomalyDetector`` of an orchestrator and what came out of it: at each
``evaluate()`` (the background loop ``alerts``, every ``RFMVP_ALERT_INTERVAL``) it feeds the
detector the tracker's snapshot plus one ``module.process:<module>`` entry per local
module (each module's own window), keeps the alerts that are active (for ``/metrics`` and
the dashboard) and the last changes, and returns the changes so the caller can fire the
``on_alert`` hook. The detector only reports changes, so each anomaly is announced once
when it starts and once when it ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import attrs

from .balancing import ModuleStats
from .config import PerformanceConfig
from .performance import Alert, AnomalyDetector, OperationStats, PerformanceTracker

__all__ = ["AlertMonitor"]

#: alert changes (starts and ends) kept for the dashboard
HISTORY = 50


class AlertMonitor:
    def __init__(self, tracker: PerformanceTracker, module_stats: Mapping[str, ModuleStats],
                 config: PerformanceConfig) -> None:
        self.tracker = tracker
        self.module_stats = module_stats
        self.detector = AnomalyDetector(
            latency_factor=config.alert_latency_factor,
            error_rate_threshold=config.alert_error_rate,
            min_samples=config.alert_min_samples,
            min_latency_ms=config.alert_min_latency_ms,
        )
        #: every alert change seen, newest last (bounded)
        self.history: deque[Alert] = deque(maxlen=HISTORY)
        #: alerts that started, since the process started
        self.raised = 0

    def snapshot(self) -> dict[str, OperationStats]:
        """What the detector looks at: every step, and every local module on its own."""
        snapshot = self.tracker.snapshot()
        for name, stats in self.module_stats.items():
            if stats.window.count:
                op = f"module.process:{name}"
                snapshot[op] = attrs.evolve(stats.window.stats(), name=op)
        return snapshot

    def evaluate(self) -> list[Alert]:
        """Look once; return the alerts that started or ended since the last look."""
        changes = self.detector.evaluate(self.snapshot())
        self.history.extend(changes)
        self.raised += sum(1 for change in changes if change.active)
        return changes

    def active(self) -> list[Alert]:
        """The alerts active now, sorted by key."""
        return self.detector.active_alerts()

