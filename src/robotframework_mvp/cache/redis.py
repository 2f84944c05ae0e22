"""Redis cache backend (redis.asyncio; the hiredis parser is used when installed).

Every process that points at the same Redis shares its cached entries and its rate
limits. The rate limiter's check-and-count is one Lua script that runs ``gcra()``'s
arithmetic atomically on the server, with the server's clock (``TIME``), so all
processes agree on one time source whatever their own clocks say.

A dead Redis never stops the application from starting: ``open()`` only warns, and the
``CacheManager``'s circuit breaker keeps a dead cache out of the request path. A dropped
connection or a Redis restart needs nothing from the caller: the pool notices a closed
connection when it hands it out and reconnects. Commands are not retried here (the
rate-limit script is not idempotent: a retry after a lost reply would count twice);
a failed call raises and the manager counts it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError

from .backend import RateCheck, RateDecision

__all__ = ["RedisBackend", "RedisSubscription"]

log = logging.getLogger(__name__)


def _pool_options() -> dict[str, Any]:
    """Pool options only some redis-py versions know."""
    options: dict[str, Any] = {}
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # redis-py before 7 has no maintenance notifications
        return options
    # Off: while enabled (even "auto", the default), the pool skips its check for
    # connections the server closed when it hands one out, so the first call after a
    # dropped connection or a restart would fail. We never use the (Redis Enterprise)
    # maintenance push notifications anyway.
    options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return options


#: an idle connection is PINGed before reuse after this many seconds (finds dead peers
#: that never closed the socket, instead of waiting out ``socket_timeout`` on a command)
_HEALTH_CHECK_INTERVAL = 30

#: set KEYS to the values that follow the segments, one after another. ARGV[1] counts the
#: segments; each is three arguments: how many keys it holds, their expiry in ms, and '1'
#: if they are set only where they do not exist (NX). A key whose expiry is 0 or less is
#: deleted (expired on arrival), unless it is NX. One command for a batch costs the client
#: far less than a pipeline of SETs (one reply to parse, not one per key), and a segment
#: per TTL lets running and ended robots (whose TTLs differ) go in one call without an
#: argument per key for its expiry (redis-py packs each argument anew). With two more
#: arguments, then publish the last on the channel named by the one before, and return
#: how many subscribers heard it: one woken by it reads the values just set. Publishing to
#: a channel nobody listens on costs Redis a lookup.
_WRITE_MANY_LUA = """
local segments = tonumber(ARGV[1])
local k, v = 1, 2 + 3 * segments
for s = 0, segments - 1 do
    local px = tonumber(ARGV[3 + 3 * s])
    local nx = ARGV[4 + 3 * s] == '1'
    for _ = 1, tonumber(ARGV[2 + 3 * s]) do
        if px > 0 then
            if nx then
                redis.call('SET', KEYS[k], ARGV[v], 'PX', px, 'NX')
            else
                redis.call('SET', KEYS[k], ARGV[v], 'PX', px)
            end
        elseif not nx then
            redis.call('DEL', KEYS[k])
        end
        k, v = k + 1, v + 1
    end
end
if #ARGV == v + 1 then
    return redis.call('PUBLISH', ARGV[v], ARGV[v + 1])
end
return 0
"""


# ``gcra()`` from backend.py, statement for statement, for each check in turn: KEYS[i]
# holds a theoretical arrival time (TAT) as a float string; ARGV[3i-2..3i] are that
# check's count, period (seconds) and cost. A key named twice sees the first check's
# write, so a batch decides exactly as the same checks one after another would, at one
# instant. Lua numbers become integers in a Redis reply, so times travel as '%.17g'
# strings, which round-trip a double exactly. Each reply's fifth element is the server
# time the decision was taken at (for diagnostics and conformance tests).
_GCRA_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
local out = {}
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[3 * i - 2])
  local period = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local interval = period / count
  local stored = redis.call('GET', key)
  local tat = nil
  if stored then tat = tonumber(stored) end
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - period
  if allow_at - now > 1e-9 then
    out[i] = {0, 0, fmt(allow_at - now), fmt(tat - now), fmt(now)}
  else
    local remaining = math.floor((period - (new_tat - now)) / interval + 1e-9)
    if remaining < 0 then remaining = 0 end
    local ttl_ms = math.max(1, math.ceil((new_tat - now) * 1000))
    redis.call('SET', key, fmt(new_tat), 'PX', ttl_ms)
    out[i] = {1, remaining, '0', fmt(new_tat - now), fmt(now)}
  end
end
return out
"""


