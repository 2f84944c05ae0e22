"""Real `rfmvp worker` processes for the multi-process tests, and waits with deadlines.

Each test module brings its own plugin source (the modules the workers run); this file
starts the processes against a test's PostgreSQL schema, keeps each one's stderr in a
file the test can read, and makes sure none outlives its test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from robotframework_mvp.orchestrator import Orchestrator

LEASE_SECONDS = 2.0
SRC = Path(__file__).resolve().parents[2] / "src"

Spawn = Callable[..., subprocess.Popen[bytes]]


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll a condition another process makes true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def wait_for_modules(orch: Orchestrator, *names: str) -> None:
    """Worker processes register their modules in the store when they start."""
    with anyio.fail_after(30):
        # Another process writes the records: polling the store is the only signal.
        while not set(names) <= {m.name for m in await orch.state.list_modules()}:  # noqa: ASYNC110
            await anyio.sleep(0.05)


@contextmanager
def worker_processes(postgres_url: str, root: Path, plugin_name: str, plugin_source: str,
                     concurrency: int) -> Iterator[Spawn]:
    """Write the plugin under ``root/plugin``, yield ``spawn(**env_changes)``, kill all.

    Each worker's stderr goes to ``root/worker-<n>.err``; the plugin may write to
    ``root/log`` (``MP_LOG_DIR``).
    """
    (root / "plugin").mkdir(exist_ok=True)
    (root / "plugin" / f"{plugin_name}.py").write_text(plugin_source)
    (root / "log").mkdir(exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(**env_changes: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update({
            "PYTHONPATH": os.pathsep.join([str(root / "plugin"), str(SRC),
                                           env.get("PYTHONPATH", "")]),
            "RFMVP_STORAGE_URL": postgres_url,
            "RFMVP_CACHE_URL": "memory://",
            "RFMVP_PLUGINS": plugin_name,
            "RFMVP_LEASE_SECONDS": str(LEASE_SECONDS),
            "RFMVP_REAPER_INTERVAL": "0.25",
            "RFMVP_POLL_INTERVAL": "0.2",
            "RFMVP_WORKER_CONCURRENCY": str(concurrency),
            "RFMVP_SHUTDOWN_GRACE_SECONDS": "1",
            "RFMVP_RETRY_BASE_SECONDS": "0.01",
            "MP_LOG_DIR": str(root / "log"),
        })
        env.update(env_changes)
        err = (root / f"worker-{len(procs)}.err").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "robotframework_mvp.cli", "worker"],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
        err.close()
        procs.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a test may have frozen it
                proc.kill()
            proc.wait(timeout=10)
