"""The dead-letter view: robots that used up their attempts stay listable and can be
queued again, from Python, over HTTP and with ``rfmvp``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from robotframework_mvp import ModuleContext, Robot, RobotStatus, module
from robotframework_mvp.cli import main
from robotframework_mvp.http import HttpApi
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.testing import TEST_API_KEY, test_settings

pytestmark = pytest.mark.anyio


@module("brittle", max_attempts=2)
async def brittle(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    if robot.payload.get("break", True):
        raise ConnectionError(f"partner API refused attempt {ctx.attempt}")
    return {}


async def test_failed_robots_are_listed_with_their_last_error_and_can_be_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"sqlite:///{tmp_path / 'robots.db'}"
    async with Orchestrator(test_settings(url), modules=[brittle]) as orch:
        robot = await orch.process_robot("brittle", {}, api_key=TEST_API_KEY, timeout=10)
        assert robot.status is RobotStatus.FAILED
        assert robot.attempts == 2
        api = HttpApi(orch)
        listed = await api.list_robots({"status": "failed"}, {"X-API-Key": TEST_API_KEY}, None)
        assert listed.status == 200
        [item] = listed.body["items"]
        assert item["id"] == robot.id
        assert item["error"] == {"type": "ConnectionError",
                                 "message": "partner API refused attempt 2"}

    # The operator, from a terminal (the CLI reads the store directly; no worker runs).
    for name in list(os.environ):
        if name.startswith("RFMVP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RFMVP_STORAGE_URL", url)
    assert await anyio.to_thread.run_sync(main, ["robots", "list", "--status", "failed"]) == 0
    out = capsys.readouterr().out
    assert robot.id in out
    assert "ConnectionError" in out
    assert await anyio.to_thread.run_sync(main, ["robots", "retry", robot.id,
                                                 "--attempts", "2"]) == 0
    assert "queued again" in capsys.readouterr().out

    async with Orchestrator(test_settings(url), modules=[brittle]) as orch:
        requeued = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
        assert requeued.status is RobotStatus.FAILED, "it still fails: attempts 3 and 4 ran"
        assert requeued.attempts == 4
        assert len(await orch.executions(robot.id, api_key=TEST_API_KEY)) == 4
