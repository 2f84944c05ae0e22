"""The dashboard in a real browser: ``examples/server.py`` serves it, headless Chromium draws it.

The server runs as a real process with a few robots done. Chromium (Debian's package)
loads ``/dashboard#key=<admin key>``, runs its script against ``/dashboard/data`` and
gives back the rendered DOM and a screenshot, kept at ``artifacts/dashboard.png`` for CI.
Without Chromium the test skips, except under ``RFMVP_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from robotframework_mvp.performance import OPERATIONS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_server_smoke import ROOT, Server, example_server

ADMIN_KEY = "ops-admin-key-0123456789"
USER_KEY = "alice-user-key-0123456789"
ARTIFACT = ROOT / "artifacts" / "dashboard.png"
REQUIRE = os.environ.get("RFMVP_REQUIRE_SERVICES") == "1"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "Chromium is not installed (apt-get install chromium)"
    if REQUIRE:
        pytest.fail(message + " and RFMVP_REQUIRE_SERVICES=1")
    pytest.skip(message)
    raise AssertionError  # unreachable


@pytest.fixture
def dashboard_server(tmp_path: Path) -> Iterator[Server]:
    with example_server(tmp_path, RFMVP_API_KEYS=f"ops:{ADMIN_KEY},alice:{USER_KEY}",
                        RFMVP_ADMIN_PRINCIPALS="ops", RFMVP_RATE_LIMIT="none") as started:
        yield started


def _browse(chromium: str, profile: Path, *args: str, timeout: float = 60) -> str:
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-extensions",
               f"--user-data-dir={profile}", "--window-size=1280,900",
               "--virtual-time-budget=5000", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _distinct_colors(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return 0 if colors is None else len(colors)


def test_the_dashboard_shows_real_robots_modules_and_step_latencies(
    dashboard_server: Server, tmp_path: Path,
) -> None:
    chromium = _chromium()
    server = dashboard_server
    server.wait_for_line(r"Dashboard: ", timeout=15)
    with httpx.Client(base_url=server.url, timeout=15) as client:
        server.wait_healthy(client)
        admin = {"X-API-Key": ADMIN_KEY}
        for n in range(12):
            done = client.post("/api/v1/robots", headers=admin,
                               json={"kind": "echo", "payload": {"n": n}, "wait": 5})
            assert done.status_code == 200, done.text
        slept = client.post("/api/v1/robots", headers=admin,
                            json={"kind": "sleep", "payload": {"seconds": 1}, "wait": 10})
        assert slept.json()["status"] == "succeeded"

        page = client.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'sha256-" in page.headers["content-security-policy"]
        assert client.get("/dashboard/data").status_code == 401
        assert client.get("/dashboard/data", headers={"X-API-Key": USER_KEY}).status_code == 403
        data = client.get("/dashboard/data", headers=admin).json()
        assert data["robots"]["by_status"]["succeeded"] == 13
        assert {m["name"] for m in data["modules"]} == {"echo", "sleep"}
        assert data["failures"] == []
        steps = {s["operation"]: s for s in data["steps"]}
        assert list(steps) == list(OPERATIONS)
        assert all(steps[op]["count"] > 0 for op in OPERATIONS), steps

    url = f"{server.url}/dashboard#key={ADMIN_KEY}"
    dom = _browse(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    assert 'id="modules"' in dom
    modules = re.search(r'<div id="modules">(.*?)</div>', dom, re.DOTALL)
    assert modules is not None
    assert "<td>echo</td>" in modules.group(1)
    assert "<td>sleep</td>" in modules.group(1)
    succeeded = re.search(r"<b>(\d+)</b><span>succeeded</span>", dom)
    assert succeeded is not None, dom[:3000]
    assert int(succeeded.group(1)) == 13
    for operation in OPERATIONS:
        assert f'data-operation="{operation}"' in dom
    assert 'data-budget="5-10"' in dom  # the budget band of the validation step
    assert "polyline" in dom  # the charts were drawn
    assert '<div id="error"></div>' in dom  # no error shown

    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.unlink(missing_ok=True)
    _browse(chromium, tmp_path / "profile-shot", f"--screenshot={ARTIFACT}", url)
    assert ARTIFACT.is_file()
    assert ARTIFACT.stat().st_size > 10_000
    assert _distinct_colors(ARTIFACT) > 50, "the screenshot looks blank"
    print(f"dashboard screenshot: {ARTIFACT}")
