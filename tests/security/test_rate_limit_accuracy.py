"""The rate limit holds across processes that share Redis, accurately and atomically.

GCRA with ``COUNT`` per ``PERIOD`` admits a burst of ``COUNT`` at once, then one request
per ``PERIOD / COUNT``. Against a fresh key under a load above the limit, the k-th
admission (k = 0, 1, ...) happens at the first request at or after
``t0 + (k + 1) * PERIOD / COUNT - PERIOD``, so by ``t0 + D`` exactly
``COUNT + floor(D * COUNT / PERIOD)`` requests are admitted, give or take the one that
falls at the boundary. The load generators run in separate processes with their own
connections, so the only thing they share is the Lua script's state in Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

HAMMER = Path(__file__).with_name("rate_hammer.py")
PROCESSES = 4


def run_hammers(args: list[list[str]], timeout: float) -> list[dict[str, int]]:
    procs = [subprocess.Popen([sys.executable, str(HAMMER), *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
def test_over_10_s_at_3x_the_limit_4_processes_admit_the_rate_within_2_percent(
    redis_url: str, redis_prefix: str,
) -> None:
    count, period, duration = 100, 1.0, 10.0
    offered = 3 * count / period  # requests per second, over all processes
    key = f"{redis_prefix}accuracy:{uuid.uuid4().hex}"
    start = time.time() + 2.0  # every process is connected and waiting by then
    results = run_hammers(
        [["steady", redis_url, key, str(count), str(period), repr(start), str(duration),
          str(offered / PROCESSES)] for _ in range(PROCESSES)],
        timeout=duration + 30)
    sent = sum(r["sent"] for r in results)
    admitted = sum(r["admitted"] for r in results)
    expected = count + duration * count / period  # the burst, then the steady rate
    print(f"\nrate-limit accuracy: offered {sent} requests in {duration:g} s over "
          f"{PROCESSES} processes (limit {count}/{period:g} s); admitted {admitted}, "
          f"expected {expected:g} ({(admitted - expected) / expected:+.2%})")
    assert sent >= 0.95 * offered * duration, "the load generators fell behind"
    assert abs(admitted - expected) <= 0.02 * expected


@pytest.mark.slow
def test_100_concurrent_checks_from_4_processes_against_a_fresh_5_per_minute_admit_5(
    redis_url: str, redis_prefix: str,
) -> None:
    key = f"{redis_prefix}burst:{uuid.uuid4().hex}"
    start = time.time() + 2.0
    results = run_hammers(
        [["burst", redis_url, key, "5", "60", repr(start), "25"] for _ in range(PROCESSES)],
        timeout=60)
    assert sum(r["sent"] for r in results) == 100
    assert sum(r["admitted"] for r in results) == 5
