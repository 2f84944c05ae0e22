"""Shared pieces of the benchmark scripts: scratch stores, settings, the no-op module,
percentiles and the exactly-once check that ends every run.

Not a test helper and not part of the package: the scripts in ``bench/`` put this folder
on ``sys.path`` (``python bench/run.py`` does that by itself).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import attrs

from robotframework_mvp import (
    CacheConfig,
    ModuleContext,
    RateLimit,
    Robot,
    SecurityConfig,
    Settings,
    StaticKey,
    StorageConfig,
    WorkerConfig,
    module,
)
from robotframework_mvp.models import converter

#: the anchors' payload (shared/anchors/common.py), so every system moves the same bytes
PAYLOAD: dict[str, Any] = {"document": "invoice-000123.pdf", "account": "ACME-0042",
                           "lang": "en", "pages": 3, "note": "x" * 20}
PRINCIPAL = "bench"
API_KEY = "rfmvp-bench-key-0123456789abcdef"

#: the seven operation names of DESIGN section 4, in the order a request meets them
STEPS = ("security.validate", "balancer.select", "state.create_robot",
         "state.start_execution", "module.process", "state.update_progress",
         "state.complete_robot")
#: the seed's latency budget per step (ms, low-high); targets are 10x below the low end
SEED_BUDGET_MS = {
    "security.validate": (5, 10),
    "balancer.select": (10, 15),
    "state.create_robot": (20, 30),
    "state.start_execution": (5, 10),
    "state.update_progress": (10, 15),
    "state.complete_robot": (10, 15),
}

now = time.perf_counter


def log(quiet: bool, *parts: object) -> None:
    if not quiet:
        print(*parts, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """The anchors' percentile (shared/anchors/common.py), so numbers compare 1:1."""
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used: robust to a busy machine."""
    t = os.times()
    return t.user + t.system


def loadavg() -> float:
    """The 1-minute load average: other work on the machine skews every number."""
    return os.getloadavg()[0]


def machine_cpu_ticks() -> tuple[int, int]:
    """(steal, total) CPU ticks of the whole machine since boot, from /proc/stat; (0, 0)
    where there is none. Steal is time the hypervisor gave this VM's CPUs to others."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal (guest times are inside user/nice)
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of the machine's CPU time stolen between two ``machine_cpu_ticks()``."""
    total = after[1] - before[1]
    return None if total <= 0 else round(100 * (after[0] - before[0]) / total, 1)


def noop_module(capacity: int, *, progress: bool = False) -> Any:
    """``@module("noop", kinds=["noop"], capacity=C)``: does nothing (optionally reports 50%)."""

    @module("noop", kinds=["noop"], capacity=capacity)
    async def noop(robot: Robot, ctx: ModuleContext) -> None:
        if progress:
            await ctx.progress(50)

    return noop


def bench_settings(store: ScratchStore, *, worker: bool, concurrency: int,
                   rate_limit: str = "none", **changes: Any) -> Settings:
    """Defaults everywhere except: one static key, the scratch store, and ``rate_limit``
    (``RFMVP_RATE_LIMIT``'s form; none by default, so the limiter is not consulted)."""
    settings = Settings(
        storage=StorageConfig(url=store.storage_url),
        cache=CacheConfig(url=store.cache_url, key_prefix=store.cache_prefix),
        security=SecurityConfig(api_keys=(StaticKey(PRINCIPAL, API_KEY),),
                                rate_limit=RateLimit.parse(rate_limit)),
        worker=WorkerConfig(enabled=worker, concurrency=concurrency),
    )
    return settings.with_changes(**changes) if changes else settings


def step_p50(snapshot: dict[str, Any]) -> dict[str, float | None]:
    return {name: (round(snapshot[name].p50_ms, 4) if name in snapshot else None)
            for name in STEPS}


def step_stats(snapshot: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: {"count": s.count, "p50_ms": round(s.p50_ms, 4),
                   "p95_ms": round(s.p95_ms, 4), "p99_ms": round(s.p99_ms, 4),
                   "mean_ms": round(s.mean_ms, 4)}
            for name, s in snapshot.items()}


# -- scratch stores ----------------------------------------------------------------------


@attrs.define
class ScratchStore:
    """A fresh store and cache namespace for one run, removed again at the end."""

    storage_url: str  # what the orchestrator gets (postgres: with the scratch schema)
    cache_url: str
    cache_prefix: str
    sqlite_path: str | None = None
    pg_schema: str | None = None

    @property
    def storage(self) -> str:
        return urlsplit(self.storage_url).scheme

    @property
    def cache(self) -> str:
        return urlsplit(self.cache_url).scheme

    def env(self) -> dict[str, str]:
        """The same store as ``RFMVP_*`` variables (for subprocesses)."""
        return {"RFMVP_STORAGE_URL": self.storage_url, "RFMVP_CACHE_URL": self.cache_url,
                "RFMVP_CACHE_KEY_PREFIX": self.cache_prefix}


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


