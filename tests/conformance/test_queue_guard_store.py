"""Specification of the store writes of the queue guard, for every driver: queued robots of
an unavailable module are moved to another module, or failed past the deadline."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from robotframework_mvp.models import ErrorInfo, Robot, RobotStatus, new_id, utcnow
from robotframework_mvp.state.driver import StorageDriver

pytestmark = pytest.mark.anyio

ERROR = ErrorInfo("no_module_available", "module 'a' is unavailable")


def robot(**changes: Any) -> Robot:
    fields: dict[str, Any] = {
        "id": new_id(), "kind": "ocr", "payload": {}, "owner": "alice", "tenant": "acme",
        "status": RobotStatus.QUEUED, "module": "a",
        "scheduled_at": utcnow() - timedelta(seconds=60),
    }
    fields.update(changes)
    return Robot(**fields)


async def test_reassign_moves_only_queued_robots_of_that_module_and_kind(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    moving = [robot() for _ in range(3)]
    other_kind, other_module, future = robot(kind="pdf"), robot(module="c"), \
        robot(scheduled_at=now + timedelta(hours=1))
    running = robot()
    await driver.create_robots([*moving, other_kind, other_module, future, running])
    claims = await driver.claim_robots(module="a", limit=1, worker="w", now=now,
                                       lease_expires_at=now + timedelta(seconds=30))
    claimed = claims[0].robot.id
    assert await driver.reassign_queued_robots("a", "ocr", "b", now, 1000) == 4
    after = {r.id: await driver.get_robot(r.id) for r in
             [*moving, other_kind, other_module, future, running]}
    assert after[claimed] is not None
    assert after[claimed].module == "a"  # type: ignore[union-attr]
    assert after[claimed].status is RobotStatus.RUNNING  # type: ignore[union-attr]
    moved = {rid for rid, r in after.items() if r is not None and r.module == "b"}
    assert len(moved) == 4  # the queued ocr robots of a, due or not
    assert other_kind.id not in moved
    assert other_module.id not in moved
    assert await driver.reassign_queued_robots("a", "ocr", "b", now, 1000) == 0


async def test_reassign_respects_its_limit(driver: StorageDriver) -> None:
    await driver.create_robots([robot() for _ in range(5)])
    assert await driver.reassign_queued_robots("a", "ocr", "b", utcnow(), 2) == 2
    assert await driver.reassign_queued_robots("a", "ocr", "b", utcnow(), 10) == 3


async def test_fail_queued_fails_only_robots_due_before_the_cutoff(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    old = [robot(scheduled_at=now - timedelta(seconds=600)) for _ in range(2)]
    recent = robot(scheduled_at=now - timedelta(seconds=5))
    elsewhere = robot(module="b", scheduled_at=now - timedelta(seconds=600))
    await driver.create_robots([*old, recent, elsewhere])
    failed = await driver.fail_queued_robots("a", "ocr", now - timedelta(seconds=300), ERROR,
                                             now, 1000)
    assert {r.id for r in failed} == {r.id for r in old}
    for stored in failed:
        assert stored.status is RobotStatus.FAILED
        assert stored.error == ERROR
        assert stored.finished_at is not None
        assert stored.attempts == 0
    assert (await driver.get_robot(recent.id)).status is RobotStatus.QUEUED  # type: ignore[union-attr]
    assert (await driver.get_robot(elsewhere.id)).status is RobotStatus.QUEUED  # type: ignore[union-attr]
    assert await driver.fail_queued_robots("a", "ocr", now, ERROR, now, 1000) != []
    assert await driver.fail_queued_robots("a", "ocr", now, ERROR, now, 1000) == []