class RedisSubscription:
    """``Subscription`` on a redis-py ``PubSub`` (see ``RedisBackend.subscribe``)."""

    def __init__(self, pubsub: PubSub) -> None:
        self._pubsub = pubsub
        self._ping_unanswered = False

    async def receive(self, timeout: float) -> bytes | None:
        """The next message, or None after ``timeout`` s. An idle wait ends with a PING;
        no answer by the end of the next one means the connection is dead (a peer gone
        without closing it would otherwise leave this waiting for good)."""
        deadline = anyio.current_time() + timeout
        while (remaining := deadline - anyio.current_time()) > 0:
            try:
                message = await self._pubsub.get_message(timeout=remaining)
            except RedisConnectionError as exc:
                raise ConnectionError(f"the subscription's connection was lost: {exc}") \
                    from exc
            if message is None:
                continue
            kind = message["type"]
            if kind == "message":
                return bytes(message["data"])
            if kind == "pong":
                self._ping_unanswered = False
            elif kind == "subscribe":
                # redis-py reconnected and subscribed again: a gap we cannot see into.
                raise ConnectionError("the subscription was made again after a lost "
                                      "connection; messages may be missing")
        if self._ping_unanswered:
            raise ConnectionError("Redis did not answer a PING on the subscription")
        self._ping_unanswered = True
        try:
            await self._pubsub.ping()
        except RedisConnectionError as exc:
            raise ConnectionError(f"the subscription's connection was lost: {exc}") from exc
        return None


