"""Throughput against the number of worker processes (``rfmvp worker`` subprocesses).

    python bench/scale.py --storage postgresql://postgres@127.0.0.1:5432/test \\
        --cache redis://127.0.0.1:6379/0 -n 20000 --processes 1 2 4

For each process count P: a fresh schema, N no-op robots enqueued with submit_many, then
P ``rfmvp worker`` processes (concurrency C each) started together. Throughput is N over
the span from the first claim (min started_at) to the last completion (max finished_at),
read from the store, so process start-up is not counted. Ends each run with the
exactly-once check. One JSON line per P, then a summary line with the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _support as bs
from robotframework_mvp import Orchestrator, SubmitRequest


async def enqueue(store: bs.ScratchStore, n: int, batch: int) -> None:
    settings = bs.bench_settings(store, worker=False, concurrency=1)
    request = SubmitRequest(kind="noop", payload=bs.PAYLOAD)
    async with Orchestrator(settings, modules=[bs.noop_module(10)]) as api:
        for i in range(0, n, batch):
            await api.submit_many([request] * min(batch, n - i), api_key=bs.API_KEY)


def span(store: bs.ScratchStore) -> tuple[int, float | None]:
    if store.sqlite_path is not None:
        import sqlite3

        conn = sqlite3.connect(store.sqlite_path)
        try:
            done, first, last = conn.execute(
                "SELECT COUNT(*) FILTER (WHERE status = 'succeeded'), MIN(started_at), "
                "MAX(finished_at) FROM robots").fetchone()
        finally:
            conn.close()
        return int(done), (None if first is None or last is None else last - first)
    import psycopg

    with psycopg.connect(store.storage_url) as pg:
        done, seconds = pg.execute(
            "SELECT COUNT(*) FILTER (WHERE status = 'succeeded'), "
            "EXTRACT(EPOCH FROM MAX(finished_at) - MIN(started_at)) FROM robots").fetchone()
    return int(done), (None if seconds is None else float(seconds))


def run_one(args: argparse.Namespace, processes: int) -> dict[str, Any]:
    with bs.scratch_store(args.storage, args.cache) as store:
        anyio.run(enqueue, store, args.n, args.batch)
        cpu: list[float] = []
        with bs.rfmvp_workers(store, processes, args.concurrency,
                              wake_on_finish=args.wake_on_finish) as procs:
            deadline = time.monotonic() + args.timeout
            while True:
                done, seconds = span(store)
                if done >= args.n or time.monotonic() > deadline:
                    break
                if any(p.poll() is not None for p in procs):
                    raise SystemExit("a worker process exited early: " + b"".join(
                        p.stderr.read() for p in procs if p.stderr and p.poll() is not None
                    ).decode()[-2000:])
                time.sleep(0.1)
            for p in procs:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rpartition(")")[2].split()
                cpu.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        check = bs.verify(store, expected_count=args.n)
        return {
            "system": "robotframework-mvp", "bench": "scale", "storage": store.storage,
            "cache": store.cache, "n": args.n, "processes": processes,
            "concurrency": args.concurrency,
            "process_per_s": round(args.n / seconds) if seconds else None,
            "span_s": round(seconds, 3) if seconds else None,
            "worker_cpu_s": [round(c, 2) for c in cpu],
            "wake_on_finish": args.wake_on_finish, "verified": check["verified"],
            "problems": check["problems"],
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default=None)
    p.add_argument("--cache", default="memory://")
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("-c", "--concurrency", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--no-wake-on-finish", dest="wake_on_finish", action="store_false")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    results = []
    ok = True
    for processes in args.processes:
        result = run_one(args, processes)
        results.append(result)
        ok = ok and result["verified"]
        print(json.dumps(result), flush=True)
    base = results[0]["process_per_s"]
    print(json.dumps({"bench": "scale-summary", "speedup": {
        r["processes"]: (round(r["process_per_s"] / base, 2) if base and r["process_per_s"]
                         else None) for r in results}}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
