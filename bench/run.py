"""The core benchmark: bulk submission, processing throughput, and end-to-end latency.

    python bench/run.py --storage sqlite:///bench.db --cache memory:// -n 5000 -c 10 \\
        --latency-samples 300
    python bench/run.py --storage postgresql://postgres@127.0.0.1:5432/test \\
        --cache redis://127.0.0.1:6379/0 -n 5000 -c 10 --latency-samples 300

The same workload as the anchors in ``shared/anchors`` (pgqueuer, procrastinate, arq),
each phase timed the same way:

(a) enqueue: N no-op robots through ``Orchestrator.submit_many`` in batches of
    ``--batch``, on an orchestrator whose worker is off (an API process);
(b) process: a second orchestrator in the same process with worker concurrency C drains
    them; timed from its ``on_startup`` hook (store open, worker about to start: like the
    anchors, whose connections are open before their clock starts) until the
    ``on_robot_finished`` hook has seen all N succeed;
(c) latency: K robots, one at a time, ``process_robot()`` on that warm, idle worker: from
    before the submit to the return, which comes after the terminal state is stored.

Prints one JSON line (enqueue_per_s, process_per_s, lat_p50/p95/p99_ms, the per-step p50
of DESIGN section 4, peak RSS) and ends with the exactly-once check: every robot of the
run succeeded, attempts == 1, one Execution row whose status is succeeded. Exits 1 if not.
Postgres runs in a fresh schema (dropped at the end), redis under a unique key prefix
(deleted at the end), sqlite in a temp file unless a path is given (emptied first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _support as bs
import robotframework_mvp
from robotframework_mvp import Orchestrator, Robot, RobotStatus, SubmitRequest, hookimpl


@contextlib.contextmanager
def profiled(folder: str | None, phase: str,
             async_mode: Literal["enabled", "disabled", "strict"] = "disabled"
             ) -> Iterator[None]:
    """``--profile DIR``: pyinstrument over one phase, written as text and HTML."""
    if folder is None:
        yield
        return
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode=async_mode)
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"phase_{phase}.txt").write_text(
            profiler.output_text(unicode=False, color=False, show_all=False))
        (out / f"phase_{phase}.html").write_text(profiler.output_html())


class Watch:
    """Counts finished robots through the observe hook: no polling of the store."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.succeeded = 0
        self.other = 0
        self.finished: Counter[str] = Counter()
        self.done = anyio.Event()
        self.started_at: float | None = None
        self.started_cpu = 0.0
        self.done_at: float | None = None

    @hookimpl
    def on_startup(self, orchestrator: Orchestrator) -> None:
        self.started_at = bs.now()
        self.started_cpu = bs.cpu_s()

    @hookimpl
    def on_robot_finished(self, robot: Robot) -> None:
        self.finished[robot.id] += 1
        if robot.status is RobotStatus.SUCCEEDED:
            self.succeeded += 1
        else:
            self.other += 1
        if self.succeeded + self.other >= self.target and not self.done.is_set():
            self.done_at = bs.now()
            self.done.set()


