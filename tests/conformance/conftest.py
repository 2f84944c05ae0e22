"""The storage driver under test: every built-in driver, opened and migrated."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from robotframework_mvp.config import Settings, StorageConfig
from robotframework_mvp.plugins import BuiltinPlugin
from robotframework_mvp.state.driver import StorageDriver


@pytest.fixture
def new_driver(storage_url: str) -> Callable[[], StorageDriver]:
    """Build another (unopened) driver on the test's store, as another process would."""

    def build() -> StorageDriver:
        driver = BuiltinPlugin().storage_driver(
            storage_url, Settings(storage=StorageConfig(url=storage_url)))
        assert driver is not None, f"no built-in driver serves {storage_url}"
        return driver

    return build


@pytest.fixture
async def driver(new_driver: Callable[[], StorageDriver],
                 anyio_backend: str) -> AsyncIterator[StorageDriver]:
    built = new_driver()
    await built.open()
    try:
        await built.migrate()
        yield built
    finally:
        await built.close()
