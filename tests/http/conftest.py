"""Fixtures for the HTTP contract: every adapter in ``examples/`` serves the same tests."""

from __future__ import annotations

import importlib
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from robotframework_mvp.testing import running_orchestrator

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:  # the examples import each other as top-level modules
    sys.path.insert(0, str(EXAMPLES))

from modules.demo import echo, sleep  # noqa: E402

ADAPTERS = ["fastapi_app", "starlette_app"]


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> ModuleType:
    """Each adapter module (``create_app``)."""
    return importlib.import_module(request.param)


Serve = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def serve(adapter: ModuleType) -> Serve:
    """``async with serve(**changes) as client``: a client of the adapter's app over a
    fresh orchestrator running echo and sleep (``changes`` edit settings sections;
    ``plugins=`` registers plugins)."""

    @asynccontextmanager
    async def serving(*, plugins: tuple[object, ...] = (),
                      **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
        async with running_orchestrator(echo, sleep, plugins=plugins, **changes) as orch:
            app = adapter.create_app(orchestrator=orch)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                yield c

    return serving


@pytest.fixture
async def client(serve: Serve) -> AsyncIterator[httpx.AsyncClient]:
    async with serve() as c:
        yield c