async def bench(args: argparse.Namespace, store: bs.ScratchStore) -> dict[str, Any]:
    quiet = args.json_only
    noop = bs.noop_module(args.concurrency, progress=args.progress)
    ids: list[str] = []
    ticks_before = bs.machine_cpu_ticks()

    # (a) bulk submission on an API-only orchestrator
    api_settings = bs.bench_settings(store, worker=False, concurrency=args.concurrency,
                                     rate_limit=args.rate_limit)
    request = SubmitRequest(kind="noop", payload=bs.PAYLOAD)
    closed_at = 0.0
    counter_a = bs.CallCounter() if args.count_calls else None
    async with Orchestrator(api_settings, modules=[noop],
                            plugins=[counter_a] if counter_a else []) as api:
        if counter_a:
            counter_a.reset()
        with profiled(args.profile, "a"):
            started, cpu0 = bs.now(), bs.cpu_s()
            for i in range(0, args.n, args.batch):
                k = min(args.batch, args.n - i)
                created = await api.submit_many([request] * k, api_key=bs.API_KEY)
                ids.extend(r.id for r in created)
            enqueue_s, enqueue_cpu = bs.now() - started, bs.cpu_s() - cpu0
        enqueue_steps = api.tracker.snapshot()
        calls: dict[str, Any] = {}
        if counter_a:
            calls["enqueue"] = counter_a.per_robot(args.n)
        closing = bs.now()
    closed_at = bs.now() - closing  # includes flushing the audit records still buffered
    bs.log(quiet, f"(a) enqueued {args.n} in {enqueue_s:.3f} s "
                  f"({args.n / enqueue_s:,.0f}/s; audit flush on close {closed_at * 1000:.0f} ms)")

    # (b) drain with one orchestrator, worker concurrency C; (c) sequential latency on it
    watch = Watch(args.n)
    load_before = bs.loadavg()
    worker_settings = bs.bench_settings(store, worker=True, concurrency=args.concurrency,
                                        rate_limit=args.rate_limit)
    entered = bs.now()
    lat: list[float] = []
    profile_b = profiled(args.profile, "b")
    profile_b.__enter__()  # startup included, as it is in the process timing
    counter = bs.CallCounter() if args.count_calls else None
    plugins: list[object] = [watch] + ([counter] if counter else [])
    if args.wake_on_finish:
        plugins.append(bs.WakeOnFinish())
    async with Orchestrator(worker_settings, modules=[noop], plugins=plugins) as orch:
        with anyio.fail_after(args.timeout):
            await watch.done.wait()
        profile_b.__exit__(None, None, None)
        assert watch.started_at is not None
        assert watch.done_at is not None
        process_s = watch.done_at - watch.started_at
        process_cpu = bs.cpu_s() - watch.started_cpu
        startup_s = watch.started_at - entered
        process_steps = orch.tracker.snapshot()
        bs.log(quiet, f"(b) processed {args.n} in {process_s:.3f} s "
                      f"({args.n / process_s:,.0f}/s; startup {startup_s * 1000:.0f} ms)")

        if counter:
            calls["process"] = counter.per_robot(args.n)
        await anyio.sleep(args.settle)  # as the anchors do: a warm worker, then idle
        if counter:
            counter.reset()
        watch.target = 0  # from here on the hook only counts
        orch.tracker.reset()
        latency_cpu0 = bs.cpu_s()
        with profiled(args.profile, "c", args.profile_async_mode):
            for _ in range(args.latency_samples):
                t = bs.now()
                robot = await orch.process_robot("noop", bs.PAYLOAD, api_key=bs.API_KEY,
                                                 timeout=10.0)
                lat.append((bs.now() - t) * 1000)
                ids.append(robot.id)
                if robot.status is not RobotStatus.SUCCEEDED:
                    raise SystemExit(f"latency robot {robot.id} ended as {robot.status}")
        latency_steps = orch.tracker.snapshot()
        latency_cpu = bs.cpu_s() - latency_cpu0
        if counter:
            calls["latency"] = counter.per_robot(args.latency_samples)
        cache_stats = orch.cache.stats()
    bs.log(quiet, f"(c) {len(lat)} sequential robots: p50 {bs.pct(lat, 50):.3f} ms, "
                  f"p95 {bs.pct(lat, 95):.3f} ms, p99 {bs.pct(lat, 99):.3f} ms")

    check = bs.verify(store, ids, expected_count=args.n + args.latency_samples)
    twice = sum(1 for c in watch.finished.values() if c != 1)
    if twice:
        check["verified"] = False
        check["problems"].append(f"{twice} robots reported finished more than once")
    if len(watch.finished) != len(ids):
        check["verified"] = False
        check["problems"].append(
            f"{len(watch.finished)} robots reported finished, {len(ids)} created")
    extra = {"calls": calls} if args.count_calls else {}
    return extra | {
        "system": "robotframework-mvp",
        "version": robotframework_mvp.__version__,
        "storage": store.storage,
        "cache": store.cache,
        "n": args.n,
        "concurrency": args.concurrency,
        "batch": args.batch, "rate_limit": args.rate_limit,
        "enqueue_per_s": round(args.n / enqueue_s),
        "process_per_s": round(args.n / process_s),
        "lat_p50_ms": round(bs.pct(lat, 50), 3),
        "lat_p95_ms": round(bs.pct(lat, 95), 3),
        "lat_p99_ms": round(bs.pct(lat, 99), 3),
        "step_p50_ms": bs.step_p50(latency_steps),
        "peak_rss_mb": bs.peak_rss_mb(),
        "verified": check["verified"],
        "problems": check["problems"],
        "cpu_us_per_robot": {
            "enqueue": round(1e6 * enqueue_cpu / args.n),
            "process": round(1e6 * process_cpu / args.n),
            "latency": round(1e6 * latency_cpu / max(args.latency_samples, 1)),
        },
        "loadavg_1m_before": load_before,
        "machine_steal_pct": bs.steal_pct(ticks_before, bs.machine_cpu_ticks()),
        "startup_ms": round(startup_s * 1000, 1),
        "audit_flush_on_close_ms": round(closed_at * 1000, 1),
        "steps": {
            "enqueue (per batch)": bs.step_stats(enqueue_steps),
            "process": bs.step_stats(process_steps),
            "latency": bs.step_stats(latency_steps),
        },
        "cache_hit_ratio": cache_stats["hit_ratio"],
        "progress_reported": args.progress,
        "src_digest": bs.src_digest(),
        "wake_on_finish": args.wake_on_finish,
        "loop": args.loop,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default=None,
                   help="sqlite:///PATH (default: a temp file) or postgresql://...")
    p.add_argument("--cache", default="memory://", help="memory:// or redis://HOST:PORT/DB")
    p.add_argument("-n", type=int, default=5000, help="robots to enqueue and process")
    p.add_argument("-c", "--concurrency", type=int, default=10, help="worker concurrency")
    p.add_argument("--latency-samples", type=int, default=300, help="sequential robots (K)")
    p.add_argument("--batch", type=int, default=1000, help="submit_many batch size")
    p.add_argument("--rate-limit", default="none",
                   help="RFMVP_RATE_LIMIT for the run (default none: not consulted); e.g. "
                        "1000000/second to count every submission against a limit it admits")
    p.add_argument("--progress", action="store_true",
                   help="the no-op reports progress once (exercises state.update_progress)")
    p.add_argument("--wake-on-finish", action="store_true",
                   help="wake the dispatch loop from on_robot_finished: simulates the fix of "
                        "the worker not re-claiming when a slot frees (docs/performance.md)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds the worker idles before phase (c) (the anchors use 1.0)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up phase (b) after this")
    p.add_argument("--profile", metavar="DIR",
                   help="profile each phase with pyinstrument into DIR/phase_{a,b,c}.txt/html")
    p.add_argument("--profile-async-mode", default="enabled",
                   choices=["enabled", "disabled", "strict"],
                   help="pyinstrument async_mode for phase (c) (wall time per await)")
    p.add_argument("--count-calls", action="store_true",
                   help="count store and cache calls per robot in each phase (adds overhead)")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="event loop of the run (default asyncio, as the anchors run)")
    p.add_argument("--keep", action="store_true", help="keep the postgres schema / sqlite file")
    p.add_argument("--json-only", action="store_true", help="no human-readable lines on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    with bs.scratch_store(args.storage, args.cache, keep=args.keep) as store:
        result = anyio.run(bench, args, store,
                           backend_options={"use_uvloop": args.loop == "uvloop"})
    print(json.dumps(result), flush=True)
    if not result["verified"]:
        print("NOT VERIFIED: " + "; ".join(result["problems"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
