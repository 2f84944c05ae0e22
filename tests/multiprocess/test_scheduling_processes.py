"""Schedules, delayed robots and chains across real `rfmvp worker` processes on PostgreSQL.

Real processes and real signals: three schedulers race for every due time, a process is
SIGKILLed and restarted to test each misfire policy, and a worker is SIGKILLed around
the completion that creates a chain's follow-up. Every wait has a deadline.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from _workers import LEASE_SECONDS, Spawn, wait_for, wait_for_modules, worker_processes

from robotframework_mvp import RobotStatus
from robotframework_mvp.models import ExecutionStatus, Robot, utcnow
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.slow]

PLUGIN = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import anyio
    from robotframework_mvp import module

    LOG = Path(os.environ["MP_LOG_DIR"])

    @module("tick", kinds=["tick"], capacity=20)
    async def tick(robot, ctx):
        return {}

    @module("early", kinds=["early"], capacity=20)
    async def early(robot, ctx):
        # The wall clock when the module started, next to when the robot was due.
        with open(LOG / f"early-{os.getpid()}.log", "a") as f:
            f.write(f"{robot.id} {time.time()!r} {robot.scheduled_at.timestamp()!r}\\n")
        return {}

    @module("parent", kinds=["parent"], capacity=5, max_attempts=5)
    async def parent(robot, ctx):
        (LOG / f"parent-{robot.id}-{robot.attempts}").write_text(str(os.getpid()))
        await anyio.sleep(robot.payload["sleep"] if robot.attempts == 1 else 0)
        return {"attempt": robot.attempts, "pid": os.getpid()}

    @module("child", kinds=["child"], capacity=5)
    async def child(robot, ctx):
        with open(LOG / f"child-{os.getpid()}.log", "a") as f:
            f.write(f"{robot.id} {robot.payload['parent']}\\n")
        return {}
    """
)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def spawn_worker(postgres_url: str, log_dir: Path) -> Iterator[Spawn]:
    with worker_processes(postgres_url, log_dir, "mp_sched_plugin", PLUGIN,
                          concurrency=20) as spawn:
        yield spawn


def api_orchestrator(postgres_url: str) -> Orchestrator:
    """An API-only process: no worker, no scheduler (the worker processes fire)."""
    settings = test_settings(postgres_url, worker={"enabled": False},
                             background={"scheduler_enabled": False})
    return Orchestrator(settings)


async def schedule_robots(orch: Orchestrator, schedule_id: str) -> list[Robot]:
    robots = await orch.state.list_robots(tenant=None, kind="tick", limit=100_000)
    return [r for r in robots if r.schedule_id == schedule_id]


