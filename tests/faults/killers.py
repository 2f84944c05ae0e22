"""Kill our own server-side connections (never anyone else's, never the servers), and
the test servers' URLs (the same variables and defaults as tests/conftest.py)."""

from __future__ import annotations

import os

__all__ = ["POSTGRES_URL", "REDIS_URL", "kill_redis_clients", "terminate_backends"]

POSTGRES_URL = os.environ.get("RFMVP_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("RFMVP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")



async def terminate_backends(application_name_prefix: str) -> int:
    """``pg_terminate_backend`` on every session whose application_name starts with
    ``application_name_prefix`` (ours: each test's schema names its own sessions)."""
    import psycopg

    assert application_name_prefix.startswith("rfmvp"), "only ever kill our own sessions"
    async with await psycopg.AsyncConnection.connect(POSTGRES_URL, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
            (application_name_prefix.replace("_", r"\_") + "%",))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def kill_redis_clients(client_name: str) -> int:
    """``CLIENT KILL ID`` for every Redis connection named ``client_name`` (ours only)."""
    import redis.asyncio as aredis

    assert client_name.startswith("rfmvp"), "only ever kill our own clients"
    client = aredis.Redis.from_url(REDIS_URL)
    try:
        killed = 0
        for info in await client.client_list():
            if info.get("name") == client_name:
                killed += int(await client.execute_command("CLIENT", "KILL", "ID", info["id"]))
        return killed
    finally:
        await client.aclose()
