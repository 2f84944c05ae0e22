"""Specification of AlertMonitor: anomalies in step latencies and error rates become alerts,
announced once when they start and once when they end, from synthetic tracker records."""

from __future__ import annotations

from robotframework_mvp.alerts import AlertMonitor
from robotframework_mvp.balancing import ModuleStats
from robotframework_mvp.config import PerformanceConfig
from robotframework_mvp.performance import PerformanceTracker


def _monitor(**config: float) -> tuple[AlertMonitor, PerformanceTracker, dict[str, ModuleStats]]:
    tracker = PerformanceTracker(window_size=100, tracer=None)
    stats = {"ocr": ModuleStats()}
    cfg = PerformanceConfig(alert_min_samples=20, **config)  # type: ignore[arg-type]
    return AlertMonitor(tracker, stats, cfg), tracker, stats


def _feed(tracker: PerformanceTracker, operation: str, ms: float, n: int = 100,
          error: bool = False) -> None:
    for _ in range(n):
        tracker.record(operation, ms, error)


def test_a_latency_anomaly_is_raised_once_kept_active_then_cleared() -> None:
    monitor, tracker, _ = _monitor()
    _feed(tracker, "state.create_robot", 5.0)
    assert monitor.evaluate() == []  # the first look sets the baseline
    _feed(tracker, "state.create_robot", 50.0)
    raised = monitor.evaluate()
    assert [(a.key, a.active) for a in raised] == [("latency:state.create_robot", True)]
    assert raised[0].value == 50.0
    assert raised[0].baseline == 5.0
    # Still anomalous: no new alert (deduplicated), still listed as active.
    assert monitor.evaluate() == []
    assert [a.key for a in monitor.active()] == ["latency:state.create_robot"]
    _feed(tracker, "state.create_robot", 5.0)
    cleared = monitor.evaluate()
    assert [(a.key, a.active) for a in cleared] == [("latency:state.create_robot", False)]
    assert monitor.active() == []
    assert monitor.raised == 1
    assert [a.active for a in monitor.history] == [True, False]


def test_an_error_rate_anomaly_is_raised_and_cleared() -> None:
    monitor, tracker, _ = _monitor(alert_error_rate=0.3)
    _feed(tracker, "module.process", 1.0, n=60)
    _feed(tracker, "module.process", 1.0, n=40, error=True)
    assert [(a.key, a.active) for a in monitor.evaluate()] == [
        ("error_rate:module.process", True)]
    _feed(tracker, "module.process", 1.0)
    assert [(a.key, a.active) for a in monitor.evaluate()] == [
        ("error_rate:module.process", False)]


def test_each_local_module_is_watched_on_its_own() -> None:
    monitor, _, stats = _monitor()
    for _ in range(100):
        stats["ocr"].record(True, 40.0)
    monitor.evaluate()
    for _ in range(100):
        stats["ocr"].record(False, 400.0)
    keys = sorted((a.key, a.active) for a in monitor.evaluate())
    assert keys == [("error_rate:module.process:ocr", True),
                    ("latency:module.process:ocr", True)]


def test_sub_floor_latencies_never_alert() -> None:
    monitor, tracker, _ = _monitor(alert_min_latency_ms=1.0)
    _feed(tracker, "balancer.select", 0.01)
    monitor.evaluate()
    _feed(tracker, "balancer.select", 0.5)  # 50x, but under a millisecond
    assert monitor.evaluate() == []
