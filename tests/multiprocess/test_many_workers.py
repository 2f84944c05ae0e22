"""Many `rfmvp worker` processes sharing one PostgreSQL: exactly-once work and takeover.

Real processes, real signals: SIGKILL in the middle of a robot, SIGSTOP past the lease,
SIGTERM for a graceful stop. Every wait is on an observable condition with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from robotframework_mvp import RobotStatus, SubmitRequest
from robotframework_mvp.models import ExecutionStatus
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

LEASE_SECONDS = 2.0

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


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "mp_plugin.py").write_text(PLUGIN)
    (tmp_path / "log").mkdir()
    return tmp_path


@pytest.fixture
def spawn_worker(
    postgres_url: str, log_dir: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    src = Path(__file__).resolve().parents[2] / "src"

    def spawn() -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join([str(log_dir / "plugin"), str(src),
                                           env.get("PYTHONPATH", "")]),
            "RFMVP_STORAGE_URL": postgres_url,
            "RFMVP_CACHE_URL": "memory://",
            "RFMVP_PLUGINS": "mp_plugin",
            "RFMVP_LEASE_SECONDS": str(LEASE_SECONDS),
            "RFMVP_REAPER_INTERVAL": "0.25",
            "RFMVP_POLL_INTERVAL": "0.2",
            "RFMVP_WORKER_CONCURRENCY": "10",
            "RFMVP_SHUTDOWN_GRACE_SECONDS": "1",
            "RFMVP_RETRY_BASE_SECONDS": "0.01",
            "MP_LOG_DIR": str(log_dir / "log"),
        })
        err = (log_dir / f"worker-{len(procs)}.err").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "robotframework_mvp.cli", "worker"],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
        err.close()
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)


def api_orchestrator(postgres_url: str) -> Orchestrator:
    """An API-only process: submits and reads, runs no worker."""
    settings = test_settings(postgres_url, worker={"enabled": False})
    return Orchestrator(settings)


async def wait_for_modules(orch: Orchestrator, *names: str) -> None:
    """Worker processes register their modules in the store when they start."""
    with anyio.fail_after(30):
        # Another process writes the records: polling the store is the only signal.
        while not set(names) <= {m.name for m in await orch.state.list_modules()}:  # noqa: ASYNC110
            await anyio.sleep(0.05)


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
