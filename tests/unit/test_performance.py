"""Specification of the PerformanceTracker, its metrics and the AnomalyDetector."""

from __future__ import annotations

import asyncio
from datetime import UTC

import pytest
from hypothesis import given
from hypothesis import strategies as st

from robotframework_mvp.performance import (
    BUCKETS_MS,
    OPERATIONS,
    Alert,
    AnomalyDetector,
    OperationMetrics,
    OperationStats,
    PerformanceTracker,
)


class FakeCancelled(BaseException):
    """Stands for anyio/asyncio cancellation: a BaseException that is not an Exception."""


# --- OperationMetrics: percentiles, window, cumulative numbers ---------------------------


def test_percentiles_of_1_to_1000_follow_nearest_rank() -> None:
    metrics = OperationMetrics("op", window_size=1000)
    for ms in range(1, 1001):
        metrics.record(float(ms))
    stats = metrics.stats()
    assert (stats.p50_ms, stats.p95_ms, stats.p99_ms) == (500.0, 950.0, 990.0)
    assert stats.max_ms == 1000.0
    assert stats.window_count == 1000


def test_percentile_is_always_one_of_the_samples() -> None:
    metrics = OperationMetrics("op", window_size=10)
    for ms in (1.0, 2.0, 3.0, 4.0):
        metrics.record(ms)
    stats = metrics.stats()
    # nearest rank: ceil(0.5 * 4) = 2nd, ceil(0.95 * 4) = 4th value; no interpolation
    assert (stats.p50_ms, stats.p95_ms, stats.p99_ms) == (2.0, 4.0, 4.0)


def test_percentiles_do_not_depend_on_recording_order() -> None:
    metrics = OperationMetrics("op", window_size=1000)
    for ms in range(1000, 0, -1):
        metrics.record(float(ms))
    assert metrics.stats().p95_ms == 950.0


def test_window_is_bounded_and_percentiles_see_only_the_last_samples() -> None:
    metrics = OperationMetrics("op", window_size=1000)
    for _ in range(99_000):
        metrics.record(1000.0)
    for _ in range(1000):
        metrics.record(1.0)
    stats = metrics.stats()
    assert stats.window_count == 1000
    assert len(metrics.window()) == 1000
    assert stats.p99_ms == 1.0
    assert stats.max_ms == 1.0
    assert stats.count == 100_000


def test_window_lists_the_last_samples_oldest_first() -> None:
    metrics = OperationMetrics("op", window_size=3)
    for ms in (1.0, 2.0, 3.0, 4.0, 5.0):
        metrics.record(ms)
    assert metrics.window() == [3.0, 4.0, 5.0]


def test_count_errors_and_mean_are_cumulative_error_rate_is_windowed() -> None:
    metrics = OperationMetrics("op", window_size=4)
    for _ in range(4):
        metrics.record(10.0, error=True)
    for _ in range(4):
        metrics.record(30.0)
    stats = metrics.stats()
    assert stats.count == 8
    assert stats.errors == 4
    assert stats.mean_ms == 20.0
    assert stats.error_rate == 0.0  # the errors have left the window
    assert stats.p50_ms == 30.0


def test_error_rate_is_the_share_of_errors_in_the_window() -> None:
    metrics = OperationMetrics("op", window_size=10)
    for i in range(10):
        metrics.record(1.0, error=i < 3)
    assert metrics.stats().error_rate == pytest.approx(0.3)


def test_ewma_is_seeded_by_the_first_sample_then_moves_by_alpha() -> None:
    metrics = OperationMetrics("op", ewma_alpha=0.5)
    metrics.record(10.0)
    assert metrics.stats().ewma_ms == 10.0
    metrics.record(20.0)
    assert metrics.stats().ewma_ms == 15.0


def test_negative_and_nan_durations_count_as_zero() -> None:
    metrics = OperationMetrics("op")
    metrics.record(-5.0)
    metrics.record(float("nan"))
    stats = metrics.stats()
    assert stats.count == 2
    assert stats.max_ms == 0.0
    assert stats.mean_ms == 0.0


def test_stats_of_an_empty_metrics_are_zero() -> None:
    stats = OperationMetrics("op").stats()
    assert stats.count == 0
    assert stats.window_count == 0
    assert stats.p99_ms == 0.0


def test_histogram_counts_are_cumulative_per_upper_bound() -> None:
    metrics = OperationMetrics("op", window_size=2)  # the histogram is not windowed
    for ms in (0.05, 0.1, 0.2, 3.0, 3.0, 70_000.0):
        metrics.record(ms)
    buckets, total, total_ms = metrics.histogram()
    assert [bound for bound, _ in buckets] == [float(b) for b in BUCKETS_MS]
    counts = dict(buckets)
    assert counts[0.1] == 2  # upper bounds are inclusive, like Prometheus "le"
    assert counts[0.25] == 3
    assert counts[2.5] == 3
    assert counts[5.0] == 5
    assert counts[60000.0] == 5  # the 70 s sample is only in the implicit +Inf bucket
    assert total == 6
    assert total_ms == pytest.approx(0.05 + 0.1 + 0.2 + 3.0 + 3.0 + 70_000.0)
    cumulative = [count for _, count in buckets]
    assert cumulative == sorted(cumulative)


