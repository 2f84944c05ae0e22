"""A worker's resident memory as it processes more and more robots.

    python bench/rss.py                               # sqlite (temp) + memory, up to 100k
    python bench/rss.py --max 50000 --storage postgresql://... --cache redis://...

One orchestrator (worker concurrency C) is fed no-op robots in batches, keeping at most
``--backlog`` queued, and VmRSS (/proc/self/status) is sampled when 10k, 25k, 50k and
100k robots have finished (and after a gc.collect()). Target: RSS flat within +-10% from
10k to 100k. Prints one JSON line with each checkpoint, the ratio rss(max)/rss(10k), what
the long-lived structures held at each checkpoint, and the exactly-once check.

The worker at f940fa2 sleeps a full poll interval whenever it is full (see
docs/performance.md); ``--wake-on-finish`` (default on here) wakes it from the
``on_robot_finished`` hook so 100k robots take a minute, not hours. Memory is what is
measured here, and that hook holds nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _support as bs
from robotframework_mvp import Orchestrator, Robot, SubmitRequest, hookimpl


class Progress:
    def __init__(self) -> None:
        self.finished = 0
        self.succeeded = 0
        self.changed = anyio.Event()

    @hookimpl
    def on_robot_finished(self, robot: Robot) -> None:
        self.finished += 1
        self.succeeded += robot.status == "succeeded"
        self.changed.set()


def holdings(orch: Orchestrator) -> dict[str, Any]:
    """What the long-lived, per-robot structures hold right now."""
    out: dict[str, Any] = {
        "waiters": len(orch._waiters),
        "worker_running": len(orch.worker.running),
        "audit_buffer": orch.audit.pending,
        "tracker_ops": len(orch.tracker.operations()),
        "gc_objects": len(gc.get_objects()),
    }
    entries = getattr(orch.cache.backend, "_entries", None)
    if entries is not None:
        out["memory_cache_entries"] = len(entries)
    return out


async def bench(args: argparse.Namespace, store: bs.ScratchStore) -> dict[str, Any]:
    checkpoints = sorted({c for c in (10_000, 25_000, 50_000, 100_000) if c <= args.max}
                         | {args.max})
    noop = bs.noop_module(args.concurrency)
    cache_changes = {k: v for k, v in (("ttl_robot_status", args.cache_ttl),
                                       ("max_entries", args.cache_max_entries)) if v}
    settings = bs.bench_settings(store, worker=True, concurrency=args.concurrency,
                                 **({"cache": cache_changes} if cache_changes else {}))
    progress = Progress()
    plugins: list[object] = [progress] + ([bs.WakeOnFinish()] if args.wake_on_finish else [])
    request = SubmitRequest(kind="noop", payload=bs.PAYLOAD)
    samples: list[dict[str, Any]] = []
    started = bs.now()
    async with Orchestrator(settings, modules=[noop], plugins=plugins) as orch:
        rss_start = bs.current_rss_mb()
        submitted = 0
        next_cp = 0

        def sample_due() -> None:
            nonlocal next_cp
            while next_cp < len(checkpoints) and progress.finished >= checkpoints[next_cp]:
                raw = bs.current_rss_mb()
                gc.collect()
                sample = {"processed": progress.finished, "rss_mb": raw,
                          "rss_after_gc_mb": bs.current_rss_mb(),
                          "elapsed_s": round(bs.now() - started, 1), **holdings(orch)}
                samples.append(sample)
                bs.log(args.json_only, json.dumps(sample))
                next_cp += 1

        while next_cp < len(checkpoints):
            while submitted < args.max and submitted - progress.finished < args.backlog:
                k = min(args.batch, args.max - submitted)
                await orch.submit_many([request] * k, api_key=bs.API_KEY)
                submitted += k
                sample_due()
            progress.changed = anyio.Event()
            with anyio.fail_after(args.timeout):
                await progress.changed.wait()
            sample_due()
        with anyio.fail_after(args.timeout):
            while progress.finished < args.max:
                progress.changed = anyio.Event()
                await progress.changed.wait()
    elapsed = bs.now() - started
    check = bs.verify(store, expected_count=args.max) if args.verify else {
        "verified": None, "problems": ["not checked (--no-verify)"]}
    first = next(s for s in samples if s["processed"] >= min(10_000, args.max))
    last = samples[-1]
    ratio = last["rss_mb"] / first["rss_mb"]
    return {
        "system": "robotframework-mvp", "bench": "rss", "storage": store.storage,
        "cache": store.cache, "concurrency": args.concurrency, "max": args.max,
        "rss_start_mb": rss_start, "checkpoints": samples,
        "ratio_last_to_10k": round(ratio, 3),
        "ratio_last_to_10k_after_gc": round(last["rss_after_gc_mb"] / first["rss_after_gc_mb"], 3),
        "flat_within_10pct": abs(ratio - 1) <= 0.10,
        "robots_per_s": round(args.max / elapsed), "cache_ttl": args.cache_ttl,
        "cache_max_entries": args.cache_max_entries, "wake_on_finish": args.wake_on_finish,
        "peak_rss_mb": bs.peak_rss_mb(), "verified": check["verified"],
        "problems": check["problems"], "src_digest": bs.src_digest(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default=None)
    p.add_argument("--cache", default="memory://")
    p.add_argument("--max", type=int, default=100_000, help="robots to process in all")
    p.add_argument("-c", "--concurrency", type=int, default=10)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--backlog", type=int, default=5000, help="most robots queued at once")
    p.add_argument("--cache-ttl", type=float, default=None,
                   help="RFMVP_CACHE_TTL_ROBOT_STATUS for this run (default: the default, 30 s)")
    p.add_argument("--cache-max-entries", type=int, default=None,
                   help="RFMVP_CACHE_MAX_ENTRIES for this run (default 100000)")
    p.add_argument("--no-wake-on-finish", dest="wake_on_finish", action="store_false")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--timeout", type=float, default=120.0, help="longest wait for progress")
    p.add_argument("--json-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    with bs.scratch_store(args.storage, args.cache) as store:
        result = anyio.run(bench, args, store)
    print(json.dumps(result), flush=True)
    return 0 if result["verified"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
