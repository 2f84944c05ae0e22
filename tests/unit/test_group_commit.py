"""Group commit: concurrent completions share writes, and nothing is lost or mixed up."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import anyio
import anyio.lowlevel
import pytest

from robotframework_mvp.group_commit import GroupCommitter
from robotframework_mvp.models import Robot, RobotStatus
from robotframework_mvp.state.driver import Completion

pytestmark = pytest.mark.anyio


def _completion(i: int) -> Completion:
    return Completion(robot_id=f"r{i}", lease_token=f"t{i}", status=RobotStatus.SUCCEEDED,
                      execution_status="succeeded", finished_at=datetime.now(UTC),
                      duration_ms=1.0)


def _robot(robot_id: str) -> Robot:
    return Robot(id=robot_id, kind="k", payload={}, owner="o", tenant="o",
                 status=RobotStatus.SUCCEEDED)


class SlowStore:
    """Each write waits until the test lets it go, and records what it was given."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = anyio.Event()

    async def write_many(self, completions: Sequence[Completion]) -> list[Robot | None]:
        self.batches.append([c.robot_id for c in completions])
        await self.release.wait()
        return [None if c.robot_id == "r3" else _robot(c.robot_id) for c in completions]


async def test_completions_arriving_during_a_write_share_the_next_one() -> None:
    store = SlowStore()
    committer = GroupCommitter(store.write_many)
    results: dict[int, Robot | None] = {}

    async def complete(i: int) -> None:
        results[i] = await committer.write(_completion(i))

    async with anyio.create_task_group() as tg:
        tg.start_soon(complete, 0)
        with anyio.fail_after(5):
            while not store.batches:  # r0's write is under way
                await anyio.lowlevel.checkpoint()
        for i in range(1, 6):
            tg.start_soon(complete, i)
        with anyio.fail_after(5):
            while committer.queued < 5:
                await anyio.lowlevel.checkpoint()
        store.release.set()
    assert store.batches == [["r0"], ["r1", "r2", "r3", "r4", "r5"]]
    assert {i: None if r is None else r.id for i, r in results.items()} == {
        0: "r0", 1: "r1", 2: "r2", 3: None, 4: "r4", 5: "r5"}


async def _six_ready_together(*, first_turn: bool, write_waits: bool) -> list[list[str]]:
    """Six completions ready in the same turn of the loop; the batches the store saw.
    Each completion must come back with its own robot."""
    batches: list[list[str]] = []

    async def write_many(completions: Sequence[Completion]) -> list[Robot | None]:
        batches.append([c.robot_id for c in completions])
        if write_waits:
            await anyio.lowlevel.checkpoint()
        return [_robot(c.robot_id) for c in completions]

    committer = GroupCommitter(write_many, first_turn=first_turn)
    results: dict[int, str] = {}

    async def complete(i: int) -> None:
        robot = await committer.write(_completion(i))
        assert robot is not None
        results[i] = robot.id

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(complete, i)
    assert results == {i: f"r{i}" for i in range(6)}
    return batches


async def test_completions_ready_together_share_a_write_that_never_yields() -> None:
    """A write that runs without yielding (SQLite's inline write of a few robots) gets
    no company while it runs; robots finishing in the same turn of the loop must still
    share it, or every robot pays a transaction of its own under load."""
    batches = await _six_ready_together(first_turn=True, write_waits=False)
    assert batches == [["r0", "r1", "r2", "r3", "r4", "r5"]]


async def test_without_a_first_turn_a_lone_call_writes_at_once_and_the_rest_share_the_next(
) -> None:
    """``first_turn=False`` (a rate-limit check on Redis): the first caller's call goes
    out before the callers ready in the same turn run; they share the next one (a network
    call always waits, so they never miss it)."""
    batches = await _six_ready_together(first_turn=False, write_waits=True)
    assert batches == [["r0"], ["r1", "r2", "r3", "r4", "r5"]]


async def test_a_failed_write_fails_every_completion_of_its_batch_and_no_other() -> None:
    calls = 0

    async def write_many(completions: Sequence[Completion]) -> list[Robot | None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("store gone")
        return [_robot(c.robot_id) for c in completions]

    committer = GroupCommitter(write_many)
    with pytest.raises(ConnectionError):
        await committer.write(_completion(1))
    robot = await committer.write(_completion(2))
    assert robot is not None
    assert robot.id == "r2"


async def test_a_writer_cancelled_mid_write_still_writes_for_those_who_joined_it() -> None:
    """The first caller writes for everyone who joined it (a submission whose HTTP
    request goes away, say). Its cancellation must not fail their writes."""
    store = SlowStore()
    committer = GroupCommitter(store.write_many)
    results: dict[int, str | None] = {}

    async def complete(i: int) -> None:
        robot = await committer.write(_completion(i))
        results[i] = None if robot is None else robot.id

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, anyio.create_task_group() as leader:
            leader.start_soon(complete, 0)
            while not store.batches:  # r0's write is under way
                await anyio.lowlevel.checkpoint()
            for i in (1, 2):
                tg.start_soon(complete, i)
            while committer.queued < 2:
                await anyio.lowlevel.checkpoint()
            leader.cancel_scope.cancel()  # the first caller goes away mid-write
            store.release.set()
    assert store.batches == [["r0"], ["r1", "r2"]]
    # r0 was written too, so its caller may as well hear so; the point is r1 and r2
    assert results == {0: "r0", 1: "r1", 2: "r2"}