@given(st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=1, max_size=300))
def test_percentiles_are_ordered_and_within_the_window(durations: list[float]) -> None:
    metrics = OperationMetrics("op", window_size=128)
    for ms in durations:
        metrics.record(ms)
    stats = metrics.stats()
    window = metrics.window()
    assert window == durations[-128:]
    assert min(window) <= stats.p50_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert stats.max_ms == max(window)


@given(st.lists(st.floats(min_value=0.0, max_value=1e5), min_size=1, max_size=200))
def test_histogram_agrees_with_the_samples(durations: list[float]) -> None:
    metrics = OperationMetrics("op", window_size=16)
    for ms in durations:
        metrics.record(ms)
    buckets, total, _ = metrics.histogram()
    assert total == len(durations)
    for bound, count in buckets:
        assert count == sum(1 for ms in durations if ms <= bound)


@pytest.mark.parametrize(("window_size", "alpha"), [(0, 0.1), (10, 0.0), (10, 1.5)])
def test_invalid_settings_are_refused(window_size: int, alpha: float) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        OperationMetrics("op", window_size, alpha)
    with pytest.raises(ValueError):  # noqa: PT011
        PerformanceTracker(window_size, alpha)


# --- PerformanceTracker ------------------------------------------------------------------


def test_operations_are_created_on_first_record_under_any_name() -> None:
    tracker = PerformanceTracker(window_size=8)
    assert tracker.stats("module.process") is None
    assert tracker.metrics("module.process") is None
    tracker.record("module.process", 5.0)
    tracker.record("custom.step", 1.0, error=True)
    assert tracker.operations() == ["custom.step", "module.process"]
    stats = tracker.stats("custom.step")
    assert stats is not None
    assert stats.errors == 1
    metrics = tracker.metrics("module.process")
    assert metrics is not None
    assert metrics.window_size == 8


def test_snapshot_holds_every_operation_sorted_by_name() -> None:
    tracker = PerformanceTracker()
    for name in OPERATIONS:
        tracker.record(name, 1.0)
    snapshot = tracker.snapshot()
    assert list(snapshot) == sorted(OPERATIONS)
    assert all(isinstance(s, OperationStats) for s in snapshot.values())
    assert snapshot["balancer.select"].to_dict()["name"] == "balancer.select"


def test_reset_forgets_everything() -> None:
    tracker = PerformanceTracker()
    tracker.record("op", 1.0)
    tracker.reset()
    assert tracker.operations() == []
    assert tracker.snapshot() == {}


def test_measure_records_a_success() -> None:
    tracker = PerformanceTracker()
    with tracker.measure("op"):
        pass
    stats = tracker.stats("op")
    assert stats is not None
    assert (stats.count, stats.errors) == (1, 0)
    assert stats.max_ms >= 0.0


def test_measure_counts_an_escaping_exception_as_an_error_and_reraises_it() -> None:
    tracker = PerformanceTracker()
    with pytest.raises(KeyError, match="boom"), tracker.measure("op"):
        raise KeyError("boom")
    stats = tracker.stats("op")
    assert stats is not None
    assert (stats.count, stats.errors) == (1, 1)


def test_measure_records_cancellation_but_not_as_an_error() -> None:
    tracker = PerformanceTracker()
    with pytest.raises(FakeCancelled), tracker.measure("op"):
        raise FakeCancelled
    stats = tracker.stats("op")
    assert stats is not None
    assert (stats.count, stats.errors) == (1, 0)


def test_measure_works_around_awaits_and_real_task_cancellation() -> None:
    tracker = PerformanceTracker()

    async def step(entered: asyncio.Event, never: asyncio.Event) -> None:
        with tracker.measure("module.process"):
            entered.set()
            await never.wait()

    async def main() -> None:
        entered, never = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(step(entered, never))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    stats = tracker.stats("module.process")
    assert stats is not None
    assert (stats.count, stats.errors) == (1, 0)


def test_measure_blocks_can_nest() -> None:
    tracker = PerformanceTracker()
    with tracker.measure("outer"), tracker.measure("inner"):
        pass
    assert tracker.operations() == ["inner", "outer"]


# --- AnomalyDetector ---------------------------------------------------------------------


def _stats(
    p95: float, error_rate: float = 0.0, window_count: int = 100, name: str = "module.process"
) -> dict[str, OperationStats]:
    return {name: OperationStats(
        name=name, count=window_count, errors=0, mean_ms=p95, p50_ms=p95, p95_ms=p95,
        p99_ms=p95, ewma_ms=p95, max_ms=p95, window_count=window_count, error_rate=error_rate,
    )}


def test_steady_latency_produces_no_alerts() -> None:
    detector = AnomalyDetector()
    for i in range(100):
        assert detector.evaluate(_stats(10.0 + (i % 3))) == []
    assert detector.active_alerts() == []


