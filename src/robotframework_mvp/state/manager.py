"""StateManager: every read and write of robots, timed, with the cache kept in step.

It owns the steps ``state.create_robot``, ``state.start_execution``,
``state.update_progress`` and ``state.complete_robot`` of the request flow. Writes go to
the store first; only a write the store accepted (its condition held) updates the cache,
so the cache never shows a transition that did not happen.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from ..cache.manager import CacheManager
from ..errors import ServiceUnavailableError
from ..group_commit import GroupCommitter
from ..models import Execution, ModuleRecord, Robot, RobotStatus, utcnow
from ..performance import PerformanceTracker
from .driver import Claim, Completion, CreatesClaimed, ProgressReport, StorageDriver

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

__all__ = ["StateManager"]


class StateManager:
    def __init__(
        self, driver: StorageDriver, cache: CacheManager, tracker: PerformanceTracker
    ) -> None:
        self.driver = driver
        self.cache = cache
        self.tracker = tracker
        self._completions = GroupCommitter(self._complete_many)
        self._progress = GroupCommitter(self._update_progress_many)
        self._creates = GroupCommitter(self._create_many)
        # The write of a robot run alone (an idle worker's slot): on a store whose writes
        # wait on the network it goes out at once; on SQLite, whose small writes run on
        # the loop without yielding, the turn lets submissions ready now share it.
        self._creates_claimed = GroupCommitter(
            self._create_and_claim_many,
            first_turn=not getattr(driver, "writes_wait_on_network", False))
        self._claiming_driver = driver if isinstance(driver, CreatesClaimed) else None

    async def create_robots(self, robots: Sequence[Robot]) -> list[tuple[Robot, bool]]:
        """Store new robots. A lone one is cached too (its submitter is about to poll it);
        a batch is not: most of its robots change state before anyone reads them, and
        their next change puts them there."""
        if len(robots) != 1:
            with self.tracker.measure("state.create_robot"):
                return await self.driver.create_robots(robots)
        # Robots submitted one at a time (one per HTTP request) share a write with those
        # submitted meanwhile.
        with self.tracker.measure("state.create_robot"):
            robot, is_new = await self._creates.write(robots[0])
        await self.cache.set_robots([robot], only_new=True)
        return [(robot, is_new)]

    async def _create_many(self, robots: Sequence[Robot]
                           ) -> list[tuple[Robot, bool] | Exception]:
        async def create(robot: Robot) -> tuple[Robot, bool]:
            return (await self.driver.create_robots([robot]))[0]

        return await _shared_write(robots, self.driver.create_robots, create)

    def group_commits(self) -> dict[str, GroupCommitter[Any, Any]]:
        """This manager's shared writes by name, for ``/metrics``."""
        return {"completions": self._completions, "progress": self._progress,
                "submissions": self._creates, "submissions_claimed": self._creates_claimed}

    @property
    def can_create_and_claim(self) -> bool:
        """Whether the driver can create a robot already claimed (both built-ins can)."""
        return self._claiming_driver is not None

    async def create_and_claim(
        self, robot: Robot, worker: str, lease_seconds: float
    ) -> Claim | None:
        """Create ``robot`` already claimed by ``worker``: steps 3 and 4 in one write.

        The write is recorded under ``state.create_robot`` and, as the execution started
        in it, under ``state.start_execution`` too. None: the id exists (see the driver).
        """
        driver = self._claiming_driver
        if driver is None:
            return None
        started = time.perf_counter()
        started_ns = time.time_ns()
        with self.tracker.measure("state.create_robot"):
            claim = await self._creates_claimed.write((robot, worker, lease_seconds))
        if claim is not None:
            self.tracker.record("state.start_execution", (time.perf_counter() - started) * 1000)
            self.tracker.record_span("state.start_execution", started_ns, time.time_ns(),
                                     attributes={"rfmvp.module": claim.execution.module,
                                                 "rfmvp.claimed": 1,
                                                 "rfmvp.created_claimed": True})
            await self.cache.set_robots([claim.robot], only_new=True)
        return claim

    async def _create_and_claim_many(
        self, items: Sequence[tuple[Robot, str, float]]
    ) -> list[Claim | Exception | None]:
        """Robots created claimed that were submitted together, in one write where the
        driver can; one the store refuses fails alone (as in ``_create_many``)."""
        driver = self._claiming_driver
        assert driver is not None
        now = utcnow()
        many = getattr(driver, "create_and_claim_many", None)
        _, worker, lease_seconds = items[0]

        async def create_and_claim(item: tuple[Robot, str, float]) -> Claim | None:
            robot, worker, lease_seconds = item
            return await driver.create_and_claim(
                robot, worker=worker, now=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds))

        async def create_and_claim_all(all_items: Sequence[tuple[Robot, str, float]]
                                       ) -> list[Claim | None]:
            assert many is not None
            return list(await many(
                [robot for robot, _, _ in all_items], worker=worker, now=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds)))

        one_write = many is not None and all(i[1:] == (worker, lease_seconds) for i in items)
        return await _shared_write(items, create_and_claim_all if one_write else None,
                                   create_and_claim)

    async def get_robot(self, robot_id: str, *, fresh: bool = False) -> Robot | None:
        """From the cache when it has the robot (unless ``fresh``), else from the store.

        What the store says fills the cache only for a finished robot. One still moving
        may change while the read is under way, and its change goes to the cache then:
        the older state read must not be put over it. Its next change fills the cache.
        """
        if not fresh:
            cached = await self.cache.get_robot(robot_id)
            if cached is not None:
                return cached
        robot = await self.driver.get_robot(robot_id)
        if robot is not None and robot.is_terminal:
            await self.cache.set_robots([robot], only_new=True)
        return robot

    async def list_robots(
        self,
        *,
        tenant: str | None,
        status: RobotStatus | None = None,
        kind: str | None = None,
        limit: int = 50,
        before_id: str | None = None,
    ) -> list[Robot]:
        return await self.driver.list_robots(
            tenant=tenant, status=status, kind=kind, limit=limit, before_id=before_id
        )

    async def claim(
        self, module: str, limit: int, worker: str, lease_seconds: float
    ) -> list[Claim]:
        now = utcnow()
        started = time.perf_counter()
        started_ns = time.time_ns()
        try:
            claims = await self.driver.claim_robots(
                module=module, limit=limit, worker=worker, now=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            )
        except Exception:
            self.tracker.record("state.start_execution",
                                (time.perf_counter() - started) * 1000, error=True)
            raise
        if claims:
            # One sample per execution started, each the latency that robot saw; idle
            # polls that claim nothing start no execution and are not recorded.
            elapsed_ms = (time.perf_counter() - started) * 1000
            for _ in claims:
                self.tracker.record("state.start_execution", elapsed_ms)
            self.tracker.record_span("state.start_execution", started_ns, time.time_ns(),
                                     attributes={"rfmvp.module": module,
                                                 "rfmvp.claimed": len(claims)})
            await self.cache.set_robots([c.robot for c in claims])
        return claims

    async def renew_leases(
        self, leases: Sequence[tuple[str, str]], lease_seconds: float
    ) -> set[str]:
        if not leases:
            return set()
        return await self.driver.renew_leases(
            leases, utcnow() + timedelta(seconds=lease_seconds)
        )

    async def update_progress(
        self, robot_id: str, lease_token: str, progress: float, message: str | None
    ) -> Robot | None:
        """Store a progress report; reports that arrive together share one transaction."""
        with self.tracker.measure("state.update_progress"):
            return await self._progress.write(
                ProgressReport(robot_id, lease_token, progress, message))

    async def _update_progress_many(self, reports: Sequence[ProgressReport]
                                    ) -> list[Robot | None]:
        now = utcnow()
        write_many = getattr(self.driver, "update_progress_many", None)
        if write_many is None:  # a third-party driver without the batch method
            robots = [await self.driver.update_progress(
                r.robot_id, r.lease_token, r.progress, r.message, now) for r in reports]
        else:
            robots = await write_many(reports, now)
        await self.cache.set_robots([r for r in robots if r is not None])
        return robots

    async def complete(self, completion: Completion) -> Robot | None:
        """Store how an attempt ended; concurrent completions share one transaction."""
        with self.tracker.measure("state.complete_robot"):
            return await self._completions.write(completion)

    async def _complete_many(self, completions: Sequence[Completion]) -> list[Robot | None]:
        write_many = getattr(self.driver, "complete_many", None)
        if write_many is None:  # a third-party driver from before group commit
            robots = [await self.driver.complete(c) for c in completions]
        else:
            robots = await write_many(completions)
        await self.cache.set_robots([r for r in robots if r is not None])
        return robots

    async def cancel(self, robot_id: str) -> Robot | None:
        robot = await self.driver.cancel_robot(robot_id, utcnow())
        if robot is not None:
            await self.cache.set_robot(robot)
        return robot

    async def release(self, leases: Sequence[tuple[str, str]]) -> int:
        if not leases:
            return 0
        released = await self.driver.release_robots(leases, utcnow())
        for robot_id, _ in leases:
            await self.cache.delete("robot", robot_id)
        return released

    async def reap_expired_leases(self) -> list[Robot]:
        reaped = await self.driver.reap_expired_leases(utcnow())
        await self.cache.set_robots(reaped)
        return reaped

    async def requeue(self, robot_id: str, extra_attempts: int) -> Robot | None:
        robot = await self.driver.requeue_robot(robot_id, utcnow(), extra_attempts)
        if robot is not None:
            await self.cache.set_robot(robot)
        return robot

    async def create_followups(self, robots: Sequence[Robot]) -> list[Robot]:
        """Chain children of ended parents; one that exists already is skipped."""
        created = await self.driver.create_followups(robots)
        await self.cache.set_robots(created, only_new=True)
        return created

    async def next_due_at(self, modules: Sequence[str]) -> datetime | None:
        return await self.driver.next_due_at(modules)

    async def list_executions(self, robot_id: str) -> list[Execution]:
        return await self.driver.list_executions(robot_id)

    async def upsert_modules(self, records: Sequence[ModuleRecord]) -> None:
        await self.driver.upsert_modules(records, utcnow())

    async def list_modules(self) -> list[ModuleRecord]:
        return await self.driver.list_modules()


async def _shared_write(
    items: Sequence[Item],
    write_all: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]] | None,
    write_one: Callable[[Item], Awaitable[Result]],
) -> list[Result | Exception]:
    """Items submitted together, in one write (``write_all``) when there is more than one
    and a way to write them together. If the store refuses that write for any reason but
    being unavailable, each is written again alone: one the store refuses gets its error,
    and must not fail the submissions that had shared its write."""
    if len(items) == 1:
        return [await write_one(items[0])]
    if write_all is not None:
        try:
            return list(await write_all(items))
        except ServiceUnavailableError:
            raise  # the store, not an item: every submitter hears it
        except Exception:
            log.debug("a shared write of %d items failed; writing each alone", len(items),
                      exc_info=True)
    out: list[Result | Exception] = []
    for item in items:
        try:
            out.append(await write_one(item))
        except Exception as exc:
            out.append(exc)
    return out
