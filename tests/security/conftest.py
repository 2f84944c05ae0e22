"""Fixtures for the attack tests (see ``secsite.py`` for the site and its keys)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from secsite import EXAMPLES, PEPPER, Site, build_site

from robotframework_mvp import RateLimit
from robotframework_mvp.testing import running_orchestrator

assert EXAMPLES  # secsite put examples/ on sys.path
from modules.demo import echo, sleep  # noqa: E402


@pytest.fixture
async def site(anyio_backend: str) -> AsyncIterator[Site]:
    async with running_orchestrator(
        echo, sleep,
        security={"secret_key": PEPPER, "rate_limit": RateLimit(10_000, 1.0)},
    ) as orch:
        yield await build_site(orch)
