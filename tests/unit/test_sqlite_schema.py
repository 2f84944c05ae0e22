"""The SQLite driver decodes robot rows by column position: it must refuse a robots table
whose columns are not the ones its migrations make, and a SQLite without RETURNING."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from robotframework_mvp.errors import ConfigError, ServiceUnavailableError
from robotframework_mvp.state import sqlite as sqlite_driver
from robotframework_mvp.state.sqlite import ROBOT_COLUMNS, SQLiteDriver

pytestmark = pytest.mark.anyio


async def test_migrated_robots_table_has_the_columns_rows_are_decoded_by(
        tmp_path: Path) -> None:
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    await driver.open()
    try:
        await driver.migrate()
    finally:
        await driver.close()
    with sqlite3.connect(tmp_path / "robots.db") as conn:
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(robots)"))
    assert columns == ROBOT_COLUMNS
    reopened = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    await reopened.open()  # and opens again without complaint
    await reopened.close()


async def test_a_robots_table_with_other_columns_is_refused_with_what_to_do(
        tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "robots.db") as conn:
        conn.execute("CREATE TABLE robots (id TEXT PRIMARY KEY, status TEXT, kind TEXT)")
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    with pytest.raises(ConfigError, match=r"rfmvp migrate.*found id, status, kind"):
        await driver.open()
    with pytest.raises(ServiceUnavailableError, match="not open"):  # nothing left open
        await driver.get_robot("r-1")


async def test_a_sqlite_without_returning_is_refused_with_the_version_needed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sqlite_driver.sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite_driver.sqlite3, "sqlite_version", "3.31.1")
    driver = SQLiteDriver(f"sqlite:///{tmp_path / 'robots.db'}")
    with pytest.raises(ConfigError, match=r"SQLite 3\.31\.1 is too old.*3\.35\.0 or newer"):
        await driver.open()