def test_a_latency_jump_raises_one_alert_and_one_end_when_it_passes() -> None:
    detector = AnomalyDetector(latency_factor=3.0)
    for _ in range(10):
        assert detector.evaluate(_stats(10.0)) == []

    raised: list[Alert] = []
    for _ in range(100):  # a long anomaly: the baseline must not chase it
        raised += detector.evaluate(_stats(100.0))
    assert len(raised) == 1
    alert = raised[0]
    assert alert.active
    assert (alert.key, alert.operation, alert.kind) == (
        "latency:module.process", "module.process", "latency")
    assert (alert.value, alert.baseline) == (100.0, 10.0)
    assert alert.raised_at.tzinfo is UTC
    assert detector.active_alerts() == [alert]
    assert detector.baseline("module.process") == 10.0

    ended: list[Alert] = []
    for _ in range(10):
        ended += detector.evaluate(_stats(10.0))
    assert len(ended) == 1
    assert not ended[0].active
    assert ended[0].key == "latency:module.process"
    assert detector.active_alerts() == []


def test_the_baseline_follows_slow_drift_without_alerting() -> None:
    detector = AnomalyDetector(latency_factor=3.0, baseline_alpha=0.05)
    p95 = 10.0
    for _ in range(500):
        assert detector.evaluate(_stats(p95)) == []
        p95 *= 1.01  # +1% per evaluation: about 145x in total
    baseline = detector.baseline("module.process")
    assert baseline is not None
    assert baseline > 100.0


def test_an_error_rate_spike_raises_one_alert_and_one_end() -> None:
    detector = AnomalyDetector(error_rate_threshold=0.5)
    assert detector.evaluate(_stats(10.0, error_rate=0.1)) == []
    raised: list[Alert] = []
    for _ in range(20):
        raised += detector.evaluate(_stats(10.0, error_rate=0.8))
    assert len(raised) == 1
    assert raised[0].active
    assert (raised[0].key, raised[0].kind) == ("error_rate:module.process", "error_rate")
    assert (raised[0].value, raised[0].baseline) == (0.8, 0.5)

    ended: list[Alert] = []
    for _ in range(20):
        ended += detector.evaluate(_stats(10.0, error_rate=0.05))
    assert [a.active for a in ended] == [False]
    assert detector.active_alerts() == []


def test_latency_and_error_alerts_are_independent() -> None:
    detector = AnomalyDetector()
    detector.evaluate(_stats(10.0))
    changes = detector.evaluate(_stats(100.0, error_rate=1.0))
    assert sorted(a.key for a in changes) == ["error_rate:module.process",
                                               "latency:module.process"]
    changes = detector.evaluate(_stats(100.0, error_rate=0.0))
    assert [(a.key, a.active) for a in changes] == [("error_rate:module.process", False)]
    assert [a.key for a in detector.active_alerts()] == ["latency:module.process"]


def test_operations_below_min_samples_never_alert() -> None:
    detector = AnomalyDetector(min_samples=50)
    assert detector.evaluate(_stats(10.0, window_count=49)) == []
    for _ in range(10):
        assert detector.evaluate(_stats(1000.0, error_rate=1.0, window_count=49)) == []
    assert detector.baseline("module.process") is None
    assert detector.active_alerts() == []


def test_an_operation_missing_from_the_snapshot_ends_its_alerts() -> None:
    detector = AnomalyDetector()
    detector.evaluate(_stats(10.0))
    assert len(detector.evaluate(_stats(100.0))) == 1
    changes = detector.evaluate({})
    assert [(a.key, a.active) for a in changes] == [("latency:module.process", False)]
    assert detector.baseline("module.process") is None


def test_min_latency_floor_ignores_sub_threshold_jitter() -> None:
    detector = AnomalyDetector(min_latency_ms=1.0)
    detector.evaluate(_stats(0.01))
    assert detector.evaluate(_stats(0.5)) == []  # 50x, but still under 1 ms


def test_detector_works_on_a_real_tracker_snapshot() -> None:
    tracker = PerformanceTracker(window_size=100)
    detector = AnomalyDetector(min_samples=50)
    for _ in range(100):
        tracker.record("module.process", 5.0)
    assert detector.evaluate(tracker.snapshot()) == []
    for _ in range(100):
        tracker.record("module.process", 50.0)
    [alert] = detector.evaluate(tracker.snapshot())
    assert alert.active
    assert alert.to_dict()["key"] == "latency:module.process"


def test_a_tracer_that_records_nothing_costs_no_span_and_a_real_one_gets_each_step() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from robotframework_mvp.tracing import is_noop, start_span

    assert is_noop(trace.NoOpTracer())
    assert start_span(trace.NoOpTracer(), "module.process") is None

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracker = PerformanceTracker(tracer=provider.get_tracer("test"))
    assert tracker.tracer is not None
    assert not is_noop(tracker.tracer)
    with tracker.measure("state.complete_robot"):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["state.complete_robot"]
