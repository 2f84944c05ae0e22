"""Helpers for testing modules and plugins against a real, in-process orchestrator.

Built on the real Orchestrator with the embedded backends (SQLite in a temporary file,
the memory cache), not on mocks, so a module that passes here behaves the same in
production::

    from robotframework_mvp.testing import run_robot

    async def test_echo():
        robot = await run_robot(echo, "echo", {"x": 1})
        assert robot.result == {"echo": {"x": 1}}
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from .config import (
    ResilienceConfig,
    SecurityConfig,
    Settings,
    StaticKey,
    StorageConfig,
    WorkerConfig,
)
from .models import Robot
from .modules import Module
from .orchestrator import Orchestrator

__all__ = ["TEST_API_KEY", "TEST_PRINCIPAL", "run_robot", "running_orchestrator",
           "test_settings"]

TEST_PRINCIPAL = "tester"
TEST_API_KEY = "rfmvp-test-key-0123456789"


def test_settings(storage_url: str, **changes: Any) -> Settings:
    """Settings for tests: one static key, no rate limit, fast retries and polling."""
    settings = Settings(
        storage=StorageConfig(url=storage_url),
        security=SecurityConfig(
            api_keys=(StaticKey(TEST_PRINCIPAL, TEST_API_KEY),),
            rate_limit=None,
            audit_flush_interval=0.01,
        ),
        worker=WorkerConfig(poll_interval=0.05, lease_seconds=10.0,
                            shutdown_grace_seconds=2.0),
        resilience=ResilienceConfig(retry_base_seconds=0.01, retry_cap_seconds=0.05),
    )
    return settings.with_changes(**changes) if changes else settings


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@asynccontextmanager
async def running_orchestrator(
    *modules: Module,
    settings: Settings | None = None,
    plugins: Iterable[object] = (),
    **changes: Any,
) -> AsyncIterator[Orchestrator]:
    """An orchestrator on a throwaway SQLite file; ``changes`` edit settings sections.

    ``running_orchestrator(echo, worker={"concurrency": 4})``.
    """
    with tempfile.TemporaryDirectory(prefix="rfmvp-test-") as tmp:
        if settings is None:
            settings = test_settings(f"sqlite:///{Path(tmp) / 'robots.db'}", **changes)
        elif changes:
            settings = settings.with_changes(**changes)
        async with Orchestrator(settings, modules=modules, plugins=plugins) as orch:
            yield orch


async def run_robot(
    target: Module | Orchestrator,
    kind: str,
    payload: Mapping[str, Any] | None = None,
    *,
    api_key: str = TEST_API_KEY,
    timeout: float = 30.0,
    **changes: Any,
) -> Robot:
    """Run one robot to its end and return it.

    ``target`` is a module (a fresh orchestrator runs just it) or a running orchestrator.
    """
    if isinstance(target, Orchestrator):
        return await target.process_robot(kind, payload or {}, api_key=api_key, timeout=timeout)
    async with running_orchestrator(target, **changes) as orch:
        return await orch.process_robot(kind, payload or {}, api_key=api_key, timeout=timeout)
