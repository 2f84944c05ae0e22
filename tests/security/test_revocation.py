"""A revoked (or rotated-out) key is refused on the very next request in every process,
whatever the store and the cache: no process keeps a key in memory beyond one request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

import pytest
from secsite import PEPPER

from robotframework_mvp import AuthenticationError, Orchestrator, Settings
from robotframework_mvp.models import utcnow
from robotframework_mvp.security.keys import create_key, rotate_key
from robotframework_mvp.testing import test_settings

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "redis"])
def settings(request: pytest.FixtureRequest, storage_url: str) -> Settings:
    cache = {"url": "memory://"}
    if request.param == "redis":
        cache = {"url": request.getfixturevalue("redis_url"),
                 "key_prefix": request.getfixturevalue("redis_prefix")}
    return test_settings(storage_url, cache=cache, security={"secret_key": PEPPER},
                         worker={"enabled": False})


@asynccontextmanager
async def two_processes(settings: Settings) -> AsyncIterator[tuple[Orchestrator, Orchestrator]]:
    """Two orchestrators on one store (and one Redis, when the cache is Redis), each with
    its own plugin manager and in-process state, as two processes have."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(Orchestrator(settings))
        second = await stack.enter_async_context(Orchestrator(settings))
        yield first, second


async def test_a_revoked_key_is_refused_in_every_process_on_the_next_request(
    settings: Settings, anyio_backend: str,
) -> None:
    async with two_processes(settings) as (first, second):
        key, stored = await create_key(first.driver, PEPPER, principal="alice")
        for orch in (first, second, first, second):  # warm whatever could be warmed
            await orch.list(api_key=key)
        assert await second.driver.revoke_api_key(stored.prefix, utcnow()) is not None
        for orch in (first, second):
            with pytest.raises(AuthenticationError, match="revoked"):
                await orch.list(api_key=key)


async def test_a_key_rotated_without_grace_is_refused_everywhere_and_its_successor_works(
    settings: Settings, anyio_backend: str,
) -> None:
    async with two_processes(settings) as (first, second):
        old, stored = await create_key(first.driver, PEPPER, principal="alice")
        await first.list(api_key=old)
        await second.list(api_key=old)
        rotated = await rotate_key(first.driver, PEPPER, stored.prefix, grace=timedelta(0))
        assert rotated is not None
        for orch in (first, second):
            with pytest.raises(AuthenticationError, match="expired"):
                await orch.list(api_key=old)
            await orch.list(api_key=rotated[0])
