"""Many `rfmvp worker` processes sharing one PostgreSQL: exactly-once work and takeover.

Real processes, real signals: SIGKILL in the middle of a robot, SIGSTOP past the lease,
SIGTERM for a graceful stop. Every wait is on an observable condition with a deadline.
"""

from __future__ import annotations

import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _workers import LEASE_SECONDS, Spawn, wait_for, wait_for_modules, worker_processes

from robotframework_mvp import RobotStatus, SubmitRequest
from robotframework_mvp.models import ExecutionStatus
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

PLUGIN = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import anyio
    from robotframework_mvp import module

    LOG = Path(os.environ["MP_LOG_DIR"])

    @module("noop", kinds=["noop"], capacity=10)
    async def noop(robot, ctx):
        with open(LOG / f"noop-{os.getpid()}.log", "a") as f:
            f.write(robot.id + "\\n")
        return {}

    @module("hold", kinds=["hold"], capacity=2, timeout=60, max_attempts=3)
    async def hold(robot, ctx):
        # The n-th start of this robot sleeps payload["seconds"][n - 1].
        start = len(list(LOG.glob(f"hold-{robot.id}-*[0-9]"))) + 1
        (LOG / f"hold-{robot.id}-{start}").write_text(str(os.getpid()))
        await anyio.sleep(robot.payload["seconds"][start - 1])
        (LOG / f"hold-{robot.id}-{start}.done").write_text(str(os.getpid()))
        return {"pid": os.getpid(), "attempt": robot.attempts, "start": start}
    """
)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def spawn_worker(postgres_url: str, log_dir: Path) -> Iterator[Spawn]:
    with worker_processes(postgres_url, log_dir, "mp_plugin", PLUGIN, concurrency=10) as spawn:
        yield spawn


def api_orchestrator(postgres_url: str) -> Orchestrator:
    """An API-only process: submits and reads, runs no worker."""
    settings = test_settings(postgres_url, worker={"enabled": False})
    return Orchestrator(settings)


async def wait_robot(orch: Orchestrator, robot_id: str, predicate: Callable[[Any], bool],
                     timeout: float) -> Any:
    with anyio.fail_after(timeout):
        while True:
            robot = await orch.state.get_robot(robot_id, fresh=True)
            if robot is not None and predicate(robot):
                return robot
            await anyio.sleep(0.05)


async def test_four_workers_run_five_thousand_robots_each_exactly_once(
    postgres_url: str, spawn_worker: Callable[[], subprocess.Popen[bytes]], log_dir: Path
) -> None:
    async with api_orchestrator(postgres_url) as orch:
        workers = [spawn_worker() for _ in range(4)]
        await wait_for_modules(orch, "noop")
        ids: list[str] = []
        for start in range(0, 5000, 500):
            robots = await orch.submit_many(
                [SubmitRequest(kind="noop", payload={"i": i}) for i in range(start, start + 500)],
                api_key=TEST_API_KEY,
            )
            ids.extend(r.id for r in robots)
        with anyio.fail_after(120):
            while True:
                counts = await orch.driver.count_robots()
                if counts.get(("noop", "succeeded"), 0) == 5000:
                    break
                await anyio.sleep(0.2)
        assert all(w.poll() is None for w in workers), "a worker died"
    lines = [ln for f in (log_dir / "log").glob("noop-*.log") for ln in f.read_text().split()]
    assert len(lines) == 5000
    assert set(lines) == set(ids)
    per_process = [len(f.read_text().split()) for f in (log_dir / "log").glob("noop-*.log")]
    assert len(per_process) >= 2, "the work should be shared by several processes"


async def test_a_robot_whose_worker_is_killed_is_finished_by_another_within_lease_plus_5s(
    postgres_url: str, spawn_worker: Callable[[], subprocess.Popen[bytes]], log_dir: Path
) -> None:
    async with api_orchestrator(postgres_url) as orch:
        first = spawn_worker()
        await wait_for_modules(orch, "hold")
        robot = await orch.submit("hold", {"seconds": [30, 0.1]}, api_key=TEST_API_KEY)
        marker = log_dir / "log" / f"hold-{robot.id}-1"
        wait_for(marker.exists, 20, "the first attempt to start")
        assert int(marker.read_text()) == first.pid
        spawn_worker()
        first.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        done = await wait_robot(orch, robot.id, lambda r: r.is_terminal, LEASE_SECONDS + 15)
        assert done.status is RobotStatus.SUCCEEDED
        assert time.monotonic() - killed_at <= LEASE_SECONDS + 5
        executions = await orch.state.list_executions(robot.id)
        assert [e.attempt for e in executions] == [1, 2]
        assert [e.status for e in executions] == [ExecutionStatus.LOST, ExecutionStatus.SUCCEEDED]
        assert done.result is not None
        assert done.result["attempt"] == 2
        assert done.result["pid"] != first.pid


async def test_a_frozen_worker_that_wakes_after_losing_its_lease_writes_nothing(
    postgres_url: str, spawn_worker: Callable[[], subprocess.Popen[bytes]], log_dir: Path
) -> None:
    async with api_orchestrator(postgres_url) as orch:
        frozen = spawn_worker()
        await wait_for_modules(orch, "hold")
        # Attempt 1 sleeps 1.5 s: short enough to finish right after SIGCONT.
        robot = await orch.submit("hold", {"seconds": [1.5, 0.2]}, api_key=TEST_API_KEY)
        wait_for((log_dir / "log" / f"hold-{robot.id}-1").exists, 20, "attempt 1 to start")
        frozen.send_signal(signal.SIGSTOP)
        other = spawn_worker()
        taken = await wait_robot(orch, robot.id, lambda r: r.is_terminal, LEASE_SECONDS + 15)
        assert taken.status is RobotStatus.SUCCEEDED
        assert taken.result == {"pid": other.pid, "attempt": 2, "start": 2}
        frozen.send_signal(signal.SIGCONT)
        # Woken, the frozen worker either finishes its sleep and tries to complete, or its
        # heartbeat notices first; either way it must learn it lost the lease, and say so.
        frozen_log = log_dir / "worker-0.err"
        wait_for(lambda: "lease lost" in frozen_log.read_text(), 20,
                 "the woken worker to notice it lost its lease")
        after = await orch.state.get_robot(robot.id, fresh=True)
        assert after == taken
        executions = await orch.state.list_executions(robot.id)
        assert [e.status for e in executions] == [ExecutionStatus.LOST, ExecutionStatus.SUCCEEDED]


async def test_sigterm_stops_a_worker_cleanly_and_leaves_no_robot_running(
    postgres_url: str, spawn_worker: Callable[[], subprocess.Popen[bytes]], log_dir: Path
) -> None:
    async with api_orchestrator(postgres_url) as orch:
        stopping = spawn_worker()
        await wait_for_modules(orch, "hold")
        robot = await orch.submit("hold", {"seconds": [30, 0.1]}, api_key=TEST_API_KEY)
        wait_for((log_dir / "log" / f"hold-{robot.id}-1").exists, 20, "attempt 1 to start")
        stopping.send_signal(signal.SIGTERM)
        assert stopping.wait(timeout=15) == 0
        handed_back = await orch.state.get_robot(robot.id, fresh=True)
        assert handed_back is not None
        assert handed_back.status is RobotStatus.QUEUED
        assert handed_back.attempts == 0, "a graceful stop does not charge the attempt"
        executions = await orch.state.list_executions(robot.id)
        assert [e.status for e in executions] == [ExecutionStatus.RELEASED]
        counts = await orch.driver.count_robots()
        assert counts.get(("hold", "running"), 0) == 0
        spawn_worker()
        done = await wait_robot(orch, robot.id, lambda r: r.is_terminal, 20)
        assert done.status is RobotStatus.SUCCEEDED
        assert done.attempts == 1
