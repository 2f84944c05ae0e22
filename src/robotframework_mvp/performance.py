"""Latency and error tracking for each step of the request flow, and anomaly detection.

This module owns the in-process performance numbers: ``PerformanceTracker`` records how
long each named operation took (``OPERATIONS`` lists the stable names of the request flow,
but any name can be recorded) into fixed-memory sliding windows (``OperationMetrics``),
from which ``OperationStats`` snapshots (cumulative count, errors and mean; windowed
percentiles, max and error rate; an EWMA) and Prometheus-style cumulative histograms are
computed only when asked; and ``AnomalyDetector`` turns successive snapshots into
deduplicated ``Alert`` changes (start and end of a latency or error-rate anomaly).
Recording is meant for the event-loop thread only: it takes no lock and costs about a
microsecond, so it can sit on the hot path.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from time import perf_counter
from types import TracebackType
from typing import Any, Literal

import attrs

from .tracing import SpanScope, Tracer, default_tracer, record_span, start_span
from .tracing import refresh as refresh_tracing

__all__ = [
    "BUCKETS_MS",
    "OPERATIONS",
    "Alert",
    "AlertKind",
    "AnomalyDetector",
    "OperationMetrics",
    "OperationStats",
    "PerformanceTracker",
]

OPERATIONS: tuple[str, ...] = (
    "security.validate",
    "balancer.select",
    "state.create_robot",
    "state.start_execution",
    "module.process",
    "state.update_progress",
    "state.complete_robot",
)
"""The stable operation names of the request flow, in the order a request meets them."""

BUCKETS_MS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500,
    1000, 2500, 5000, 10000, 30000, 60000,
)
"""Upper bounds (inclusive, in ms) of the histogram buckets; ``+Inf`` is implicit."""

AlertKind = Literal["latency", "error_rate"]


def _nearest_rank(ordered: list[float], percent: int) -> float:
    """The nearest-rank percentile of ``ordered`` (ascending, non-empty).

    The value at 1-based rank ``ceil(percent / 100 * n)``: always one of the samples, never
    an interpolation, so 1..1000 gives exactly p50 = 500, p95 = 950 and p99 = 990.
    """
    n = len(ordered)
    rank = -(-percent * n // 100)  # integer ceil, no float rounding surprises
    return ordered[max(rank, 1) - 1]


@attrs.frozen
class OperationStats:
    """A point-in-time summary of one operation.

    ``count``, ``errors`` and ``mean_ms`` cover everything since start (or reset);
    ``p50_ms``/``p95_ms``/``p99_ms`` (nearest-rank), ``max_ms``, ``window_count`` and
    ``error_rate`` cover the sliding window of the last ``window_size`` samples only;
    ``ewma_ms`` is the exponentially weighted moving average of all samples.
    """

    name: str
    count: int
    errors: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    ewma_ms: float
    max_ms: float
    window_count: int
    error_rate: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return attrs.asdict(self)


class OperationMetrics:
    """The recorded samples of one operation, in fixed memory.

    Two ring buffers hold the last ``window_size`` durations (ms, ``array('d')``) and error
    flags (``bytearray``); cumulative count, errors and sum, the EWMA and the per-bucket
    histogram counts are plain counters. ``record`` is O(log buckets); percentiles are
    computed by ``stats`` by sorting a copy of the window, only when asked.
    """

    __slots__ = (
        "_alpha",
        "_buckets",
        "_count",
        "_durations",
        "_errors",
        "_ewma",
        "_flags",
        "_name",
        "_pos",
        "_size",
        "_sum",
        "_window_errors",
    )

    def __init__(self, name: str, window_size: int = 4096, ewma_alpha: float = 0.1) -> None:
        if window_size < 1:
            raise ValueError("window_size must be at least 1")
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError("ewma_alpha must be above 0 and at most 1")
        self._name = name
        self._size = window_size
        self._alpha = ewma_alpha
        self._durations = array("d", bytes(8 * window_size))
        self._flags = bytearray(window_size)
        self._pos = 0
        self._window_errors = 0
        self._count = 0
        self._errors = 0
        self._sum = 0.0
        self._ewma = 0.0
        # Non-cumulative counts per bucket; the last slot is the implicit +Inf bucket.
        self._buckets = [0] * (len(BUCKETS_MS) + 1)

    @property
    def name(self) -> str:
        return self._name

    @property
    def window_size(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        """Samples recorded since creation."""
        return self._count

    @property
    def errors(self) -> int:
        """Error samples recorded since creation."""
        return self._errors

    @property
    def total_ms(self) -> float:
        """Sum of all durations recorded since creation."""
        return self._sum

    @property
    def ewma_ms(self) -> float:
        """EWMA of all durations; the first sample seeds it (0.0 before any sample)."""
        return self._ewma

    @property
    def window_count(self) -> int:
        """Samples currently in the sliding window."""
        return min(self._count, self._size)

    def record(self, duration_ms: float, error: bool = False) -> None:
        """Add one sample. Negative or NaN durations are recorded as 0.0."""
        if not duration_ms >= 0.0:
            duration_ms = 0.0
        pos = self._pos
        flag = 1 if error else 0
        self._window_errors += flag - self._flags[pos]
        self._flags[pos] = flag
        self._durations[pos] = duration_ms
        pos += 1
        self._pos = 0 if pos == self._size else pos
        if self._count:
            self._ewma += self._alpha * (duration_ms - self._ewma)
        else:
            self._ewma = duration_ms
        self._count += 1
        self._errors += flag
        self._sum += duration_ms
        self._buckets[bisect_left(BUCKETS_MS, duration_ms)] += 1

    def window(self) -> list[float]:
        """The durations in the window, oldest first."""
        if self._count < self._size:
            return self._durations[: self._count].tolist()
        pos = self._pos
        return self._durations[pos:].tolist() + self._durations[:pos].tolist()

    def stats(self) -> OperationStats:
        """Summarize; percentiles are nearest-rank over the window (see ``_nearest_rank``)."""
        n = self.window_count
        if n == 0:
            return OperationStats(
                name=self._name, count=0, errors=0, mean_ms=0.0, p50_ms=0.0, p95_ms=0.0,
                p99_ms=0.0, ewma_ms=0.0, max_ms=0.0, window_count=0, error_rate=0.0,
            )
        ordered = sorted(self._durations[:n])  # order in the window does not matter here
        return OperationStats(
            name=self._name,
            count=self._count,
            errors=self._errors,
            mean_ms=self._sum / self._count,
            p50_ms=_nearest_rank(ordered, 50),
            p95_ms=_nearest_rank(ordered, 95),
            p99_ms=_nearest_rank(ordered, 99),
            ewma_ms=self._ewma,
            max_ms=ordered[-1],
            window_count=n,
            error_rate=self._window_errors / n,
        )

    def histogram(self) -> tuple[list[tuple[float, int]], int, float]:
        """Cumulative counts per ``BUCKETS_MS`` upper bound, total count and total sum (ms).

        Cover all samples since creation, as Prometheus histograms do. ``+Inf`` is not in
        the list: its cumulative count is the total count, which the caller adds.
        """
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, bucket_count in zip(BUCKETS_MS, self._buckets, strict=False):
            running += bucket_count
            cumulative.append((float(bound), running))
        return cumulative, self._count, self._sum


class _Measure:
    """Times one ``with`` block and records it; an escaping ``Exception`` is an error.

    A ``BaseException`` that is not an ``Exception`` (task cancellation, ``KeyboardInterrupt``
    ...) is recorded with its duration but not counted as an error. Never suppresses.
    With a tracer, the block also runs in an OpenTelemetry span named after the operation.
    """

    __slots__ = ("_operation", "_span", "_start", "_tracker")

    def __init__(self, tracker: PerformanceTracker, operation: str) -> None:
        self._tracker = tracker
        self._operation = operation
        self._start = 0.0
        self._span: SpanScope | None = None

    def __enter__(self) -> None:
        tracer = self._tracker.tracer
        if tracer is not None:
            self._span = start_span(tracer, self._operation)
        self._start = perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._tracker.record(
            self._operation, (perf_counter() - self._start) * 1000.0, isinstance(exc, Exception)
        )
        if self._span is not None:
            self._span.close(exc)


class PerformanceTracker:
    """Per-operation ``OperationMetrics``, created on first record of each name.

    Not thread-safe by design: only the event-loop thread records. Memory is
    ``window_size * 9`` bytes plus a few hundred per operation name, so names should come
    from a bounded set such as ``OPERATIONS``.
    """

    def __init__(self, window_size: int = 4096, ewma_alpha: float = 0.1, *,
                 tracer: Tracer | Literal["default"] | None = "default") -> None:
        if window_size < 1:
            raise ValueError("window_size must be at least 1")
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError("ewma_alpha must be above 0 and at most 1")
        self._window_size = window_size
        self._ewma_alpha = ewma_alpha
        self._metrics: dict[str, OperationMetrics] = {}
        #: OpenTelemetry tracer for one span per measured step: by default the global one
        #: when opentelemetry-api is installed (see ``tracing``), None to trace nothing
        self.tracer: Tracer | None = default_tracer() if isinstance(tracer, str) else tracer
        refresh_tracing()  # a provider set since the last tracker was built counts at once

    @property
    def window_size(self) -> int:
        return self._window_size

    @property
    def ewma_alpha(self) -> float:
        return self._ewma_alpha

    def record(self, operation: str, duration_ms: float, error: bool = False) -> None:
        """Add one sample of ``operation`` (its duration in ms, and whether it failed)."""
        metrics = self._metrics.get(operation)
        if metrics is None:
            metrics = self._metrics[operation] = OperationMetrics(
                operation, self._window_size, self._ewma_alpha
            )
        metrics.record(duration_ms, error)

    def measure(self, operation: str) -> AbstractContextManager[None]:
        """``with tracker.measure("module.process"): ...`` times the block (awaits included).

        With a tracer, the block runs in a span named ``operation``. An escaping
        ``Exception`` is recorded as an error and propagates; cancellation (any
        ``BaseException`` that is not an ``Exception``) is recorded, not as an error, and
        propagates.
        """
        return _Measure(self, operation)

    def record_span(self, operation: str, start_ns: int, end_ns: int, *, error: bool = False,
                    attributes: dict[str, Any] | None = None) -> None:
        """With a tracer, a finished span for a step timed by hand (``time.time_ns()``)."""
        if self.tracer is not None:
            record_span(self.tracer, operation, start_ns, end_ns, error=error,
                        attributes=attributes)

    def stats(self, operation: str) -> OperationStats | None:
        """The stats of ``operation``, or None if it was never recorded."""
        metrics = self._metrics.get(operation)
        return None if metrics is None else metrics.stats()

    def snapshot(self) -> dict[str, OperationStats]:
        """The stats of every recorded operation, keyed and ordered by name."""
        return {name: self._metrics[name].stats() for name in sorted(self._metrics)}

    def operations(self) -> list[str]:
        """The names of every recorded operation, sorted."""
        return sorted(self._metrics)

    def metrics(self, operation: str) -> OperationMetrics | None:
        """The raw metrics of ``operation`` (for histograms), or None if never recorded."""
        return self._metrics.get(operation)

    def reset(self) -> None:
        """Forget every operation and sample."""
        self._metrics.clear()


@attrs.frozen
class Alert:
    """A change in an anomaly: it started (``active``) or ended (``not active``).

    ``key`` is ``"<kind>:<operation>"``. For ``latency`` alerts ``value`` is the window p95
    and ``baseline`` the baseline p95 (ms); for ``error_rate`` alerts ``value`` is the window
    error rate and ``baseline`` the threshold. ``raised_at`` is when this change was seen.
    """

    key: str
    operation: str
    kind: AlertKind
    active: bool
    message: str
    value: float
    baseline: float
    raised_at: datetime

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; ``raised_at`` as ISO 8601."""
        return {
            "key": self.key,
            "operation": self.operation,
            "kind": self.kind,
            "active": self.active,
            "message": self.message,
            "value": self.value,
            "baseline": self.baseline,
            "raised_at": self.raised_at.isoformat(),
        }


