"""Submit-and-wait latency on an API process whose robots run in another process.

    python bench/remote_wait.py --storage postgresql://postgres@127.0.0.1:5432/test \\
        --cache redis://127.0.0.1:6379/0 -k 300

The deployed shape (docs/deployment.md): an API-only orchestrator (worker off) and one
``rfmvp worker`` subprocess share a scratch store and cache. After ``--warmup`` robots,
the API process submits K no-op robots one at a time and waits for each
(``process_robot``, what ``POST /api/v1/robots`` with ``"wait"`` does), timed from before
the submit to the answer. Prints one JSON line: p50/p95/p99 of that latency, how many
waits ended by the timeout instead (``timed_out``; none is expected), and the
exactly-once check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _support as bs
from robotframework_mvp import Orchestrator, RobotStatus


async def measure(store: bs.ScratchStore, args: argparse.Namespace) -> dict[str, Any]:
    settings = bs.bench_settings(store, worker=False, concurrency=args.concurrency)
    latencies: list[float] = []
    ids: list[str] = []
    timed_out = 0
    async with Orchestrator(settings, modules=[bs.noop_module(args.concurrency)]) as api:
        for i in range(args.warmup + args.k):
            started = time.perf_counter()
            robot = await api.process_robot("noop", bs.PAYLOAD, api_key=bs.API_KEY,
                                            timeout=args.wait)
            elapsed = (time.perf_counter() - started) * 1000
            ids.append(robot.id)
            if i < args.warmup:
                continue
            if robot.status is not RobotStatus.SUCCEEDED:
                timed_out += 1
            latencies.append(elapsed)
    return {"latencies": latencies, "ids": ids, "timed_out": timed_out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--cache", default="redis://127.0.0.1:6379/0")
    p.add_argument("-k", type=int, default=300, help="robots submitted and awaited")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("-c", "--concurrency", type=int, default=10)
    p.add_argument("--wait", type=float, default=10.0, help="each wait's timeout (s)")
    args = p.parse_args(argv)
    with bs.scratch_store(args.storage, args.cache) as store:
        # The API orchestrator migrates the store; the worker starts once it exists.
        anyio.run(_migrate, store)
        with bs.rfmvp_workers(store, 1, args.concurrency):
            result = anyio.run(measure, store, args)
        check = bs.verify(store, result["ids"], expected_count=len(result["ids"]))
    lat = result["latencies"]
    print(json.dumps({
        "system": "robotframework-mvp", "bench": "remote_wait", "storage": store.storage,
        "cache": store.cache, "k": args.k,
        "lat_p50_ms": round(bs.pct(lat, 50), 3), "lat_p95_ms": round(bs.pct(lat, 95), 3),
        "lat_p99_ms": round(bs.pct(lat, 99), 3), "lat_max_ms": round(max(lat), 3),
        "timed_out": result["timed_out"], "verified": check["verified"],
        "problems": check["problems"], "src_digest": bs.src_digest(),
    }))
    return 0 if check["verified"] and not result["timed_out"] else 1


async def _migrate(store: bs.ScratchStore) -> None:
    settings = bs.bench_settings(store, worker=False, concurrency=1)
    async with Orchestrator(settings, modules=[bs.noop_module(1)]):
        pass


if __name__ == "__main__":
    sys.exit(main())