class RedisBackend:
    """Cache entries and rate limits in Redis, shared by every process that uses it."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        max_connections: int = 50,
        pool_timeout: float = 1.0,
        client_name: str | None = "rfmvp",
    ) -> None:
        """``url`` is ``redis://``, ``rediss://`` or ``unix://`` (query options allowed).

        At most ``max_connections`` connections are open at once; a call that finds
        them all busy waits up to ``pool_timeout`` seconds for one instead of failing.
        ``client_name`` names the connections in ``CLIENT LIST``.
        """
        self.url = url
        self.socket_timeout = socket_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.pool_timeout = pool_timeout
        self.client_name = client_name
        self._client: Redis | None = None
        self._gcra: AsyncScript | None = None
        self._write_many: AsyncScript | None = None

    def __repr__(self) -> str:
        # Never show the URL: it may carry a password.
        return f"<RedisBackend client_name={self.client_name!r} open={self._client is not None}>"

    @property
    def client(self) -> Redis:
        """The redis.asyncio client (after ``open()``)."""
        if self._client is None:
            raise RuntimeError("RedisBackend is not open; call open() first")
        return self._client

    async def open(self) -> None:
        """Create the client; warn, but do not fail, when Redis cannot be reached now."""
        if self._client is not None:
            return
        # A blocking pool: a burst of more than max_connections concurrent calls waits
        # for a free connection (the default pool would fail them at once).
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.pool_timeout,
            socket_timeout=self.socket_timeout,
            socket_connect_timeout=self.connect_timeout,
            health_check_interval=_HEALTH_CHECK_INTERVAL,
            retry_on_timeout=False,
            client_name=self.client_name,
            **_pool_options(),
        )
        self._client = Redis.from_pool(pool)  # the client owns and closes the pool
        self._gcra = self._client.register_script(_GCRA_LUA)
        self._write_many = self._client.register_script(_WRITE_MANY_LUA)
        try:
            await self._client.ping()
        except Exception as exc:
            log.warning(
                "Redis cache is not reachable (%s: %s); starting without it, "
                "calls will be retried as it comes back",
                type(exc).__name__,
                exc,
            )

    async def close(self) -> None:
        client, self._client, self._gcra, self._write_many = self._client, None, None, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> None:
        await self.client.ping()

    async def get(self, key: str) -> bytes | None:
        value: Any = await self.client.get(key)
        return None if value is None else bytes(value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """``get`` for each key, in one MGET."""
        values: Any = await self.client.mget(keys)
        return [None if value is None else bytes(value) for value in values]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl <= 0:  # expired on arrival, as in the memory backend
            await self.client.delete(key)
            return
        await self.client.set(key, value, px=max(1, math.ceil(ttl * 1000)))

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        await self.write_many([(key, value, ttl) for key, value in items], ())

    async def write_many(self, items: Sequence[tuple[str, bytes, float]],
                         only_new: Sequence[tuple[str, bytes, float]],
                         announce: tuple[str, bytes] | None = None) -> int:
        """``Publisher.write_many``: one script call."""
        script = self._write_many
        if script is None:
            raise RuntimeError("RedisBackend is not open; call open() first")
        if not (items or only_new or announce):
            return 0
        # only_new first, then items; within each, one segment per TTL, in the order
        # each TTL first appears.
        segments: list[bytes] = []
        keys: list[str] = []
        values: list[bytes] = []
        for entries, nx in ((only_new, b"1"), (items, b"0")):
            by_ttl: dict[float, list[tuple[str, bytes, float]]] = {}
            for entry in entries:
                by_ttl.setdefault(entry[2], []).append(entry)
            for ttl, group in by_ttl.items():
                px = max(1, math.ceil(ttl * 1000)) if ttl > 0 else 0
                segments += (b"%d" % len(group), b"%d" % px, nx)
                keys += [key for key, _, _ in group]
                values += [value for _, value, _ in group]
        return int(await script(keys=keys, args=[b"%d" % (len(segments) // 3), *segments,
                                                 *values, *(announce or ())]))

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[RedisSubscription]:
        """A subscription on a connection of its own, entered once Redis confirmed it."""
        pubsub = self.client.pubsub()
        try:
            await pubsub.subscribe(channel)
            with anyio.fail_after(self.connect_timeout + self.socket_timeout):
                while (message := await pubsub.get_message(timeout=None)) is None \
                        or message["type"] != "subscribe":
                    pass
            yield RedisSubscription(pubsub)
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def delete(self, *keys: str) -> None:
        if keys:
            await self.client.delete(*keys)

    async def rate_limit(self, key: str, count: int, period: float, cost: int = 1) -> RateDecision:
        return (await self._gcra_checks([(key, count, period, cost)]))[0]

    async def rate_limit_many(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        """``rate_limit`` for each check in turn, atomically, in one script call."""
        return await self._gcra_checks([(key, count, period, 1) for key, count, period in checks])

    async def _gcra_checks(self, checks: Sequence[tuple[str, int, float, int]]
                           ) -> list[RateDecision]:
        args: list[int | str] = []
        for _, count, period, cost in checks:
            if count < 1 or not period > 0:
                raise ValueError(
                    f"a rate limit needs count >= 1 and period > 0, got {count}/{period}")
            # repr() of a float round-trips exactly, so Lua sees the very same period.
            args += [int(count), repr(float(period)), int(cost)]
        script = self._gcra
        if script is None:
            raise RuntimeError("RedisBackend is not open; call open() first")
        replies: Any = await script(keys=[key for key, _, _, _ in checks], args=args)
        return [
            RateDecision(allowed=bool(int(reply[0])), limit=count, remaining=int(reply[1]),
                         retry_after=float(reply[2]), reset_after=float(reply[3]))
            for reply, (_, count, _, _) in zip(replies, checks, strict=True)
        ]
