"""Where a lone create-claimed write's time goes, in the flow (PostgreSQL).

    python bench/write_window.py --storage postgresql://postgres@127.0.0.1:5432/test \\
        --cache redis://127.0.0.1:6379/0 -k 3000

``state.start_execution`` on PostgreSQL, for a robot submitted to an idle worker, is one
statement that inserts the robot already running and its execution. This runs K robots
one after another (``process_robot``, as phase (c) of ``bench/run.py``) and prints one
JSON line with three p50s of that write, from the inside out: the statement in psycopg
(on the connection's kept cursor), the driver's ``create_and_claim`` around it, and the
step as the tracker records it; and the two differences, what the driver and what the
StateManager with its group committer add. Timing wraps the connection's kept cursor
from outside the package (nothing in it changes).
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
from robotframework_mvp import Orchestrator
from robotframework_mvp.state import postgres

STATEMENT = postgres._Q["insert_claimed_robot"]


async def measure(store: bs.ScratchStore, k: int, warmup: int) -> dict[str, Any]:
    statement_ms: list[float] = []
    driver_ms: list[float] = []
    kept_cursor = postgres.PooledConnection.kept_cursor
    create_and_claim = postgres.PostgresDriver.create_and_claim

    class TimedCursor:
        """The kept cursor, timing the create-claimed statement it runs."""

        def __init__(self, cursor: Any) -> None:
            self.cursor = cursor

        async def execute(self, query: str, params: Any = None) -> Any:
            started = time.perf_counter()
            try:
                return await self.cursor.execute(query, params)
            finally:
                if query is STATEMENT:
                    statement_ms.append((time.perf_counter() - started) * 1000)

    def timed_kept_cursor(self: Any) -> Any:
        return TimedCursor(kept_cursor(self))

    async def timed_create_and_claim(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await create_and_claim(self, *args, **kwargs)
        finally:
            driver_ms.append((time.perf_counter() - started) * 1000)

    postgres.PooledConnection.kept_cursor = timed_kept_cursor  # type: ignore[method-assign]
    postgres.PostgresDriver.create_and_claim = timed_create_and_claim  # type: ignore[method-assign]
    try:
        settings = bs.bench_settings(store, worker=True, concurrency=10)
        async with Orchestrator(settings, modules=[bs.noop_module(10)]) as orch:
            for i in range(warmup + k):
                if i == warmup:
                    statement_ms.clear()
                    driver_ms.clear()
                    orch.tracker.reset()
                await orch.process_robot("noop", bs.PAYLOAD, api_key=bs.API_KEY, timeout=10.0)
            step = orch.tracker.snapshot()["state.start_execution"]
    finally:
        postgres.PooledConnection.kept_cursor = kept_cursor  # type: ignore[method-assign]
        postgres.PostgresDriver.create_and_claim = create_and_claim  # type: ignore[method-assign]
    statement, driver = round(bs.pct(statement_ms, 50), 4), round(bs.pct(driver_ms, 50), 4)
    return {"robots": k, "statement_p50_ms": statement, "driver_p50_ms": driver,
            "start_execution_p50_ms": round(step.p50_ms, 4),
            "driver_adds_ms": round(driver - statement, 4),
            "manager_adds_ms": round(step.p50_ms - driver, 4),
            "samples": [len(statement_ms), len(driver_ms), step.count]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--cache", default="redis://127.0.0.1:6379/0")
    p.add_argument("-k", type=int, default=3000, help="sequential robots timed")
    p.add_argument("--warmup", type=int, default=300, help="robots run first, not timed")
    args = p.parse_args()
    if not args.storage.startswith(("postgresql:", "postgres:")):
        raise SystemExit("the create-claimed statement timed here is PostgreSQL's")
    with bs.scratch_store(args.storage, args.cache) as store:
        print(json.dumps(anyio.run(measure, store, args.k, args.warmup)))


if __name__ == "__main__":
    main()