def _ms(value: float) -> str:
    return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"


class AnomalyDetector:
    """Turns successive snapshots into alert changes. Pure logic: no I/O, no timers.

    Latency: each operation has a baseline, an EWMA (``baseline_alpha``) of its past window
    p95 values, seeded by the first evaluation that sees it with enough samples. A latency
    anomaly starts when p95 > ``latency_factor`` x baseline (and p95 > ``min_latency_ms``,
    a floor against alerting on sub-millisecond jitter; 0 by default) and ends when it no
    longer is. The baseline is updated only while no latency alert is active, so it does
    not chase the anomaly.

    Errors: an error-rate anomaly starts when the window error rate >=
    ``error_rate_threshold`` and ends when it drops below.

    Operations with fewer than ``min_samples`` samples in their window are skipped (their
    state is kept as it is). Operations absent from a snapshot (e.g. after a tracker reset)
    have their active alerts ended and their baseline forgotten.
    """

    def __init__(
        self,
        latency_factor: float = 3.0,
        error_rate_threshold: float = 0.5,
        min_samples: int = 50,
        baseline_alpha: float = 0.05,
        *,
        min_latency_ms: float = 0.0,
    ) -> None:
        if not latency_factor > 0.0:
            raise ValueError("latency_factor must be above 0")
        if not 0.0 < error_rate_threshold <= 1.0:
            raise ValueError("error_rate_threshold must be above 0 and at most 1")
        if min_samples < 1:
            raise ValueError("min_samples must be at least 1")
        if not 0.0 < baseline_alpha <= 1.0:
            raise ValueError("baseline_alpha must be above 0 and at most 1")
        if not min_latency_ms >= 0.0:
            raise ValueError("min_latency_ms must be 0 or more")
        self.latency_factor = latency_factor
        self.error_rate_threshold = error_rate_threshold
        self.min_samples = min_samples
        self.baseline_alpha = baseline_alpha
        self.min_latency_ms = min_latency_ms
        self._baselines: dict[str, float] = {}
        self._active: dict[str, Alert] = {}

    def baseline(self, operation: str) -> float | None:
        """The current latency baseline (p95, ms) of ``operation``, if it has one."""
        return self._baselines.get(operation)

    def active_alerts(self) -> list[Alert]:
        """The alerts currently active (each as it was raised), sorted by key."""
        return [self._active[key] for key in sorted(self._active)]

    def reset(self) -> None:
        """Forget every baseline and active alert (without reporting them as ended)."""
        self._baselines.clear()
        self._active.clear()

    def evaluate(self, snapshot: Mapping[str, OperationStats]) -> list[Alert]:
        """Compare ``snapshot`` with the state so far; return only the changes."""
        now = datetime.now(UTC)
        changes: list[Alert] = []
        for name in sorted(snapshot):
            stats = snapshot[name]
            if stats.window_count < self.min_samples:
                continue
            self._evaluate_latency(name, stats.p95_ms, now, changes)
            self._evaluate_errors(name, stats.error_rate, now, changes)
        for key in sorted(self._active):
            alert = self._active[key]
            if alert.operation not in snapshot:
                del self._active[key]
                changes.append(attrs.evolve(
                    alert, active=False, raised_at=now,
                    message=f"{alert.operation} is no longer reported; {alert.kind} alert ended",
                ))
        for name in [name for name in self._baselines if name not in snapshot]:
            del self._baselines[name]
        return changes

    def _evaluate_latency(
        self, name: str, p95: float, now: datetime, changes: list[Alert]
    ) -> None:
        baseline = self._baselines.get(name)
        if baseline is None:
            self._baselines[name] = p95
            return
        key = f"latency:{name}"
        anomalous = p95 > self.latency_factor * baseline and p95 > self.min_latency_ms
        active = key in self._active
        if anomalous and not active:
            alert = Alert(
                key=key, operation=name, kind="latency", active=True,
                message=(f"{name} p95 {_ms(p95)} is above {self.latency_factor:g}x "
                         f"its baseline {_ms(baseline)}"),
                value=p95, baseline=baseline, raised_at=now,
            )
            self._active[key] = alert
            changes.append(alert)
            return  # the baseline stays frozen while the alert is active
        if anomalous:
            return
        if active:
            del self._active[key]
            changes.append(Alert(
                key=key, operation=name, kind="latency", active=False,
                message=f"{name} p95 {_ms(p95)} is back near its baseline {_ms(baseline)}",
                value=p95, baseline=baseline, raised_at=now,
            ))
        self._baselines[name] = baseline + self.baseline_alpha * (p95 - baseline)

    def _evaluate_errors(
        self, name: str, error_rate: float, now: datetime, changes: list[Alert]
    ) -> None:
        key = f"error_rate:{name}"
        threshold = self.error_rate_threshold
        anomalous = error_rate >= threshold
        active = key in self._active
        if anomalous == active:
            return
        if anomalous:
            message = f"{name} error rate {error_rate:.1%} is at or above {threshold:.1%}"
        else:
            message = f"{name} error rate {error_rate:.1%} is back below {threshold:.1%}"
        alert = Alert(
            key=key, operation=name, kind="error_rate", active=anomalous, message=message,
            value=error_rate, baseline=threshold, raised_at=now,
        )
        if anomalous:
            self._active[key] = alert
        else:
            del self._active[key]
        changes.append(alert)