@contextlib.contextmanager
def scratch_store(storage_url: str | None, cache_url: str, *, keep: bool = False
                  ) -> Iterator[ScratchStore]:
    """sqlite: a temp file (or the given path, emptied first); postgresql: a new schema,
    dropped at the end; redis: a unique key prefix whose keys are deleted at the end."""
    token = secrets.token_hex(4)
    prefix = f"rfmvp-bench-{token}:"
    tmpdir: tempfile.TemporaryDirectory[str] | None = None
    store: ScratchStore
    if storage_url is None or storage_url in ("sqlite://", "sqlite:///"):
        tmpdir = tempfile.TemporaryDirectory(prefix="rfmvp-bench-")
        path = str(Path(tmpdir.name) / "robots.db")
        store = ScratchStore(f"sqlite:///{path}", cache_url, prefix, sqlite_path=path)
    elif storage_url.startswith("sqlite:"):
        from robotframework_mvp.state.sqlite import sqlite_path

        path = sqlite_path(storage_url)
        _remove_sqlite(path)  # a benchmark file is scratch space: start empty
        store = ScratchStore(storage_url, cache_url, prefix, sqlite_path=path)
    elif storage_url.startswith(("postgresql:", "postgres:")):
        import psycopg

        schema = f"rfmvp_bench_{token}"
        with psycopg.connect(storage_url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        store = ScratchStore(_with_search_path(storage_url, schema), cache_url, prefix,
                             pg_schema=schema)
    else:
        raise SystemExit(f"unsupported storage URL scheme: {storage_url.split(':', 1)[0]}")
    try:
        yield store
    finally:
        if store.pg_schema is not None and not keep:
            import psycopg

            with psycopg.connect(storage_url, autocommit=True) as conn:  # type: ignore[arg-type]
                conn.execute(f'DROP SCHEMA IF EXISTS "{store.pg_schema}" CASCADE')
        if store.cache.startswith(("redis", "rediss", "unix")):
            import redis

            client = redis.Redis.from_url(cache_url)
            try:
                batch: list[bytes] = []
                for key in client.scan_iter(match=f"{prefix}*", count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        client.delete(*batch)
                        batch.clear()
                if batch:
                    client.delete(*batch)
            finally:
                client.close()
        if store.sqlite_path is not None and tmpdir is None and not keep:
            _remove_sqlite(store.sqlite_path)
        if tmpdir is not None:
            tmpdir.cleanup()


def _remove_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


# -- the exactly-once check --------------------------------------------------------------


def _fetch_all(store: ScratchStore, *queries: str) -> list[list[tuple[Any, ...]]]:
    """Each query's rows, read on one fresh connection to the scratch store."""
    if store.sqlite_path is not None:
        conn = sqlite3.connect(store.sqlite_path)
        try:
            return [conn.execute(q).fetchall() for q in queries]
        finally:
            conn.close()
    import psycopg

    with psycopg.connect(store.storage_url) as pg:
        return [[tuple(r) for r in pg.execute(q).fetchall()]
                for q in queries]


def count_unfinished(store: ScratchStore) -> int:
    """Robots queued or running: one count on the status index, cheap enough to poll
    while the server works (reading every row, as ``verify`` does, is not)."""
    [[(count,)]] = _fetch_all(
        store, "SELECT COUNT(*) FROM robots WHERE status IN ('queued', 'running')")
    return int(count)


def _rows(store: ScratchStore) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    robots, execs = _fetch_all(
        store, "SELECT id, status, attempts FROM robots",
        "SELECT robot_id, status, COUNT(*) FROM executions GROUP BY robot_id, status")
    return robots, execs


def verify(store: ScratchStore, expected_ids: Iterable[str] | None = None,
           expected_count: int | None = None) -> dict[str, Any]:
    """Every robot of the run succeeded exactly once: status succeeded, attempts == 1 and
    exactly one Execution row, whose status is succeeded; and no robot beyond the run's."""
    robots, execs = _rows(store)
    by_robot: dict[str, dict[str, int]] = {}
    for robot_id, status, count in execs:
        by_robot.setdefault(robot_id, {})[status] = int(count)
    stored = {rid: (status, int(attempts)) for rid, status, attempts in robots}
    expected = set(expected_ids) if expected_ids is not None else set(stored)
    problems: list[str] = []
    missing = expected - set(stored)
    extra = set(stored) - expected
    if missing:
        problems.append(f"{len(missing)} robots missing from the store")
    if extra:
        problems.append(f"{len(extra)} robots in the store that the run did not create")
    if expected_count is not None and len(expected) != expected_count:
        problems.append(f"expected {expected_count} robots, found {len(expected)}")
    not_ok = 0
    example = None
    for rid in expected & set(stored):
        status, attempts = stored[rid]
        if status != "succeeded" or attempts != 1 or by_robot.get(rid) != {"succeeded": 1}:
            not_ok += 1
            example = example or f"{rid}: status={status} attempts={attempts} " \
                                 f"executions={by_robot.get(rid)}"
    if not_ok:
        problems.append(f"{not_ok} robots did not succeed exactly once (e.g. {example})")
    return {"verified": not problems, "checked": len(expected), "problems": problems}


def robot_json_size(robot: Robot) -> int:
    """Bytes one cached robot status takes as JSON (what the cache stores per robot)."""
    import json

    return len(json.dumps(converter.unstructure(robot)).encode())


@contextlib.contextmanager
def rfmvp_workers(store: ScratchStore, processes: int, concurrency: int, *,
                  wake_on_finish: bool = False) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``processes`` ``rfmvp worker`` subprocesses on ``store``, running the bench's no-op
    module (``noop_plugin``, from this directory). On exit each gets SIGTERM, and is
    killed if it has not stopped within 30 s."""
    env = dict(os.environ)
    env.update(store.env())
    env.update({
        "RFMVP_API_KEYS": f"{PRINCIPAL}:{API_KEY}", "RFMVP_RATE_LIMIT": "none",
        "RFMVP_PLUGINS": "noop_plugin", "RFMVP_WORKER_CONCURRENCY": str(concurrency),
        "RFMVP_BENCH_CAPACITY": str(concurrency),
        "RFMVP_BENCH_WAKE_ON_FINISH": "1" if wake_on_finish else "0",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent)] + [p for p in [env.get("PYTHONPATH")] if p]),
    })
    rfmvp = shutil.which("rfmvp", path=str(Path(sys.executable).parent)) or "rfmvp"
    procs = [subprocess.Popen([rfmvp, "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for _ in range(processes)]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


# -- call counting (bench-side instrumentation; the package is not changed) --------------


class CallCounter:
    """Wraps the public coroutine methods of an orchestrator's storage driver and cache
    backend (on the instances, from ``on_startup``) to count calls and their wall time.

    Register as a plugin: ``Orchestrator(..., plugins=[CallCounter()])``.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    def _wrap(self, obj: object, label: str) -> None:
        import inspect

        for name in dir(type(obj)):
            if name.startswith("_") or name in ("open", "close", "listen"):
                continue
            attr = getattr(obj, name, None)
            if not inspect.iscoroutinefunction(attr):
                continue
            key = f"{label}.{name}"

            def make(fn: Any, key: str) -> Any:
                async def wrapper(*a: Any, **kw: Any) -> Any:
                    started = time.perf_counter()
                    try:
                        return await fn(*a, **kw)
                    finally:
                        slot = self.calls.setdefault(key, [0, 0.0])
                        slot[0] += 1
                        slot[1] += time.perf_counter() - started

                return wrapper

            setattr(obj, name, make(attr, key))

    def on_startup(self, orchestrator: Any) -> None:
        self._wrap(orchestrator.driver, "store")
        self._wrap(orchestrator.cache.backend, "cache")

    def reset(self) -> None:
        self.calls.clear()

    def per_robot(self, robots: int) -> dict[str, dict[str, float]]:
        """Calls per robot and mean ms per call, busiest first."""
        rows = sorted(self.calls.items(), key=lambda kv: -kv[1][0])
        return {k: {"calls_per_robot": round(v[0] / max(robots, 1), 3),
                    "mean_ms": round(1000 * v[1] / max(v[0], 1), 4)} for k, v in rows}


class WakeOnFinish:
    """Wakes the worker's dispatch loop when a robot ends while the worker was full.

    At f940fa2 the worker does not do this itself (worker.py ``_execute`` frees the slot
    but never sets ``_wake``), so a full worker sleeps ``poll_interval`` (1 s) before it
    claims again: throughput = concurrency / poll_interval. This plugin simulates the
    fix from outside so the rest can be measured; ``--wake-on-finish`` turns it on.
    """

    def __init__(self) -> None:
        self.orchestrator: Any = None

    def on_startup(self, orchestrator: Any) -> None:
        self.orchestrator = orchestrator

    def on_robot_finished(self, robot: Robot) -> None:
        if self.orchestrator is None:
            return
        worker = self.orchestrator.worker
        # The finishing robot still counts as running here.
        if len(worker.running) >= worker.concurrency or any(
            st.load >= worker.modules[name].capacity for name, st in worker.stats.items()
        ):
            worker.wake()


def _hookimpl_on_startup() -> None:
    from robotframework_mvp import hookimpl

    CallCounter.on_startup = hookimpl(CallCounter.on_startup)  # type: ignore[method-assign]
    WakeOnFinish.on_startup = hookimpl(WakeOnFinish.on_startup)  # type: ignore[method-assign]
    WakeOnFinish.on_robot_finished = hookimpl(  # type: ignore[method-assign]
        WakeOnFinish.on_robot_finished)


_hookimpl_on_startup()


def src_digest() -> str:
    """A digest of the package's sources (.py and .sql): which code a number belongs to."""
    import hashlib

    import robotframework_mvp

    root = Path(robotframework_mvp.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".sql"):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return f"{h.hexdigest()[:12]} ({root})"
