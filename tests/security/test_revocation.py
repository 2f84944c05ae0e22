"""A revoked (or rotated-out) key is refused on the very next request in every process,
whatever the store and the cache: no process keeps a key in memory beyond one request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import pytest
from secsite import PEPPER

from robotframework_mvp import AuthenticationError, Orchestrator, Settings
from robotframework_mvp.models import ApiKey, utcnow
from robotframework_mvp.security.keys import StoredKeyBackend, create_key, rotate_key
from robotframework_mvp.state.driver import StorageDriver
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


class CountedKeyReads:
    """The orchestrator's real driver, counting the key reads that reach it."""

    def __init__(self, driver: StorageDriver) -> None:
        self.driver = driver
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    async def get_api_key_by_prefix(self, prefix: str) -> ApiKey | None:
        self.reads += 1
        return await self.driver.get_api_key_by_prefix(prefix)

    async def get_api_keys_by_prefixes(self, prefixes: Sequence[str]) -> dict[str, ApiKey]:
        self.reads += 1
        read_many = getattr(self.driver, "get_api_keys_by_prefixes")  # noqa: B009
        found: dict[str, ApiKey] = await read_many(prefixes)
        return found


async def test_requests_arriving_together_share_a_key_read_and_a_revocation_still_counts(
    settings: Settings, anyio_backend: str,
) -> None:
    # 20 requests at once with two stored keys: one read of the store (not 20), each
    # request still gets its own key's principal, and a key revoked after they were
    # served is refused on the very next request.
    async with Orchestrator(settings) as orch:
        alice, _ = await create_key(orch.driver, PEPPER, principal="alice")
        bob, bobs = await create_key(orch.driver, PEPPER, principal="bob")
        reads = CountedKeyReads(orch.driver)
        backend = StoredKeyBackend(reads, PEPPER, touch_interval=60.0)
        seen: dict[int, str] = {}

        async def authenticate(i: int) -> None:
            principal = await backend.authenticate(alice if i % 2 else bob)
            assert principal is not None
            seen[i] = principal.id

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(authenticate, i)
        assert seen == {i: "alice" if i % 2 else "bob" for i in range(20)}
        assert reads.reads <= 2  # the first request's read, then one for the other 19
        assert await orch.driver.revoke_api_key(bobs.prefix, utcnow()) is not None
        with pytest.raises(AuthenticationError, match="revoked"):
            await backend.authenticate(bob)
