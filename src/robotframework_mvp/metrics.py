"""Prometheus exposition of the tracker, cache, worker, rate limiter and store.

Metrics are collected when scraped (a custom collector over the live objects), so
recording a step costs nothing beyond the PerformanceTracker's own bookkeeping. Step
latencies keep the stable operation names of DESIGN section 4, so the seed's latency
budget can be read straight from ``rfmvp_step_duration_seconds``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import ServiceUnavailableError
from .models import utcnow
from .performance import OperationMetrics
from .resilience import CircuitState

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

__all__ = ["CONTENT_TYPE", "render_metrics"]

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, orch: Orchestrator, robots: dict[tuple[str, str], int],
                 queue: tuple[int, float | None]) -> None:
        self.orch = orch
        self.robots = robots
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        orch = self.orch
        robots = GaugeMetricFamily("rfmvp_robots", "Robots by kind and status",
                                   labels=["kind", "status"])
        for (kind, status), n in sorted(self.robots.items()):
            robots.add_metric([kind, status], n)
        yield robots
        yield GaugeMetricFamily("rfmvp_queue_depth", "Queued robots that are due",
                                value=self.queue[0])
        yield GaugeMetricFamily("rfmvp_queue_oldest_age_seconds",
                                "Age of the oldest due queued robot", value=self.queue[1] or 0.0)

        hist = HistogramMetricFamily("rfmvp_step_duration_seconds",
                                     "Latency of each step of the request flow",
                                     labels=["operation"])
        errors = CounterMetricFamily("rfmvp_step_errors", "Steps that raised",
                                     labels=["operation"])
        quantiles = GaugeMetricFamily("rfmvp_step_latency_seconds",
                                      "Recent latency percentiles of each step",
                                      labels=["operation", "quantile"])
        for name, stats in orch.tracker.snapshot().items():
            metrics = orch.tracker.metrics(name)
            assert metrics is not None
            hist.add_metric([name], *_seconds_histogram(metrics))
            errors.add_metric([name], stats.errors)
            for q, value in (("0.5", stats.p50_ms), ("0.95", stats.p95_ms),
                             ("0.99", stats.p99_ms)):
                quantiles.add_metric([name, q], value / 1000)
        yield hist
        yield errors
        yield quantiles
        yield from _loop_lag(orch)

        score = GaugeMetricFamily("rfmvp_module_score", "Module score (0-1)", labels=["module"])
        load = GaugeMetricFamily("rfmvp_module_load", "Robots running on a module here",
                                 labels=["module"])
        circuit = GaugeMetricFamily("rfmvp_module_circuit_state",
                                    "1 for the module's current circuit state",
                                    labels=["module", "state"])
        health = GaugeMetricFamily("rfmvp_module_healthy", "1 if the last health check passed",
                                   labels=["module"])
        success = GaugeMetricFamily("rfmvp_module_success_rate",
                                    "EWMA of the module's attempts that succeeded (0-1)",
                                    labels=["module"])
        latency = GaugeMetricFamily("rfmvp_module_latency_seconds",
                                    "Module latency: EWMA, and p95 of its recent attempts",
                                    labels=["module", "statistic"])
        scored: set[str] = set()
        for kind in sorted(orch.balancer.known_kinds()):
            for c in orch.balancer.candidates(kind):
                if c.name in scored:
                    continue  # a module serving several kinds is one series
                scored.add(c.name)
                score.add_metric([c.name], c.score)
                success.add_metric([c.name], c.success_rate)
                for statistic, ms in (("ewma", c.latency_ewma_ms), ("p95", c.latency_p95_ms)):
                    if ms is not None:
                        latency.add_metric([c.name, statistic], ms / 1000)
        orch.circuits.sync()
        for name, st in sorted(orch.module_stats.items()):
            load.add_metric([name], st.load)
            health.add_metric([name], 1.0 if st.health == "healthy" else 0.0)
            for state in ("closed", "open", "half_open"):
                circuit.add_metric([name, state], 1.0 if st.circuit_state == state else 0.0)
        yield score
        yield load
        yield circuit
        yield health
        yield success
        yield latency
        yield from _resilience(orch)

        background = orch.background
        alerts = GaugeMetricFamily("rfmvp_alerts_active", "1 for each anomaly alert active now",
                                   labels=["key", "kind", "operation"])
        for alert in background.alerts.active():
            alerts.add_metric([alert.key, alert.kind, alert.operation], 1.0)
        yield alerts
        yield CounterMetricFamily("rfmvp_alerts_raised", "Anomaly alerts that started",
                                  value=background.alerts.raised)
        leader = background.leader
        leads = GaugeMetricFamily("rfmvp_leader", "1 while this process is the leader",
                                  labels=["backend"])
        leads.add_metric([leader.backend], 1.0 if leader.is_leader else 0.0)
        yield leads
        runs = CounterMetricFamily("rfmvp_background_runs", "Iterations of each background loop",
                                   labels=["loop"])
        failures = CounterMetricFamily("rfmvp_background_failures",
                                       "Iterations of each background loop that failed",
                                       labels=["loop"])
        skipped = CounterMetricFamily("rfmvp_background_skipped",
                                      "Leader-only runs skipped because this process did not "
                                      "lead", labels=["loop"])
        last = GaugeMetricFamily("rfmvp_background_last_run_timestamp_seconds",
                                 "When each loop last finished an iteration (UNIX time)",
                                 labels=["loop"])
        for loop_name in sorted(background.iterations):
            runs.add_metric([loop_name], background.iterations[loop_name])
            failures.add_metric([loop_name], background.failures.get(loop_name, 0))
            skipped.add_metric([loop_name], background.skipped.get(loop_name, 0))
        for loop_name, at in sorted(background.last_run.items()):
            last.add_metric([loop_name], at)
        yield runs
        yield failures
        yield skipped
        yield last

        cache = orch.cache.stats()
        yield CounterMetricFamily("rfmvp_cache_hits", "Cache hits", value=cache["hits"])
        yield CounterMetricFamily("rfmvp_cache_misses", "Cache misses", value=cache["misses"])
        yield CounterMetricFamily("rfmvp_cache_errors", "Cache errors", value=cache["errors"])
        yield GaugeMetricFamily("rfmvp_cache_hit_ratio", "Cache hits / lookups",
                                value=cache["hit_ratio"] or 0.0)
        yield GaugeMetricFamily("rfmvp_cache_robot_states_pending",
                                "Robot states waiting to be written behind to the shared cache",
                                value=orch.cache.pending_states)
        limiter = orch.security.limiter
        yield CounterMetricFamily("rfmvp_rate_limit_rejections",
                                  "Requests refused by a rate limit", value=limiter.rejections)
        yield CounterMetricFamily("rfmvp_rate_limit_fallbacks",
                                  "Rate-limit checks answered locally (shared backend down)",
                                  value=limiter.fallbacks)
        yield CounterMetricFamily("rfmvp_audit_records_written", "Audit records written",
                                  value=orch.audit.written)
        yield GaugeMetricFamily("rfmvp_audit_records_pending", "Audit records not yet written",
                                value=orch.audit.pending)
        shared = {**orch.state.group_commits(), **orch.cache.group_commits(),
                  **orch.security.stored_keys.group_commits()}
        trips = CounterMetricFamily(
            "rfmvp_shared_round_trips",
            "Round trips to the store or the cache made for calls that arrive together",
            labels=["kind"])
        items = CounterMetricFamily(
            "rfmvp_shared_round_trip_items",
            "Calls served by those round trips (items / round trips: the mean batch)",
            labels=["kind"])
        for kind, committer in sorted(shared.items()):
            trips.add_metric([kind], committer.batches)
            items.add_metric([kind], committer.written)
        yield trips
        yield items
        yield GaugeMetricFamily(
            "rfmvp_waits_open", "Robots that waits in this process are waiting for",
            value=orch.waits_open)
        answers = CounterMetricFamily(
            "rfmvp_wait_answers",
            "Waits answered: here (ended in this process), heard (announced by another), "
            "polled (found by a read of the store) or timed_out", labels=["how"])
        for how in ("here", "heard", "polled", "timed_out"):
            answers.add_metric([how], orch.wait_answers[how])
        yield answers
        remote = orch.remote_ends
        yield GaugeMetricFamily(
            "rfmvp_remote_ends_subscribed",
            "1 while this process hears the robots that end in other processes",
            value=1 if remote.subscribed else 0)
        yield CounterMetricFamily(
            "rfmvp_remote_ends_announcements",
            "Announcements of robots ended in other processes that this process heard",
            value=remote.announcements)
        yield CounterMetricFamily(
            "rfmvp_remote_ends_robots", "Robot ids in those announcements",
            value=remote.ids_heard)
        yield CounterMetricFamily(
            "rfmvp_remote_ends_subscriptions",
            "Subscriptions made (more than one: made again after a lost connection)",
            value=remote.subscriptions)
        worker = orch.worker
        yield GaugeMetricFamily("rfmvp_worker_running", "Robots running in this process",
                                value=len(worker.running))
        yield CounterMetricFamily("rfmvp_worker_claimed", "Robots claimed by this process",
                                  value=worker.claimed)
        yield CounterMetricFamily("rfmvp_worker_completed",
                                  "Attempts this process completed", value=worker.completed)
        pool = getattr(orch.driver, "pool_stats", None)
        if callable(pool):
            usage = GaugeMetricFamily("rfmvp_store_pool", "Connection pool figures",
                                      labels=["pool", "figure"])
            pools: dict[str, dict[str, Any]] = pool()
            for pool_name, figures in sorted(pools.items()):
                for figure, value in sorted(figures.items()):
                    if isinstance(value, int | float):
                        usage.add_metric([pool_name, figure], float(value))
            yield usage


def _seconds_histogram(metrics: OperationMetrics) -> tuple[list[tuple[str, float]], float]:
    """An ``OperationMetrics`` histogram (ms) as Prometheus buckets and sum in seconds."""
    buckets, count, total_ms = metrics.histogram()
    return ([(f"{bound / 1000:g}", float(n)) for bound, n in buckets] + [("+Inf", count)],
            total_ms / 1000)


def _loop_lag(orch: Orchestrator) -> Iterator[Metric]:
    lag = orch.loop_lag.metrics
    hist = HistogramMetricFamily(
        "rfmvp_event_loop_lag_seconds",
        "How late the event loop ran a due timer (sampled every RFMVP_LOOP_LAG_INTERVAL)")
    hist.add_metric([], *_seconds_histogram(lag))
    yield hist
    stats = lag.stats()
    recent = GaugeMetricFamily("rfmvp_event_loop_lag_recent_seconds",
                               "Event loop lag over the last samples: percentiles and max",
                               labels=["quantile"])
    for q, value in (("0.5", stats.p50_ms), ("0.99", stats.p99_ms), ("1", stats.max_ms)):
        recent.add_metric([q], value / 1000)
    yield recent


def _resilience(orch: Orchestrator) -> Iterator[Metric]:
    """Circuit breakers (modules, store, cache), retries, moves and fail-fast refusals."""
    states = GaugeMetricFamily("rfmvp_circuit_state",
                               "1 for the current state of each circuit breaker (module:<name>, "
                               "store:write, store:read, cache:<backend>)",
                               labels=["name", "state"])
    transitions = CounterMetricFamily("rfmvp_circuit_transitions",
                                      "Times each circuit breaker entered a state",
                                      labels=["name", "state"])
    circuits = orch.circuits
    seen: set[str] = set()
    for breaker in orch.breakers():
        module = breaker.name.removeprefix("module:")
        current = (circuits.state(module) if breaker.name.startswith("module:")
                   else None) or breaker.state.value
        seen.add(breaker.name)
        for state in ("closed", "open", "half_open"):
            states.add_metric([breaker.name, state], 1.0 if current == state else 0.0)
            transitions.add_metric([breaker.name, state],
                                   breaker.transitions.get(CircuitState(state), 0))
    for module in sorted(circuits.shared):  # held open by another process
        name = f"module:{module}"
        if name not in seen and circuits.state(module) == "open":
            for state in ("closed", "open", "half_open"):
                states.add_metric([name, state], 1.0 if state == "open" else 0.0)
    yield states
    yield transitions
    retries = CounterMetricFamily("rfmvp_robot_retries",
                                  "Attempts that ended in a retry (failed with attempts left, "
                                  "or lost with their worker), by the module they ran on",
                                  labels=["module"])
    for module, n in sorted(circuits.retries.items()):
        retries.add_metric([module], n)
    yield retries
    moved = CounterMetricFamily("rfmvp_robot_reassigned",
                                "Robots moved off a module: their retry went elsewhere "
                                "(retry), or their module was unavailable (unavailable)",
                                labels=["module", "reason"])
    for (module, reason), n in sorted(circuits.reassigned.items()):
        moved.add_metric([module, reason], n)
    yield moved
    stranded = CounterMetricFamily("rfmvp_robot_no_module_failures",
                                   "Robots failed with no_module_available",
                                   labels=["module"])
    for module, n in sorted(circuits.unavailable_failures.items()):
        stranded.add_metric([module], n)
    yield stranded
    yield CounterMetricFamily("rfmvp_store_read_fallbacks",
                              "Reads served by the write pool because the read pool failed "
                              "or its breaker was open",
                              value=getattr(orch.driver, "read_fallbacks", 0))
    availability = getattr(orch.driver, "availability", None)
    yield CounterMetricFamily("rfmvp_store_refusals",
                              "Store calls refused at once (503) while the store was "
                              "unreachable", value=0 if availability is None
                              else availability.refused)


async def render_metrics(orch: Orchestrator) -> str:
    """The Prometheus text exposition (store figures read once per scrape).

    While the store cannot be reached its figures are left out (robot counts empty, the
    queue 0), so the breakers and errors that tell what is wrong can still be scraped.
    """
    robots: dict[tuple[str, str], int] = {}
    queue: tuple[int, float | None] = (0, None)
    try:
        cached = await orch.cache.get_json("stats", "robots")
        if cached is None:
            robots = await orch.driver.count_robots()
            await orch.cache.set_json("stats", "robots",
                                      [[k, s, n] for (k, s), n in robots.items()],
                                      orch.settings.cache.ttl_stats)
        else:
            robots = {(k, s): n for k, s, n in cached}
        queue = await orch.driver.queue_stats(utcnow())
    except ServiceUnavailableError as exc:
        log.warning("metrics without the store's figures: %s", exc.message)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(orch, robots, queue))
    return generate_latest(registry).decode()
