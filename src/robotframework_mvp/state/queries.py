"""Load named SQL queries from ``.sql`` files (``-- name: x`` headers), procrastinate-style.

SQL stays reviewable as SQL; Python refers to queries by name.
"""

from __future__ import annotations

import re
from importlib import resources

__all__ = ["load_migrations", "load_queries"]

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(dialect: str) -> dict[str, str]:
    """Every named query of ``sql/<dialect>/*.sql`` (``queries.sql``, ``api_keys.sql`` ...).

    Queries are grouped in files by concern; a name may appear only once across them.
    """
    folder = resources.files(__package__).joinpath("sql", dialect)
    queries: dict[str, str] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        parts = _NAME.split(entry.read_text("utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise ValueError(f"query {name!r} is defined twice in sql/{dialect}/")
            lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
            queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


def load_migrations(dialect: str) -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every numbered migration, in order."""
    folder = resources.files(__package__).joinpath("sql", dialect, "migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    return sorted(found)
