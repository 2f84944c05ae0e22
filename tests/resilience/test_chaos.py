"""Chaos: 2,000 robots through two `rfmvp worker` processes while faults keep coming.

A fault injector kills the workers' PostgreSQL sessions (``pg_terminate_backend``,
filtered by their own application_name) and their Redis connections (``CLIENT KILL ID``,
filtered by their own client name) every half second, and the module fails 30 % of its
attempts (decided by a hash of robot id and attempt, so runs are reproducible). Bounded
in time. At the end:

- every robot is in a terminal state;
- none ran after it reached it (the module logs each run with its start time);
- none succeeded twice (the module logs each successful run);
- the executions match the attempts recorded (released executions are not charged).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from killers import REDIS_URL, kill_redis_clients, terminate_backends

from robotframework_mvp import SubmitRequest
from robotframework_mvp.models import TERMINAL_STATUSES
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

ROBOTS = 2000
WORKERS = 2
FAILURE_PERCENT = 30
MAX_ATTEMPTS = 10
FAULT_INTERVAL = 0.5
BOUND_SECONDS = 120.0

PLUGIN = textwrap.dedent(
    f"""
    import hashlib, os, time
    from pathlib import Path
    import anyio
    from robotframework_mvp import module

    LOG = Path(os.environ["CHAOS_LOG_DIR"])

    @module("flaky", kinds=["chaos"], capacity=20, max_attempts={MAX_ATTEMPTS})
    async def flaky(robot, ctx):
        started = time.time()
        digest = hashlib.sha256(f"{{robot.id}}:{{robot.attempts}}".encode()).digest()
        fails = int.from_bytes(digest[:4], "big") % 100 < {FAILURE_PERCENT}
        await anyio.sleep(digest[4] / 255 * 0.004)
        outcome = "fail" if fails else "ok"
        with open(LOG / f"runs-{{os.getpid()}}.log", "a") as f:
            f.write(f"{{robot.id}} {{robot.attempts}} {{started:.6f}} {{outcome}}\\n")
        if fails:
            raise RuntimeError(f"chaos: attempt {{robot.attempts}} fails")
        return {{"attempt": robot.attempts}}
    """
)


@pytest.fixture
def chaos_dir(tmp_path: Path) -> Path:
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "chaos_plugin.py").write_text(PLUGIN)
    (tmp_path / "log").mkdir()
    return tmp_path


@pytest.fixture
def workers(postgres_url: str, redis_url: str, redis_prefix: str, chaos_dir: Path
            ) -> Iterator[tuple[list[subprocess.Popen[bytes]], str]]:
    """Two worker processes; their sessions and clients are named ``rfmvp_chaos_<hex>``."""
    name = f"rfmvp_chaos_{uuid.uuid4().hex[:10]}"
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(chaos_dir / "plugin"), str(src),
                                       env.get("PYTHONPATH", "")]),
        "RFMVP_STORAGE_URL": f"{postgres_url}&application_name={name}",
        "RFMVP_CACHE_URL": f"{redis_url}?client_name={name}",
        "RFMVP_CACHE_KEY_PREFIX": redis_prefix,
        "RFMVP_PLUGINS": "chaos_plugin",
        "RFMVP_WORKER_CONCURRENCY": "20",
        "RFMVP_LEASE_SECONDS": "3",
        "RFMVP_REAPER_INTERVAL": "0.25",
        "RFMVP_POLL_INTERVAL": "0.1",
        "RFMVP_RETRY_BASE_SECONDS": "0.01",
        "RFMVP_RETRY_CAP_SECONDS": "0.1",
        # The module's circuit opens now and then (30 % failures fill a window of 20 at
        # 50 % from time to time): short open periods and one trial keep that brief.
        "RFMVP_BREAKER_OPEN_SECONDS": "0.5",
        "RFMVP_BREAKER_HALF_OPEN_CALLS": "1",
        "RFMVP_STORAGE_BREAKER_OPEN_SECONDS": "0.5",
        "RFMVP_SHUTDOWN_GRACE_SECONDS": "2",
        "CHAOS_LOG_DIR": str(chaos_dir / "log"),
    })
    procs = []
    for i in range(WORKERS):
        with (chaos_dir / f"worker-{i}.err").open("wb") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "robotframework_mvp.cli", "worker"],
                env=env, stdout=subprocess.DEVNULL, stderr=err))
    yield procs, name
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def test_two_thousand_robots_through_two_workers_under_chaos(
    postgres_url: str, redis_prefix: str, chaos_dir: Path,
    workers: tuple[list[subprocess.Popen[bytes]], str],
) -> None:
    procs, name = workers
    settings = test_settings(postgres_url, worker={"enabled": False},
                             cache={"url": REDIS_URL, "key_prefix": redis_prefix})
    faults = Counter[str]()
    started = time.monotonic()
    async with Orchestrator(settings) as orch:
        with anyio.fail_after(30):
            while "flaky" not in {m.name for m in await orch.state.list_modules()}:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        ids: list[str] = []
        for start in range(0, ROBOTS, 500):
            robots = await orch.submit_many(
                [SubmitRequest(kind="chaos", payload={"i": i})
                 for i in range(start, min(start + 500, ROBOTS))], api_key=TEST_API_KEY)
            ids.extend(r.id for r in robots)

        async def inject_faults() -> None:
            while True:
                await anyio.sleep(FAULT_INTERVAL)
                faults["postgres_sessions_killed"] += await terminate_backends(name)
                faults["redis_clients_killed"] += await kill_redis_clients(name)
                faults["rounds"] += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(inject_faults)
            with anyio.fail_after(BOUND_SECONDS):
                while True:
                    counts = await orch.driver.count_robots()
                    if sum(n for (_, status), n in counts.items()
                           if status in TERMINAL_STATUSES) == ROBOTS:
                        break
                    assert all(p.poll() is None for p in procs), "a worker died"
                    await anyio.sleep(0.25)
            tg.cancel_scope.cancel()
        elapsed = time.monotonic() - started
        assert all(p.poll() is None for p in procs), "a worker died"

    # -- the checks, straight from the store ----------------------------------------------
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        robots = {row[0]: row[1:] for row in conn.execute(
            "SELECT id, status, attempts, EXTRACT(EPOCH FROM finished_at) FROM robots")}
        executions = dict(conn.execute(  # type: ignore[arg-type]
            "SELECT robot_id, count(*) FROM executions WHERE status <> 'released' "
            "GROUP BY robot_id").fetchall())
        execution_statuses = Counter(dict(conn.execute(  # type: ignore[arg-type]
            "SELECT status, count(*) FROM executions GROUP BY status").fetchall()))
    assert set(robots) == set(ids)
    statuses = Counter(status for status, _, _ in robots.values())
    assert set(statuses) <= {s.value for s in TERMINAL_STATUSES}, statuses

    runs: list[tuple[str, int, float, str]] = []
    for log in (chaos_dir / "log").glob("runs-*.log"):
        for line in log.read_text().splitlines():
            robot_id, attempt, at, outcome = line.split()
            runs.append((robot_id, int(attempt), float(at), outcome))
    late = [(r, a) for r, a, at, _ in runs if at > float(robots[r][2])]
    assert not late, f"{len(late)} runs started after their robot ended, e.g. {late[:3]}"
    successes = Counter(r for r, _, _, outcome in runs if outcome == "ok")
    assert max(successes.values()) == 1, "a robot succeeded twice"
    succeeded = {r for r, (status, _, _) in robots.items() if status == "succeeded"}
    assert set(successes) == succeeded, "every success was recorded once, and only those"
    mismatched = {r: (attempts, executions.get(r, 0))
                  for r, (_, attempts, _) in robots.items() if attempts != executions.get(r, 0)}
    assert not mismatched, f"executions differ from attempts: {list(mismatched.items())[:5]}"
    assert len(runs) <= sum(executions.values()), "a run without an execution"

    report = {
        "robots": ROBOTS, "workers": WORKERS, "seconds": round(elapsed, 1),
        "statuses": dict(statuses), "module_runs": len(runs),
        "attempts": sum(attempts for _, attempts, _ in robots.values()),
        "retries": sum(attempts for _, attempts, _ in robots.values()) - ROBOTS,
        "executions": dict(execution_statuses), **faults,
        "circuit_openings": sum(
            (chaos_dir / f"worker-{i}.err").read_text().count("circuit of module 'flaky' opened")
            for i in range(WORKERS)),
    }
    print("CHAOS", json.dumps(report, sort_keys=True))
    assert faults["rounds"] >= 3, "the faults kept coming while the robots ran"
    assert faults["postgres_sessions_killed"] > 0
    assert statuses["succeeded"] >= ROBOTS * 0.99
