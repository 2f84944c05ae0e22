"""A load generator for test_rate_limit_accuracy.py, run as a separate process.

``python rate_hammer.py steady URL KEY COUNT PERIOD START DURATION RATE``: from the wall
clock time START, send RATE checks per second against one GCRA key until DURATION seconds
have passed; ``... burst URL KEY COUNT PERIOD START N``: at START, send N checks at once.
Prints ``{"sent": ..., "admitted": ...}``.
"""

from __future__ import annotations

import json
import sys
import time

import anyio

from robotframework_mvp.cache.redis import RedisBackend


async def steady(backend: RedisBackend, key: str, count: int, period: float, start: float,
                 duration: float, rate: float) -> tuple[int, int]:
    sent = admitted = 0
    while True:
        due = start + sent / rate
        if due >= start + duration:
            return sent, admitted
        delay = due - time.time()
        if delay > 0:
            await anyio.sleep(delay)
        decision = await backend.rate_limit(key, count, period)
        sent += 1
        admitted += decision.allowed


async def burst(backend: RedisBackend, key: str, count: int, period: float, start: float,
                n: int) -> tuple[int, int]:
    admitted = 0

    async def one() -> None:
        nonlocal admitted
        decision = await backend.rate_limit(key, count, period)  # before reading admitted
        admitted += decision.allowed

    await anyio.sleep(max(0.0, start - time.time()))
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return n, admitted


async def main(argv: list[str]) -> None:
    mode, url, key, count, period, start = argv[:6]
    backend = RedisBackend(url, max_connections=100)
    await backend.open()
    try:
        if mode == "steady":
            sent, admitted = await steady(backend, key, int(count), float(period), float(start),
                                          float(argv[6]), float(argv[7]))
        else:
            sent, admitted = await burst(backend, key, int(count), float(period), float(start),
                                         int(argv[6]))
    finally:
        await backend.close()
    print(json.dumps({"sent": sent, "admitted": admitted}))


if __name__ == "__main__":
    anyio.run(main, sys.argv[1:])
