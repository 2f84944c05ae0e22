"""Specification of the store's half of scheduling, for every driver: schedules, fires that
happen once per due time, robots listed by due time, and chain follow-ups that exist
exactly when their parent's end does."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import anyio
import attrs
import pytest

from robotframework_mvp.models import (
    ExecutionStatus,
    FollowUp,
    MisfirePolicy,
    Robot,
    RobotStatus,
    Schedule,
    new_id,
    utcnow,
)
from robotframework_mvp.state.driver import Claim, Completion, ScheduleFire, StorageDriver

pytestmark = pytest.mark.anyio


def make_robot(**changes: Any) -> Robot:
    fields: dict[str, Any] = {
        "id": new_id(), "kind": "ocr", "payload": {"document": "a.pdf"}, "owner": "alice",
        "tenant": "acme", "status": RobotStatus.QUEUED, "module": "ocr-fast",
        "scheduled_at": utcnow() - timedelta(seconds=1),
    }
    fields.update(changes)
    return Robot(**fields)


def make_schedule(**changes: Any) -> Schedule:
    start = utcnow().replace(microsecond=0) - timedelta(seconds=10)
    fields: dict[str, Any] = {
        "id": new_id(), "owner": "alice", "tenant": "acme", "cron": "* * * * * *",
        "timezone": "UTC", "kind": "ocr", "payload": {"n": 1},
        "misfire_policy": MisfirePolicy.SKIP, "last_due_at": start,
        "next_due_at": start + timedelta(seconds=1), "created_at": start, "updated_at": start,
    }
    fields.update(changes)
    return Schedule(**fields)


def fire(schedule: Schedule, due_at: datetime, **changes: Any) -> tuple[ScheduleFire, Robot]:
    robot = make_robot(owner=schedule.owner, tenant=schedule.tenant, scheduled_at=due_at,
                       schedule_id=schedule.id)
    return ScheduleFire(schedule_id=schedule.id, due_at=due_at, robot_id=robot.id,
                        fired_at=utcnow(), **changes), robot


async def claim_one(driver: StorageDriver, robot: Robot) -> Claim:
    now = utcnow()
    claims = await driver.claim_robots(module=robot.module or "ocr-fast", limit=10,
                                       worker="w", now=now,
                                       lease_expires_at=now + timedelta(seconds=30))
    assert [c.robot.id for c in claims] == [robot.id]
    return claims[0]


def completed(c: Claim, status: RobotStatus, **changes: Any) -> Completion:
    fields: dict[str, Any] = {
        "robot_id": c.robot.id, "lease_token": c.execution.id, "status": status,
        "execution_status": str(ExecutionStatus.SUCCEEDED if status is RobotStatus.SUCCEEDED
                                else ExecutionStatus.FAILED),
        "finished_at": utcnow(), "duration_ms": 5.0,
    }
    fields.update(changes)
    return Completion(**fields)


def child_of(parent: Robot, trigger: str, **changes: Any) -> Robot:
    return make_robot(kind="notify", module="notify", owner=parent.owner, tenant=parent.tenant,
                      parent_id=parent.id, parent_trigger=trigger, payload={"from": parent.id},
                      scheduled_at=utcnow(), **changes)


# -- schedules -------------------------------------------------------------------------------


async def test_a_schedule_round_trips_and_lists_per_tenant(driver: StorageDriver) -> None:
    mine = await driver.create_schedule(make_schedule(payload={"x": ["é", 1]}))
    theirs = await driver.create_schedule(make_schedule(tenant="other", owner="bob"))
    assert await driver.get_schedule(mine.id) == mine
    assert mine.payload == {"x": ["é", 1]}
    assert [s.id for s in await driver.list_schedules(tenant="acme", limit=10, after_id=None)] \
        == [mine.id]
    everyone = await driver.list_schedules(tenant=None, limit=10, after_id=None)
    assert [s.id for s in everyone] == sorted([mine.id, theirs.id])
    assert [s.id for s in await driver.list_schedules(tenant=None, limit=10,
                                                      after_id=everyone[0].id)] == \
        [everyone[1].id]


async def test_paused_schedules_are_never_due_and_resume_owes_nothing(
    driver: StorageDriver,
) -> None:
    schedule = await driver.create_schedule(make_schedule())
    now = utcnow()
    assert [s.id for s in await driver.due_schedules(now, 10)] == [schedule.id]
    paused = await driver.pause_schedule(schedule.id, now)
    assert paused is not None
    assert paused.paused
    assert await driver.due_schedules(now, 10) == []
    assert await driver.next_schedule_due_at() is None
    restart = now.replace(microsecond=0)
    resumed = await driver.resume_schedule(schedule.id, restart, restart + timedelta(seconds=1))
    assert resumed is not None
    assert not resumed.paused
    assert resumed.last_due_at == restart
    assert await driver.next_schedule_due_at() == restart + timedelta(seconds=1)
    assert await driver.resume_schedule(schedule.id, restart, restart) is None  # not paused


async def test_fire_advances_the_schedule_and_creates_the_robots_in_one_step(
    driver: StorageDriver,
) -> None:
    schedule = await driver.create_schedule(make_schedule())
    due = schedule.last_due_at + timedelta(seconds=1)
    first, robot = fire(schedule, due)
    created = await driver.fire_schedule(schedule, last_due_at=due,
                                         next_due_at=due + timedelta(seconds=1),
                                         fires=[(first, robot)], now=utcnow())
    assert created is not None
    assert [r.id for r in created] == [robot.id]
    stored = await driver.get_robot(robot.id)
    assert stored is not None
    assert stored.schedule_id == schedule.id
    assert stored.scheduled_at == due
    after = await driver.get_schedule(schedule.id)
    assert after is not None
    assert (after.last_due_at, after.next_due_at) == (due, due + timedelta(seconds=1))
    fires = await driver.list_schedule_fires(schedule.id, 10)
    assert [(f.due_at, f.robot_id) for f in fires] == [(due, robot.id)]


async def test_only_one_of_many_concurrent_deciders_fires_a_due_time(
    driver: StorageDriver,
) -> None:
    schedule = await driver.create_schedule(make_schedule())
    due = schedule.last_due_at + timedelta(seconds=1)
    results: list[list[Robot] | None] = []

    async def decide() -> None:
        results.append(await driver.fire_schedule(
            schedule, last_due_at=due, next_due_at=due + timedelta(seconds=1),
            fires=[fire(schedule, due)], now=utcnow()))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(decide)
    assert sum(r is not None for r in results) == 1
    assert len(await driver.list_schedule_fires(schedule.id, 10)) == 1
    robots = await driver.list_robots(tenant="acme", status=None, kind=None, limit=100,
                                      before_id=None)
    assert len(robots) == 1


async def test_a_due_time_never_fires_twice_even_when_decided_twice(
    driver: StorageDriver,
) -> None:
    """The fire's primary key backs the compare-and-set: a schedule whose last_due_at went
    back (restored from a backup, edited by hand) still creates no second robot."""
    schedule = await driver.create_schedule(make_schedule())
    due = schedule.last_due_at + timedelta(seconds=1)
    assert await driver.fire_schedule(schedule, last_due_at=due, next_due_at=due,
                                      fires=[fire(schedule, due)], now=utcnow())
    rewound = await driver.get_schedule(schedule.id)
    assert rewound is not None
    again = await driver.fire_schedule(
        rewound, last_due_at=due + timedelta(seconds=1), next_due_at=due,
        fires=[fire(schedule, due), fire(schedule, due + timedelta(seconds=1), late=True)],
        now=utcnow())
    assert again is not None
    assert [r.scheduled_at for r in again] == [due + timedelta(seconds=1)]
    fires = await driver.list_schedule_fires(schedule.id, 10)
    assert [(f.due_at, f.late) for f in fires] == [(due + timedelta(seconds=1), True),
                                                   (due, False)]


async def test_a_stale_decider_changes_nothing(driver: StorageDriver) -> None:
    schedule = await driver.create_schedule(make_schedule())
    due = schedule.last_due_at + timedelta(seconds=1)
    assert await driver.fire_schedule(schedule, last_due_at=due, next_due_at=due,
                                      fires=[], now=utcnow()) == []
    assert await driver.fire_schedule(schedule, last_due_at=due, next_due_at=due,
                                      fires=[fire(schedule, due)], now=utcnow()) is None
    assert await driver.list_schedule_fires(schedule.id, 10) == []


async def test_deleting_a_schedule_keeps_its_robots(driver: StorageDriver) -> None:
    schedule = await driver.create_schedule(make_schedule())
    due = schedule.last_due_at + timedelta(seconds=1)
    fired = fire(schedule, due)
    robot = fired[1]
    await driver.fire_schedule(schedule, last_due_at=due, next_due_at=due, fires=[fired],
                               now=utcnow())
    assert await driver.delete_schedule(schedule.id)
    assert not await driver.delete_schedule(schedule.id)
    assert await driver.get_schedule(schedule.id) is None
    assert await driver.list_schedule_fires(schedule.id, 10) == []
    assert await driver.get_robot(robot.id) is not None


async def test_purge_forgets_old_fires(driver: StorageDriver) -> None:
    schedule = await driver.create_schedule(make_schedule())
    due = schedule.last_due_at + timedelta(seconds=1)
    await driver.fire_schedule(schedule, last_due_at=due, next_due_at=due,
                               fires=[fire(schedule, due)], now=utcnow() - timedelta(days=40))
    await driver.purge(utcnow() - timedelta(days=30))
    assert await driver.list_schedule_fires(schedule.id, 10) == []


# -- robots by due time ----------------------------------------------------------------------


async def test_robots_list_by_due_time_with_a_cursor_that_pages_through_ties(
    driver: StorageDriver,
) -> None:
    base = utcnow().replace(microsecond=123456)
    robots = [make_robot(scheduled_at=base + timedelta(seconds=s)) for s in (30, 10, 20, 10)]
    robots.append(make_robot(scheduled_at=base, tenant="other"))
    await driver.create_robots(robots)
    expected = sorted(robots[:4], key=lambda r: (r.scheduled_at, r.id))
    seen: list[str] = []
    after = None
    while True:
        page = await driver.list_robots_by_due(tenant="acme", status=None, kind=None, limit=1,
                                               after=after)
        if not page:
            break
        seen.append(page[0].id)
        after = (page[0].scheduled_at, page[0].id)
    assert seen == [r.id for r in expected]
    queued = await driver.list_robots_by_due(tenant=None, status=RobotStatus.QUEUED,
                                             kind="ocr", limit=10, after=None)
    assert queued[0].id == robots[4].id


async def test_a_delayed_robot_is_not_claimed_before_its_time(driver: StorageDriver) -> None:
    later = make_robot(scheduled_at=utcnow() + timedelta(seconds=60))
    await driver.create_robots([later])
    now = utcnow()
    assert await driver.claim_robots(module="ocr-fast", limit=10, worker="w", now=now,
                                     lease_expires_at=now + timedelta(seconds=30)) == []
    assert await driver.next_due_at(["ocr-fast"]) == later.scheduled_at
    assert await driver.cancel_robot(later.id, now) is not None


# -- chains ----------------------------------------------------------------------------------


async def test_follow_ups_are_stored_on_the_parent(driver: StorageDriver) -> None:
    parent = make_robot(on_success=FollowUp("notify", {"r": "$parent.result"}),
                        on_failure=FollowUp("alert", {}))
    await driver.create_robots([parent])
    assert await driver.get_robot(parent.id) == parent
    c = await claim_one(driver, parent)
    assert c.robot.on_success == parent.on_success
    assert c.robot.on_failure == parent.on_failure


async def test_the_follow_up_is_created_with_the_completion_and_only_once(
    driver: StorageDriver,
) -> None:
    parent = make_robot(on_success=FollowUp("notify", {}))
    await driver.create_robots([parent])
    c = await claim_one(driver, parent)
    child = child_of(parent, "on_success")
    done = await driver.complete(completed(c, RobotStatus.SUCCEEDED, result={"ok": 1},
                                           followup=child))
    assert done is not None
    stored = await driver.get_robot(child.id)
    assert stored is not None
    assert (stored.parent_id, stored.parent_trigger, stored.status) == \
        (parent.id, "on_success", RobotStatus.QUEUED)
    assert (stored.owner, stored.tenant) == (parent.owner, parent.tenant)
    # The same completion again (a retried write) matches no lease: nothing new.
    again = attrs.evolve(child, id=new_id())
    assert await driver.complete(completed(c, RobotStatus.SUCCEEDED, followup=again)) is None
    # A second child for the same parent and trigger (the reaper's path) is skipped.
    assert await driver.create_followups([attrs.evolve(child, id=new_id())]) == []
    children = [r for r in await driver.list_robots(tenant="acme", status=None, kind="notify",
                                                    limit=10, before_id=None)]
    assert [r.id for r in children] == [child.id]


async def test_a_batch_of_completions_creates_each_follow_up_under_its_own_lease(
    driver: StorageDriver,
) -> None:
    parents = [make_robot(on_success=FollowUp("notify", {}), on_failure=FollowUp("alert", {}))
               for _ in range(4)]
    await driver.create_robots(parents)
    claims = {c.robot.id: c for c in await driver.claim_robots(
        module=parents[0].module or "ocr-fast", limit=4, worker="w1", now=utcnow(),
        lease_expires_at=utcnow() + timedelta(seconds=30))}
    assert len(claims) == 4
    await driver.cancel_robot(parents[2].id, utcnow())  # its lease is gone
    children = [child_of(parents[0], "on_success"), None, child_of(parents[2], "on_success"),
                child_of(parents[3], "on_failure")]
    statuses = [RobotStatus.SUCCEEDED, RobotStatus.SUCCEEDED, RobotStatus.SUCCEEDED,
                RobotStatus.FAILED]
    done = await driver.complete_many([
        completed(claims[p.id], status, followup=child)
        for p, status, child in zip(parents, statuses, children, strict=True)])
    assert [None if d is None else d.status for d in done] == [
        RobotStatus.SUCCEEDED, RobotStatus.SUCCEEDED, None, RobotStatus.FAILED]
    made = [None if k is None else await driver.get_robot(k.id) for k in children]
    assert [None if m is None else (m.parent_id, m.parent_trigger) for m in made] == [
        (parents[0].id, "on_success"), None, None, (parents[3].id, "on_failure")]
    ended = [[e.status for e in await driver.list_executions(p.id)] for p in parents]
    assert ended == [[ExecutionStatus.SUCCEEDED], [ExecutionStatus.SUCCEEDED],
                     [ExecutionStatus.CANCELLED], [ExecutionStatus.FAILED]]


async def test_a_completion_whose_lease_is_lost_creates_no_follow_up(
    driver: StorageDriver,
) -> None:
    parent = make_robot(on_failure=FollowUp("notify", {}))
    await driver.create_robots([parent])
    c = await claim_one(driver, parent)
    await driver.cancel_robot(parent.id, utcnow())
    child = child_of(parent, "on_failure")
    assert await driver.complete(completed(c, RobotStatus.FAILED, followup=child)) is None
    assert await driver.get_robot(child.id) is None


async def test_the_reapers_follow_ups_are_created_once(driver: StorageDriver) -> None:
    parent = make_robot()
    await driver.create_robots([parent])
    first = child_of(parent, "on_failure")
    assert [r.id for r in await driver.create_followups([first])] == [first.id]
    assert await driver.create_followups([attrs.evolve(first, id=new_id())]) == []
    other_trigger = child_of(parent, "on_success")
    assert [r.id for r in await driver.create_followups([other_trigger])] == \
        [other_trigger.id]
