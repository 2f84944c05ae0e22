"""Leader election: of all processes sharing one store, one runs cleanup and scoring.

``LeaderElector`` owns one lock and a loop (a task of the background task group) that
every ``RFMVP_LEADER_INTERVAL`` either checks that the lock is still held or tries to
take it. Leadership moves on its own when the leader dies: its lock goes with it.

- ``PostgresLock``: a session-level ``pg_try_advisory_lock`` held on a dedicated
  connection (never a pooled one) for as long as the process leads. The lock lives and
  dies with that session, so a leader whose process or connection dies frees it at once
  and the next process to try takes it within one interval.
- ``RedisLock``: ``SET key token NX PX ttl``, extended by a compare-and-extend script and
  released by a compare-and-delete script (a process never extends or deletes a lock
  that has passed to another). A dead leader's lock expires after ``ttl`` (3 intervals).
- ``FileLock``: ``flock`` on a file next to the SQLite database: every process on the
  host that shares the database competes; the kernel frees it when the process dies.
- ``AlwaysLeader``: one process (an in-memory database, or ``RFMVP_LEADER_BACKEND=none``).

Leader work asks ``confirm()`` right before it runs: a live check of the lock, so a
process that lost its lock since the last interval does not run it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

from .config import Settings

if TYPE_CHECKING:
    from .cache.backend import CacheBackend
    from .state.driver import StorageDriver

__all__ = [
    "AlwaysLeader",
    "FileLock",
    "LeaderElector",
    "LeaderLock",
    "PostgresLock",
    "RedisLock",
    "build_elector",
]

log = logging.getLogger(__name__)

#: first key of the leader's advisory lock (the second is a hash of the schema name);
#: next to the migration and audit locks of ``state/postgres.py``
LEADER_LOCK_CLASS = 0x5246_4D03


class LeaderLock(Protocol):
    #: "postgresql", "redis", "file" or "none"
    backend: str

    async def hold(self) -> bool:
        """Keep the lock if held (checking it is still ours), else try to take it."""

    async def check(self) -> bool:
        """Whether the lock is ours right now (a live check, no attempt to take it)."""

    async def release(self) -> None:
        """Give the lock up (if held) and close what holds it."""


class AlwaysLeader:
    """No competition: this process always leads."""

    backend = "none"

    async def hold(self) -> bool:
        return True

    async def check(self) -> bool:
        return True

    async def release(self) -> None:
        return None


class FileLock:
    """``flock(LOCK_EX | LOCK_NB)`` on ``path``; every open of the file competes."""

    backend = "file"

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    async def hold(self) -> bool:
        if self._fd is not None:
            return True
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def check(self) -> bool:
        return self._fd is not None

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock


class PostgresLock:
    """A session-level advisory lock on a dedicated connection."""

    backend = "postgresql"

    def __init__(self, url: str, *, application_name: str = "rfmvp_leader",
                 connect_timeout: float = 5.0, keepalive: float = 5.0) -> None:
        self.url = url
        self.application_name = application_name
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._conn: Any = None
        self._held = False

    async def _connection(self) -> Any:
        import psycopg

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        await self._drop()
        idle = max(1, int(self.keepalive))
        # TCP keepalives: a leader whose host vanished without closing the socket is
        # noticed by the server within about 3 keepalive periods, and its lock freed.
        self._conn = await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, application_name=self.application_name,
            connect_timeout=max(2, int(self.connect_timeout + 0.999)), keepalives=1,
            keepalives_idle=idle, keepalives_interval=idle, keepalives_count=3,
        )
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn, self._held = self._conn, None, False
        if conn is not None:
            # A dead connection closes as it can.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await conn.close()

    async def hold(self) -> bool:
        import psycopg

        try:
            conn = await self._connection()
            if self._held:
                await conn.execute("SELECT 1")  # the session lives, so its lock does
                return True
            cur = await conn.execute(
                "SELECT pg_try_advisory_lock(%s::integer, "
                "hashtext(COALESCE(current_schema(), '')))", (LEADER_LOCK_CLASS,))
            row = await cur.fetchone()
            self._held = bool(row and row[0])
            return self._held
        except psycopg.Error as exc:
            if self._held:
                log.warning("lost the leader lock's connection (%s)", type(exc).__name__)
            await self._drop()
            return False

    async def check(self) -> bool:
        if not self._held:
            return False
        return await self.hold()

    async def release(self) -> None:
        import psycopg

        if self._held and self._conn is not None and not self._conn.closed:
            # Closing the session below frees it anyway, should unlocking fail.
            with contextlib.suppress(psycopg.Error), anyio.CancelScope(shield=True), \
                    anyio.move_on_after(2):
                await self._conn.execute(
                    "SELECT pg_advisory_unlock(%s::integer, "
                    "hashtext(COALESCE(current_schema(), '')))", (LEADER_LOCK_CLASS,))
        await self._drop()


# KEYS[1] the lock, ARGV[1] our token, ARGV[2] the TTL in ms.
_EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLock:
    """``SET NX PX`` with a random token; extended and released only by its holder."""

    backend = "redis"

    def __init__(self, client: Any, key: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = max(1, int(ttl * 1000))
        self.token = secrets.token_hex(16)
        self._held = False
        self._valid_until = 0.0
        self._extend = client.register_script(_EXTEND_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    async def hold(self) -> bool:
        started = time.monotonic()
        try:
            if self._held:
                self._held = bool(await self._extend(keys=[self.key],
                                                     args=[self.token, self.ttl_ms]))
            if not self._held:
                self._held = bool(await self.client.set(self.key, self.token, nx=True,
                                                        px=self.ttl_ms))
        except Exception as exc:
            # Unknown whether the lock is still ours: stop leading; it expires by itself.
            if self._held:
                log.warning("could not extend the leader lock in Redis (%s)",
                            type(exc).__name__)
            self._held = False
            return False
        if self._held:
            self._valid_until = started + self.ttl_ms / 1000
        return self._held

    async def check(self) -> bool:
        if not self._held or time.monotonic() >= self._valid_until:
            return False
        try:
            value = await self.client.get(self.key)
        except Exception:
            return False
        self._held = value is not None and bytes(value).decode() == self.token
        return self._held

    async def release(self) -> None:
        if not self._held:
            return
        self._held = False
        # Should deleting fail, it expires by itself.
        with contextlib.suppress(Exception), anyio.CancelScope(shield=True), \
                anyio.move_on_after(2):
            await self._release(keys=[self.key], args=[self.token])


class LeaderElector:
    """Holds or competes for ``lock`` every ``interval`` seconds while ``run`` runs."""

    def __init__(self, lock: LeaderLock, interval: float) -> None:
        self.lock = lock
        self.interval = interval
        self.is_leader = False
        #: times this process became the leader
        self.elected = 0

    @property
    def backend(self) -> str:
        return self.lock.backend

    def _set(self, leader: bool) -> None:
        if leader and not self.is_leader:
            self.elected += 1
            log.info("this process is now the leader (%s lock): it runs cleanup and scoring",
                     self.backend)
        elif self.is_leader and not leader:
            log.warning("this process is no longer the leader (%s lock)", self.backend)
        self.is_leader = leader

    async def step(self) -> bool:
        """One round: hold or try to take the lock. Returns whether this process leads."""
        try:
            leader = await self.lock.hold()
        except Exception:
            log.exception("leader election (%s) failed; trying again", self.backend)
            leader = False
        self._set(leader)
        return leader

    async def confirm(self) -> bool:
        """Whether this process leads right now (a live check), before leader work."""
        if not self.is_leader:
            return False
        try:
            leader = await self.lock.check()
        except Exception:
            leader = False
        self._set(leader)
        return leader

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        """Compete until cancelled (the first round before ``started``), then release."""
        try:
            await self.step()
            task_status.started()
            while True:
                await anyio.sleep(self.interval)
                await self.step()
        finally:
            with anyio.CancelScope(shield=True):
                self.is_leader = False
                await self.lock.release()


def build_elector(settings: Settings, driver: StorageDriver, backend: CacheBackend
                  ) -> LeaderElector:
    """The elector ``RFMVP_LEADER_BACKEND`` asks for, over this store and cache."""
    cfg = settings.background
    choice = cfg.leader_backend
    storage = driver.name
    if choice == "auto":
        if storage == "postgresql":
            choice = "postgresql"
        elif backend.name == "redis":
            choice = "redis"
        elif storage == "sqlite":
            choice = "file"
        else:
            choice = "none"
    lock: LeaderLock
    if choice == "postgresql":
        url = getattr(driver, "url", None)
        if storage != "postgresql" or not isinstance(url, str):
            from .errors import ConfigError

            raise ConfigError("RFMVP_LEADER_BACKEND=postgresql needs a postgresql:// "
                              "RFMVP_STORAGE_URL")
        name = str(getattr(driver, "application_name", "rfmvp"))
        lock = PostgresLock(url, application_name=f"{name[:55]}_leader",
                            connect_timeout=settings.storage.timeout,
                            keepalive=cfg.leader_interval)
    elif choice == "redis":
        client = getattr(backend, "client", None)
        if backend.name != "redis" or client is None:
            from .errors import ConfigError

            raise ConfigError("RFMVP_LEADER_BACKEND=redis needs a redis:// RFMVP_CACHE_URL")
        lock = RedisLock(client, f"{settings.cache.key_prefix}leader", 3 * cfg.leader_interval)
    elif choice == "file":
        from .state.sqlite import sqlite_path

        path = sqlite_path(settings.storage.url) if storage == "sqlite" else ":memory:"
        lock = AlwaysLeader() if path == ":memory:" or os.name != "posix" \
            else FileLock(path + ".leader")
    else:
        lock = AlwaysLeader()
    return LeaderElector(lock, cfg.leader_interval)
