"""The fault proxy itself does what the other resilience tests rely on."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aredis
from killers import REDIS_URL
from proxy import FaultProxy

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def test_the_proxy_forwards_delays_refuses_severs_and_resumes(
    redis_proxy: FaultProxy,
) -> None:
    client = aredis.Redis.from_url(redis_proxy.url(REDIS_URL), socket_timeout=2,
                                   socket_connect_timeout=2)
    try:
        assert await client.ping()
        assert redis_proxy.live == 1

        redis_proxy.latency = 0.1
        started = time.monotonic()
        assert await client.ping()
        assert time.monotonic() - started >= 0.2, "latency is added both ways"
        redis_proxy.latency = 0.0

        assert redis_proxy.sever() == 1
        redis_proxy.pause()
        for _ in range(2):  # the dropped connection, then a new one, refused
            with pytest.raises(Exception):  # noqa: PT011 - any connection error
                await client.ping()
        assert redis_proxy.refused >= 1

        redis_proxy.resume()
        assert await client.ping(), "the client reconnects once the proxy resumes"
        assert redis_proxy.accepted >= 2
    finally:
        await client.aclose()
