"""QueueGuard: robots queued for a module that cannot take them do not wait forever.

A module is *unavailable* when its circuit is open (in this process, or in any process
through Redis), its health check fails, or no live process runs it any more (its stored
record has not been refreshed for three health or score intervals). Every
``RFMVP_REAPER_INTERVAL`` each process reads the stored module records and, for each
unavailable module and each of its kinds:

- when another module of the kind is available, moves the module's queued robots to it
  at once (``rfmvp_robot_reassigned_total{reason="unavailable"}``);
- otherwise leaves them queued: new robots of the kind are still accepted and wait.
  Once the module has been unavailable for ``RFMVP_NO_MODULE_DEADLINE_SECONDS`` (as this
  process saw it), the robots that have been due for that long fail with the error
  ``no_module_available`` (their ``on_failure`` follow-ups start). A module that recovers
  before the deadline takes them as usual.

Every process may do this: each write is conditional on the robot still being queued on
that module, so a robot is never moved or failed twice. The same loop also stores this
process's module records soon after one of its circuits changed, so processes that do
not share Redis learn of it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from .models import ErrorInfo, ModuleRecord, utcnow

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

__all__ = ["NO_MODULE_AVAILABLE", "QueueGuard"]

log = logging.getLogger(__name__)

#: the error type of robots failed because no module could take them
NO_MODULE_AVAILABLE = "no_module_available"
#: most robots moved or failed per module, kind and run
_BATCH = 1000


class QueueGuard:
    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orch = orchestrator
        #: module -> monotonic time this process first saw it unavailable (this spell)
        self.unavailable_since: dict[str, float] = {}
        self.clock = time.monotonic

    def why_unavailable(self, record: ModuleRecord, now: datetime) -> str | None:
        """Why ``record``'s module cannot take robots now, or None when it can."""
        orch = self.orch
        name = record.name
        if name in orch.modules:
            circuit = orch.circuits.state(name)
            health = orch.module_stats[name].health
        else:
            age = None if record.updated_at is None \
                else (now - record.updated_at).total_seconds()
            if age is not None and age > orch.balancer.stale_after:
                return "no live process runs it"
            circuit = orch.circuits.state(name) or record.circuit_state
            health = record.health
        if circuit == "open":
            return "its circuit is open"
        if health == "unhealthy":
            return "it is unhealthy"
        return None

    async def run_once(self) -> None:
        orch = self.orch
        circuits = orch.circuits
        await circuits.refresh_shared(force=True)
        if circuits.dirty:
            circuits.dirty = False
            circuits.sync()
            await orch.background.publish_once()  # also reloads the records below
        records = await orch.state.list_modules()
        orch.balancer.set_remote_records(records)
        now, mono = utcnow(), self.clock()
        unavailable = {r.name: (r, why) for r in records
                       if (why := self.why_unavailable(r, now)) is not None}
        for name in sorted(set(self.unavailable_since) - set(unavailable)):
            del self.unavailable_since[name]
            log.info("module %r is available again", name)
        deadline = orch.settings.resilience.no_module_deadline
        for name, (record, why) in sorted(unavailable.items()):
            if name not in self.unavailable_since:
                self.unavailable_since[name] = mono
                log.warning("module %r is unavailable (%s): its queued robots move to another "
                            "module of their kind, or wait up to %g s", name, why, deadline)
            waited = mono - self.unavailable_since[name]
            for kind in record.kinds:
                target = orch.balancer.alternative(kind, exclude=set(unavailable))
                if target is not None:
                    moved = await orch.driver.reassign_queued_robots(name, kind, target, now,
                                                                     _BATCH)
                    if moved:
                        circuits.reassigned[(name, "unavailable")] += moved
                        log.warning("moved %d queued robots of kind %r from module %r (%s) "
                                    "to %r", moved, kind, name, why, target)
                        orch.worker.wake()
                elif waited >= deadline:
                    await self._fail(record, kind, why, deadline, now)

    async def _fail(self, record: ModuleRecord, kind: str, why: str, deadline: float,
                    now: datetime) -> None:
        orch = self.orch
        error = ErrorInfo(NO_MODULE_AVAILABLE, (
            f"no module could run robots of kind {kind!r} for {deadline:g} s: module "
            f"{record.name!r} is unavailable ({why}) and no other module of the kind is; "
            "retry it once one is")[:2000])
        failed = await orch.driver.fail_queued_robots(
            record.name, kind, now - timedelta(seconds=deadline), error, now, _BATCH)
        if not failed:
            return
        orch.circuits.unavailable_failures[record.name] += len(failed)
        log.error("failed %d robots of kind %r: module %r unavailable (%s) for over %g s",
                  len(failed), kind, record.name, why, deadline)
        await orch.cache.set_robots(failed)
        for robot in failed:
            await orch._robot_finished(robot)
        children = [child for robot in failed
                    if (child := orch._followup_robot(robot, robot.status, None, robot.error))
                    is not None]
        if children:
            await orch.state.create_followups(children)
