"""Background loops: lease reaper, module health checks, score recomputation, cleanup,
anomaly alerts, and the leader election that decides who runs the fleet-wide ones.

All run as tasks of one task group, a child of the orchestrator's, and end by
cancellation when it stops. A round under way then finishes first (within
``ROUND_GRACE_SECONDS``): cut off mid-statement, psycopg would have to cancel the query
on the server and close the connection. A failing iteration is logged and retried at
the next interval; it never takes the loop (or the orchestrator) down. Every process
checks its own modules' health, stores its own module records, reaps expired leases,
drops its stale cache entries and watches its own step latencies for anomalies; only
the leader (``leader.py``) scores the stored module records from every process's
attempts and deletes data past its retention.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import attrs

from .alerts import AlertMonitor
from .balancing import score_module
from .leader import build_elector
from .models import ModuleRecord, utcnow
from .queue_guard import QueueGuard

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

__all__ = ["BackgroundLoops"]

log = logging.getLogger(__name__)

#: most attempts the leader reads per scoring run (newest first)
_FLEET_SAMPLES = 20_000
#: loops only the leader runs
LEADER_LOOPS = frozenset({"scores", "cleanup"})
#: how long a round under way may go on once the orchestrator stops, before it is cut off
ROUND_GRACE_SECONDS = 5.0


class BackgroundLoops:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orch = orchestrator
        self.iterations: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        #: runs of leader-only loops this process skipped because it did not lead
        self.skipped: dict[str, int] = {}
        #: wall-clock time (UNIX seconds) each loop last finished an iteration
        self.last_run: dict[str, float] = {}
        settings = orchestrator.settings
        self.leader = build_elector(settings, orchestrator.driver, orchestrator.cache.backend)
        self.alerts = AlertMonitor(orchestrator.tracker, orchestrator.module_stats,
                                   settings.performance)
        self.queue_guard = QueueGuard(orchestrator)
        #: the last health check of each local module: health, latency, when
        self.health_checks: dict[str, dict[str, object]] = {}
        #: the rounds under way, each shielded from the stop until it ends or is cut off
        self._rounds: set[anyio.CancelScope] = set()
        self._no_rounds = anyio.Event()
        self._no_rounds.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.orch.settings.background
        async with anyio.create_task_group() as tg:
            # The first election round runs before anything else: who leads is known once
            # the orchestrator has started.
            await tg.start(self.leader.run)
            tg.start_soon(self._loop, "alerts", cfg.alert_interval, self.alerts_once, False)
            tg.start_soon(self._loop, "reaper", cfg.reaper_interval, self.reap_once, False)
            tg.start_soon(self._loop, "queue_guard", cfg.reaper_interval,
                          self.queue_guard.run_once, False)
            tg.start_soon(self._loop, "health", cfg.health_interval, self.check_health_once,
                          True)
            tg.start_soon(self._loop, "scores", cfg.scores_interval, self.score_once, False)
            tg.start_soon(self._loop, "cleanup", cfg.cleanup_interval, self.cleanup_once,
                          False)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                await self._wind_down()

    async def _wind_down(self) -> None:
        """On stop: let the rounds under way end, then cut off any still going."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(ROUND_GRACE_SECONDS):
                await self._no_rounds.wait()
            if self._rounds:
                log.warning("%d background round(s) still going %g s after the stop; "
                            "cutting them off", len(self._rounds), ROUND_GRACE_SECONDS)
            for scope in self._rounds:
                scope.cancel()

    async def _round(self, step: Callable[[], Awaitable[None]]) -> None:
        """One iteration, shielded from the stop (see ``_wind_down``)."""
        with anyio.CancelScope(shield=True) as scope:
            if not self._rounds:
                self._no_rounds = anyio.Event()
            self._rounds.add(scope)
            try:
                await step()
            finally:
                self._rounds.discard(scope)
                if not self._rounds:
                    self._no_rounds.set()

    async def _loop(self, name: str, interval: float, step: Callable[[], Awaitable[None]],
                    run_first: bool) -> None:
        if not run_first:
            await anyio.sleep(interval)
        while True:
            try:
                await self._round(step)
            except Exception:
                self.failures[name] = self.failures.get(name, 0) + 1
                log.exception("background loop %r failed; retrying in %.0f s", name, interval)
            self.iterations[name] = self.iterations.get(name, 0) + 1
            self.last_run[name] = time.time()
            await anyio.sleep(interval)

    async def reap_once(self) -> None:
        """Requeue robots whose worker stopped renewing its lease."""
        reaped = await self.orch.state.reap_expired_leases()
        if reaped:
            log.warning("requeued or failed %d robots whose lease expired", len(reaped))
            self.orch.worker.wake()
            for robot in reaped:
                if robot.is_terminal:
                    await self.orch._robot_finished(robot)
                elif robot.module is not None:
                    self.orch.circuits.retries[robot.module] += 1  # a lost attempt's retry
            # A robot failed by the reaper still starts its chain's on_failure robot
            # (right after, not in the reaping transaction: see docs/scheduling.md).
            children = [child for robot in reaped if robot.is_terminal
                        and (child := self.orch._followup_robot(
                            robot, robot.status, None, robot.error)) is not None]
            if children:
                await self.orch.state.create_followups(children)

    async def check_health_once(self) -> None:
        """Run every local module's health check (each bounded by
        ``RFMVP_HEALTH_CHECK_TIMEOUT``; one that takes longer is unhealthy)."""
        timeout = self.orch.settings.background.health_check_timeout
        for name, module in self.orch.modules.items():
            healthy = False
            error = None
            started = time.perf_counter()
            with anyio.move_on_after(timeout) as scope:
                try:
                    healthy = await module.check_health()
                except Exception as exc:
                    error = type(exc).__name__
                    log.exception("health check of module %r failed", name)
            if scope.cancelled_caught:
                error = f"timed out after {timeout:g} s"
                log.warning("health check of module %r timed out after %g s", name, timeout)
            health = "healthy" if healthy else "unhealthy"
            self.orch.module_stats[name].health = health
            self.health_checks[name] = {
                "health": health, "error": error, "checked_at": time.time(),
                "latency_ms": round((time.perf_counter() - started) * 1000, 3)}
        await self.publish_once()

    async def publish_once(self) -> None:
        """Store this process's view of its own modules so other processes can balance on it.

        A module this process has not run yet (an API-only process, or one just started)
        keeps the figures stored for it, instead of overwriting them with no data.
        """
        now = utcnow()
        stored = {r.name: r for r in await self.orch.state.list_modules()} \
            if self.orch.modules else {}
        records = []
        for name, module in self.orch.modules.items():
            st = self.orch.module_stats[name]
            success, ewma, p95 = st.success_rate, st.latency_ewma_ms, st.latency_p95_ms
            previous = stored.get(name)
            if not st.samples and previous is not None:
                success, ewma = previous.success_rate, previous.latency_ewma_ms
            records.append(ModuleRecord(
                name=name, kinds=module.kinds, capacity=module.capacity, health=st.health,
                last_check_at=now, success_rate=success, latency_ewma_ms=ewma,
                circuit_state=st.circuit_state, load=st.load, max_attempts=module.max_attempts,
                score=score_module(
                    health=st.health, circuit_state=st.circuit_state, success_rate=success,
                    latency_ewma_ms=ewma, load=st.load, capacity=module.capacity,
                    latency_p95_ms=p95,
                ),
            ))
        if records:
            await self.orch.state.upsert_modules(records)
        await self.orch.refresh_modules(fresh=True)

    async def score_once(self) -> None:
        """Every process stores its own modules; the leader then scores every stored one."""
        await self.publish_once()
        if await self._leads("scores"):
            await self.score_fleet_once()
            await self.orch.refresh_modules(fresh=True)

    async def score_fleet_once(self) -> None:
        """Score each stored module from every process's attempts of the last interval.

        Success rate, latency EWMA and p95 come from the finished executions (at most
        ``_FLEET_SAMPLES``, newest first) started within ``RFMVP_SCORES_INTERVAL``; health,
        circuit state and load stay as the module's process stored them. A module with no
        attempts in the interval keeps its figures. The record's ``updated_at`` is kept,
        so a module whose processes are all gone still ages out.
        """
        window = self.orch.settings.background.scores_interval
        since = utcnow() - timedelta(seconds=window)
        rows = await self.orch.driver.recent_outcomes(execution_id_floor(since),
                                                      _FLEET_SAMPLES)
        outcomes: dict[str, list[tuple[bool, float]]] = {}
        for module, status, duration_ms in reversed(rows):  # oldest first, for the EWMA
            outcomes.setdefault(module, []).append((status == "succeeded", duration_ms))
        for record in await self.orch.state.list_modules():
            seen = outcomes.get(record.name)
            if not seen:
                continue
            success = sum(ok for ok, _ in seen) / len(seen)
            ewma = seen[0][1]
            for _, duration in seen[1:]:
                ewma += 0.1 * (duration - ewma)
            ordered = sorted(duration for _, duration in seen)
            p95 = ordered[max(-(-95 * len(ordered) // 100), 1) - 1]
            scored = attrs.evolve(
                record, success_rate=round(success, 6), latency_ewma_ms=round(ewma, 3),
                score=score_module(
                    health=record.health, circuit_state=record.circuit_state,
                    success_rate=success, latency_ewma_ms=ewma, load=record.load,
                    capacity=record.capacity, latency_p95_ms=p95,
                ),
            )
            await self.orch.driver.upsert_modules([scored], record.updated_at or utcnow())

    async def alerts_once(self) -> None:
        """Look for anomalies in this process's steps; fire ``on_alert`` for each change."""
        for alert in self.alerts.evaluate():
            log.log(logging.WARNING if alert.active else logging.INFO, "alert %s: %s",
                    alert.key, alert.message)
            await self.orch._call_observers("on_alert", alert=alert)

    async def _leads(self, loop: str) -> bool:
        if await self.leader.confirm():
            return True
        self.skipped[loop] = self.skipped.get(loop, 0) + 1
        return False

    async def cleanup_once(self) -> None:
        """Drop stale cache entries; the leader also deletes finished robots, executions
        and audit records past their retention."""
        dropped = self.orch.cache.purge_expired()
        if dropped:
            log.info("cleanup dropped %d expired cache entries", dropped)
        if not await self._leads("cleanup"):
            return
        days = self.orch.settings.background.retention_days
        deleted = await self.orch.driver.purge(utcnow() - timedelta(days=days))
        if deleted:
            log.info("cleanup deleted %d finished robots older than %g days", deleted, days)
        audit_days = self.orch.settings.security.audit_retention_days
        purged = await self.orch.driver.purge_audit(utcnow() - timedelta(days=audit_days))
        if purged:
            log.info("cleanup deleted %d audit records older than %g days", purged, audit_days)


def execution_id_floor(moment: datetime) -> str:
    """The smallest UUIDv7 text of ``moment``'s millisecond: execution ids at or after
    it were created at or after ``moment`` (to the millisecond)."""
    digits = f"{int(moment.timestamp() * 1000):012x}"
    return f"{digits[:8]}-{digits[8:]}-0000-0000-000000000000"