async def test_three_processes_sharing_a_schedule_fire_each_due_time_exactly_once(
    postgres_url: str, spawn_worker: Callable[..., subprocess.Popen[bytes]],
) -> None:
    async with api_orchestrator(postgres_url) as orch:
        workers = [spawn_worker() for _ in range(3)]
        await wait_for_modules(orch, "tick")
        schedule = await orch.add_schedule("tick", {}, cron="* * * * * *", api_key=TEST_API_KEY)
        await anyio.sleep(20)
        await orch.pause_schedule(schedule.id, api_key=TEST_API_KEY)
        assert all(w.poll() is None for w in workers), "a worker died"
        fires = await orch.driver.list_schedule_fires(schedule.id, 1000)
        robots = await schedule_robots(orch, schedule.id)
    per_due = Counter(r.scheduled_at for r in robots)
    assert set(per_due.values()) == {1}, "a due time fired more than one robot"
    dues = sorted(per_due)
    assert len(dues) >= 19
    assert dues == [dues[0] + timedelta(seconds=i) for i in range(len(dues))], "a gap"
    assert sorted(f.due_at for f in fires) == dues
    assert {f.robot_id for f in fires} == {r.id for r in robots}
    assert not any(f.late for f in fires)
    lateness = sorted((f.fired_at - f.due_at).total_seconds() for f in fires)
    assert lateness[len(lateness) // 2] < 0.25, f"median lateness {lateness}"
    assert lateness[-1] < 0.9, f"worst lateness {lateness[-1]}"


async def test_after_a_five_second_outage_each_misfire_policy_does_what_it_says(
    postgres_url: str, spawn_worker: Callable[..., subprocess.Popen[bytes]],
) -> None:
    # A grace wide enough that a freshly started, busy CI process is never late for the
    # first due time after the restart (that would be a second, legitimate misfire).
    grace = {"RFMVP_MISFIRE_GRACE_SECONDS": "1.0"}
    async with api_orchestrator(postgres_url) as orch:
        first = spawn_worker(**grace)
        await wait_for_modules(orch, "tick")
        ids = {}
        for policy in ("skip", "run_once", "run_all"):
            ids[policy] = (await orch.add_schedule(
                "tick", {}, cron="* * * * * *", misfire_policy=policy, api_key=TEST_API_KEY)).id

        async def fired(schedule_id: str) -> list[Any]:
            return await orch.driver.list_schedule_fires(schedule_id, 1000)

        with anyio.fail_after(20):
            while min([len(await fired(i)) for i in ids.values()]) < 3:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = utcnow()
        await anyio.sleep(5)
        spawn_worker(**grace)
        with anyio.fail_after(30):
            while min([len([f for f in await fired(i) if f.fired_at > killed_at])  # noqa: ASYNC110
                       for i in ids.values()]) < 3:
                await anyio.sleep(0.05)
        for schedule_id in ids.values():
            await orch.pause_schedule(schedule_id, api_key=TEST_API_KEY)
        results = {policy: sorted(await fired(i), key=lambda f: f.due_at)
                   for policy, i in ids.items()}
        robots = {policy: await schedule_robots(orch, i) for policy, i in ids.items()}

    def hole(fires: list[Any]) -> int:
        """The most consecutive due times that fired nothing."""
        return max(int((b.due_at - a.due_at).total_seconds()) - 1
                   for a, b in itertools.pairwise(fires))

    for policy, fires in results.items():
        # One robot per due time. (Matched by id, not by the robots' scheduled_at: a robot
        # the killed worker held is requeued by the reaper, which moves its scheduled_at.)
        assert len({f.due_at for f in fires}) == len(fires), f"{policy}: a due time fired twice"
        assert sorted(f.robot_id for f in fires) == sorted(r.id for r in robots[policy])
    # skip: the outage left a hole of at least the 5 s it lasted (less the grace)
    assert not any(f.late for f in results["skip"])
    assert hole(results["skip"]) >= 3
    # run_once: one late robot stands for the whole outage
    late = [f for f in results["run_once"] if f.late]
    assert len(late) == 1
    assert late[0].covers >= 3
    assert hole(results["run_once"]) >= 3
    # run_all: every missed due time fired, late, and nothing is missing
    assert hole(results["run_all"]) == 0
    assert len([f for f in results["run_all"] if f.late]) >= 3


async def test_a_delayed_robot_is_never_claimed_early(
    postgres_url: str, spawn_worker: Callable[..., subprocess.Popen[bytes]], log_dir: Path,
) -> None:
    async with api_orchestrator(postgres_url) as orch:
        for _ in range(3):
            spawn_worker()
        await wait_for_modules(orch, "early")
        rng = random.Random(9)
        submitted = []
        for i in range(60):
            if i % 2:
                robot = await orch.submit("early", {}, api_key=TEST_API_KEY,
                                          delay=rng.uniform(0.05, 3.0))
            else:
                robot = await orch.submit(
                    "early", {}, api_key=TEST_API_KEY,
                    run_at=utcnow() + timedelta(seconds=rng.uniform(0.05, 3.0)))
            submitted.append(robot)
        with anyio.fail_after(30):
            while (await orch.driver.count_robots()).get(("early", "succeeded"), 0) < 60:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        for robot in submitted:
            stored = await orch.state.get_robot(robot.id, fresh=True)
            assert stored is not None
            assert stored.started_at is not None
            assert stored.started_at >= robot.scheduled_at, f"{robot.id} claimed early"
    lines = [ln.split() for f in (log_dir / "log").glob("early-*.log")
             for ln in f.read_text().splitlines()]
    assert len(lines) == 60
    for _robot_id, started, due in lines:
        assert float(started) >= float(due), "a module started before its robot was due"


async def test_a_chain_creates_its_follow_up_once_when_the_parents_worker_is_killed(
    postgres_url: str, spawn_worker: Callable[..., subprocess.Popen[bytes]], log_dir: Path,
) -> None:
    """SIGKILL the worker of the parent while the module runs, right around its
    completion (a few milliseconds either side), and after the completion: either the
    completion committed with its follow-up, or another worker runs the parent again
    after the lease expired; the follow-up exists once, and runs once per attempt. (The
    same worker may have claimed the follow-up when the kill lands: that attempt is
    lost with it, perhaps after its module ran, and another worker runs it again.)"""
    log = log_dir / "log"
    kill_after: list[float | None] = [None, 0.0, 0.001, 0.003, 0.005, 0.01, 0.02, 0.05]
    outcomes = []
    attempts: Counter[str] = Counter()
    async with api_orchestrator(postgres_url) as orch:
        workers = [spawn_worker(), spawn_worker()]
        await wait_for_modules(orch, "parent", "child")
        for delay in kill_after:
            parent = await orch.submit(
                "parent", {"sleep": 30 if delay is None else 0}, api_key=TEST_API_KEY,
                on_success={"kind": "child", "payload": {"parent": "$parent.id"}})
            marker = log / f"parent-{parent.id}-1"
            wait_for(marker.exists, 20, "the parent's first attempt to start", interval=0.01)
            pid = int(wait_for(marker.read_text, 5, "the marker's pid", interval=0.01))
            if delay:
                time.sleep(delay)  # noqa: ASYNC251 - milliseconds, and nothing may run meanwhile
            os.kill(pid, signal.SIGKILL)
            killed = next(w for w in workers if w.pid == pid)
            killed.wait(timeout=10)
            workers = [w for w in workers if w.pid != pid] + [spawn_worker()]
            with anyio.fail_after(LEASE_SECONDS + 20):
                while True:
                    done = await orch.state.get_robot(parent.id, fresh=True)
                    children = [r for r in await orch.state.list_robots(
                        tenant=None, kind="child", limit=1000) if r.parent_id == parent.id]
                    if (done is not None and done.is_terminal and children
                            and all(c.is_terminal for c in children)):
                        break
                    await anyio.sleep(0.05)
            assert done.status is RobotStatus.SUCCEEDED
            assert len(children) == 1, f"{len(children)} follow-ups for one parent"
            assert children[0].status is RobotStatus.SUCCEEDED
            assert children[0].payload == {"parent": parent.id}
            outcomes.append(done.attempts)
            executions = await orch.state.list_executions(children[0].id)
            assert [e.attempt for e in executions] == list(range(1, children[0].attempts + 1))
            assert all(e.status is ExecutionStatus.LOST and e.worker.split(":")[1] == str(pid)
                       for e in executions[:-1]), "only the killed worker loses an attempt"
            attempts[children[0].id] = children[0].attempts
    ran = Counter(line.split()[0] for f in log.glob("child-*.log")
                  for line in f.read_text().splitlines())
    # At most once per attempt: an attempt lost with the killed worker may have run or not.
    assert ran.keys() == attempts.keys()
    assert all(1 <= ran[child] <= attempts[child] for child in attempts), (ran, attempts)
    # The first case (killed mid-module) must have been run again by another worker.
    assert outcomes[0] == 2
