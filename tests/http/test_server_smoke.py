"""``python examples/server.py`` as a real process: banner, health, robots, clean SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "examples" / "server.py"


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line matching {pattern!r}; output:\n{self.output()}")
            try:
                self.seen.append(self.lines.get(timeout=min(remaining, 0.25)))
            except queue.Empty:
                if self.proc.poll() is not None:
                    pytest.fail(f"the server exited early; output:\n{self.output()}")
                continue
            match = re.search(pattern, self.seen[-1])
            if match:
                return match

    def wait_healthy(self, client: httpx.Client, timeout: float = 10) -> None:
        """Until ``GET /health`` answers 200 (the server may still be binding its port)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.1)

    def output(self) -> str:
        """Everything printed so far (all of it once the process has exited)."""
        if self.proc.poll() is not None:
            self.reader.join(5)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def example_server(tmp_path: Path, **env_changes: str) -> Iterator[Server]:
    """``examples/server.py`` on a free port and a fresh SQLite file; killed afterwards.

    The test's own RFMVP_* variables are dropped (so, unless given, there are no API keys
    and the server prints a demo key).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFMVP_")}
    env.update(RFMVP_PORT=str(port), RFMVP_HOST="127.0.0.1", PYTHONUNBUFFERED="1",
               RFMVP_STORAGE_URL=f"sqlite:///{tmp_path / 'robots.db'}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                        env.get("PYTHONPATH")])))
    env.update(env_changes)
    proc = subprocess.Popen([sys.executable, str(SERVER)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield Server(proc, f"http://127.0.0.1:{port}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with example_server(tmp_path) as started:
        yield started


def test_server_runs_robots_and_stops_cleanly(server: Server) -> None:
    key = server.wait_for_line(r"API key: (\S+)", timeout=15).group(1)
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=10) as client:
        server.wait_healthy(client)

        resp = client.post("/api/v1/robots",
                           json={"kind": "echo", "payload": {"hello": "world"}, "wait": 5})
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"] == {"echo": {"hello": "world"}}

        robot = client.post("/api/v1/robots", json={"kind": "sleep", "payload": {"seconds": 1}})
        assert robot.status_code == 202, robot.text
        deadline = time.monotonic() + 10
        while True:
            current = client.get(f"/api/v1/robots/{robot.json()['id']}").json()
            if current["status"] == "succeeded":
                break
            assert current["status"] in ("queued", "running"), current
            assert time.monotonic() < deadline, current
            time.sleep(0.1)
        assert current["progress"] == 100
        assert current["progress_message"] == "slept 1.0 of 1 s"
        assert current["result"] == {"slept": 1}

        refused = client.post("/api/v1/robots",
                              json={"kind": "sleep", "payload": {"seconds": 7200}})
        assert refused.status_code == 422  # the demo plugin's validate_robot hook
        assert refused.json()["error"]["path"] == "$.payload"
        assert client.get("/api/v1/robots", headers={"X-API-Key": "wrong"}).status_code == 401

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    text = server.output()
    # The banner, printed once: URL, key and a curl command ready to paste.
    assert text.count("API key: ") == 1
    assert f"URL:     {server.url}" in text
    assert (f"curl -s -X POST {server.url}/api/v1/robots -H \"X-API-Key: {key}\" "
            "-H 'content-type: application/json' "
            "-d '{\"kind\":\"echo\",\"payload\":{\"hello\":\"world\"},\"wait\":5}'") in text
    assert "Application shutdown complete" in text
    assert "Traceback" not in text
