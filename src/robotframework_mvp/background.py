"""Background loops: lease reaper, module health checks, score recomputation, cleanup.

All run as tasks of the orchestrator's task group and end by cancellation when it
stops. A failing iteration is logged and retried at the next interval; it never takes
the loop (or the orchestrator) down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from .balancing import score_module
from .models import ModuleRecord, utcnow

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

__all__ = ["BackgroundLoops"]

log = logging.getLogger(__name__)

_HEALTH_CHECK_TIMEOUT = 10.0


class BackgroundLoops:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orch = orchestrator
        self.iterations: dict[str, int] = {}
        self.failures: dict[str, int] = {}

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.orch.settings.background
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._loop, "reaper", cfg.reaper_interval, self.reap_once, False)
            tg.start_soon(self._loop, "health", cfg.health_interval, self.check_health_once,
                          True)
            tg.start_soon(self._loop, "scores", cfg.scores_interval, self.score_once, False)
            tg.start_soon(self._loop, "cleanup", cfg.cleanup_interval, self.cleanup_once,
                          False)
            task_status.started()

    async def _loop(self, name: str, interval: float, step: Callable[[], Awaitable[None]],
                    run_first: bool) -> None:
        if not run_first:
            await anyio.sleep(interval)
        while True:
            try:
                await step()
            except Exception:
                self.failures[name] = self.failures.get(name, 0) + 1
                log.exception("background loop %r failed; retrying in %.0f s", name, interval)
            self.iterations[name] = self.iterations.get(name, 0) + 1
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

    async def check_health_once(self) -> None:
        """Run every local module's health check (each bounded by a timeout)."""
        for name, module in self.orch.modules.items():
            healthy = False
            with anyio.move_on_after(_HEALTH_CHECK_TIMEOUT):
                try:
                    healthy = await module.check_health()
                except Exception:
                    log.exception("health check of module %r failed", name)
            self.orch.module_stats[name].health = "healthy" if healthy else "unhealthy"
        await self.score_once()

    async def score_once(self) -> None:
        """Store this process's view of its modules so other processes can balance on it."""
        now = utcnow()
        records = []
        for name, module in self.orch.modules.items():
            st = self.orch.module_stats[name]
            records.append(ModuleRecord(
                name=name, kinds=module.kinds, capacity=module.capacity, health=st.health,
                last_check_at=now, success_rate=st.success_rate,
                latency_ewma_ms=st.latency_ewma_ms, circuit_state=st.circuit_state,
                load=st.load, max_attempts=module.max_attempts,
                score=score_module(
                    health=st.health, circuit_state=st.circuit_state,
                    success_rate=st.success_rate, latency_ewma_ms=st.latency_ewma_ms,
                    load=st.load, capacity=module.capacity,
                ),
            ))
        if records:
            await self.orch.state.upsert_modules(records)
        await self.orch.refresh_modules()

    async def cleanup_once(self) -> None:
        """Delete finished robots, executions and audit records past retention."""
        days = self.orch.settings.background.retention_days
        deleted = await self.orch.driver.purge(utcnow() - timedelta(days=days))
        if deleted:
            log.info("cleanup deleted %d finished robots older than %g days", deleted, days)
