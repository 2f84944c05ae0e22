"""HTTP load on ``examples/server.py``: POST /api/v1/robots over loopback.

    python bench/http_load.py                                    # sqlite (temp) + memory
    python bench/http_load.py --storage postgresql://postgres@127.0.0.1:5432/test \\
        --cache redis://127.0.0.1:6379/0 --connections 32 --duration 10
    python bench/http_load.py --tool wrk                         # if wrk is installed

Starts the example server (one uvicorn process, its worker on, as shipped) on a free port
with a static key and no rate limit, waits for /health, warms up, then keeps
``--connections`` keep-alive connections busy with ``{"kind":"echo","payload":{}}`` for
``--duration`` seconds (or ``--max-requests``). Prints one JSON line: requests_per_s,
p50/p95/p99 ms, errors, non_2xx, and the CPU seconds the server and the load client
used (both share this machine's cores). From the server's ``/metrics``: how often its
event loop was held up during the load (``server_loop_lag``: of the lag samples taken,
the share over 5, 10 and 25 ms; see docs/operations.md), and each step's p99 over its
last samples when the load ends (``server_step_p99_ms``). Then waits until the server's
worker has run every robot (``backlog_at_end`` robots were left, ``drain_s`` it took),
stops the server with SIGTERM, and checks that each robot created succeeded exactly once
(``--no-worker``: that each is stored once, still queued).

Clients: ``raw`` (default: minimal HTTP/1.1 keep-alive over asyncio streams, about a fifth
of a core at 1,000 req/s, so the server is what is measured), ``httpx`` (an
``httpx.AsyncClient``: it saturates a core near 300 req/s on this machine and then measures
itself, not the server), ``wrk`` (C; wrk reports no p95).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _support as bs

BODY = json.dumps({"kind": "echo", "payload": {}}).encode()
#: the key the clients send: the static one, or a stored one (``--stored-key``)
KEY = bs.API_KEY
#: the server's pepper for stored keys (``--stored-key``)
PEPPER = "bench-pepper-" + "x" * 32
PATH = "/api/v1/robots"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (from /proc/PID/stat), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# -- clients -------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.lat: list[float] = []
        self.ok = 0
        self.non_2xx = 0
        self.errors = 0
        self.status: dict[int, int] = {}

    def add(self, status: int, ms: float) -> None:
        self.lat.append(ms)
        self.status[status] = self.status.get(status, 0) + 1
        if 200 <= status < 300:
            self.ok += 1
        else:
            self.non_2xx += 1


async def run_httpx(url: str, connections: int, duration: float, max_requests: int,
                    stats: Stats) -> None:
    import httpx

    headers = {"X-API-Key": KEY, "content-type": "application/json"}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    deadline = time.perf_counter() + duration
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:

        async def one() -> None:
            while time.perf_counter() < deadline and len(stats.lat) + stats.errors < max_requests:
                t = time.perf_counter()
                try:
                    r = await client.post(PATH, content=BODY, headers=headers)
                except httpx.HTTPError:
                    stats.errors += 1
                    continue
                stats.add(r.status_code, (time.perf_counter() - t) * 1000)

        await asyncio.gather(*[one() for _ in range(connections)])


async def run_raw(host: str, port: int, connections: int, duration: float, max_requests: int,
                  stats: Stats, get_ids: list[str] | None = None) -> None:
    """POST a robot again and again; with ``get_ids``, GET those robots in turn instead."""
    post = (f"POST {PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
            ).encode() + BODY
    requests = [post] if not get_ids else [
        f"GET {PATH}/{robot_id} HTTP/1.1\r\nHost: {host}:{port}\r\nX-API-Key: {KEY}\r\n\r\n"
        .encode() for robot_id in get_ids]
    deadline = time.perf_counter() + duration

    async def one(offset: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        n = offset
        try:
            while time.perf_counter() < deadline and len(stats.lat) + stats.errors < max_requests:
                t = time.perf_counter()
                request = requests[n % len(requests)]
                n += 1
                try:
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    status = int(head[9:12])
                    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                    if match is None:  # chunked or close-delimited: not what uvicorn sends here
                        raise ConnectionError("response without content-length")
                    await reader.readexactly(int(match.group(1)))
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    stats.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                stats.add(status, (time.perf_counter() - t) * 1000)
        finally:
            writer.close()

    await asyncio.gather(*[one(i * 7919) for i in range(connections)])


def _wrk_lua() -> str:
    return f"""
wrk.method = "POST"
wrk.body = '{BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = "{KEY}"
"""


def _wrk_ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, connections: int, duration: float, threads: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_wrk_lua())
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s",
             "--latency", "--timeout", "10s", "-s", script, url + PATH],
            capture_output=True, text=True, check=True,
        ).stdout
    finally:
        os.unlink(script)
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.MULTILINE))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out)  # type: ignore[union-attr]
                                      .group(1))),
        "p50_ms": _wrk_ms(lat["50"]), "p95_ms": None, "p99_ms": _wrk_ms(lat["99"]),
        "p90_ms": _wrk_ms(lat["90"]),
        "requests": total,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "raw": out,
    }


# -- the server ----------------------------------------------------------------------------


def start_server(args: argparse.Namespace, store: bs.ScratchStore, port: int,
                 log_path: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(store.env())
    env.update({
        "RFMVP_API_KEYS": f"{bs.PRINCIPAL}:{bs.API_KEY}",
        "RFMVP_RATE_LIMIT": args.rate_limit,
        "RFMVP_SECRET_KEY": PEPPER,
        "RFMVP_HOST": "127.0.0.1",
        "RFMVP_PORT": str(port),
        "RFMVP_WORKER_ENABLED": "true" if args.worker else "false",
    })
    log = open(log_path, "wb")  # noqa: SIM115 - the server owns it until it exits
    return subprocess.Popen([sys.executable, args.server], env=env, stdout=log, stderr=log,
                            cwd=str(Path(args.server).resolve().parent))


async def create_stored_key(store: bs.ScratchStore) -> str:
    """A stored key for the bench principal, in the store the server has migrated."""
    from robotframework_mvp import Settings
    from robotframework_mvp.plugins import BuiltinPlugin
    from robotframework_mvp.security.keys import create_key

    driver = BuiltinPlugin().storage_driver(store.storage_url, Settings())
    assert driver is not None
    await driver.open()
    try:
        key, _ = await create_key(driver, PEPPER, principal=bs.PRINCIPAL)
    finally:
        await driver.close()
    return key


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was healthy")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not become healthy within 30 s")


_LAG_BUCKET = re.compile(r'^rfmvp_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$',
                         re.MULTILINE)


_STEP_P99 = re.compile(
    r'^rfmvp_step_latency_seconds\{operation="([^"]+)",quantile="0.99"\} (\S+)$', re.MULTILINE)


def scrape(url: str) -> str:
    import httpx

    return httpx.get(url + "/metrics", timeout=10.0).text


def loop_lag_buckets(text: str) -> dict[str, float]:
    """The server's cumulative event-loop lag histogram (``le`` -> count)."""
    return {le: float(n) for le, n in _LAG_BUCKET.findall(text)}


def step_p99_ms(text: str) -> dict[str, float]:
    """The server's p99 of each step over its last samples (its window)."""
    return {op: round(float(v) * 1000, 3) for op, v in _STEP_P99.findall(text)}


def loop_lag_during(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The lag samples the server took between two scrapes, and the share of them that
    were over 5, 10 and 25 ms: how often ready work waited behind long callbacks."""
    samples = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    out: dict[str, Any] = {"samples": int(samples)}
    for ms in (5, 10, 25):
        le = f"{ms / 1000:g}"
        at_most = after.get(le, 0.0) - before.get(le, 0.0)
        out[f"over_{ms}ms"] = round(1 - at_most / samples, 3) if samples else None
    return out


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_drained(store: bs.ScratchStore, timeout: float) -> tuple[int, int, float]:
    """Wait until no robot is queued or running. Returns how many still are, how many
    were when the wait began (the worker's backlog at the end of the load), and the
    seconds waited: a server that takes requests faster than its worker runs them shows
    here, not in requests/s."""
    started = time.monotonic()
    backlog = None
    while True:
        left = bs.count_unfinished(store)
        if backlog is None:
            backlog = left
        if left == 0 or time.monotonic() > started + timeout:
            return left, backlog, round(time.monotonic() - started, 2)
        time.sleep(0.2)


# -- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storage", default=None, help="sqlite:///PATH (default temp) or postgresql://")
    p.add_argument("--cache", default="memory://")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    p.add_argument("--max-requests", type=int, default=200_000)
    p.add_argument("--rate-limit", default="none",
                   help="the server's RFMVP_RATE_LIMIT (default none); e.g. 1000000/second "
                        "to measure what the limiter costs while it admits everything")
    p.add_argument("--stored-key", action="store_true",
                   help="send a stored key (rfmvp keys create) instead of a static one: "
                        "each request then looks its key up in the store")
    p.add_argument("--get", action="store_true",
                   help="after the warm-up's submissions, GET those robots (status reads, "
                        "from the cache) instead of submitting more; raw client only")
    p.add_argument("--tool", choices=["httpx", "raw", "wrk"], default="raw",
                   help="raw (default): minimal asyncio HTTP/1.1 client; httpx: saturates a "
                        "core at a few hundred req/s here, so it measures itself; wrk")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--server", default=str(ROOT / "examples" / "server.py"))
    p.add_argument("--no-worker", dest="worker", action="store_false",
                   help="RFMVP_WORKER_ENABLED=false: measure the API path alone")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--profile-server", metavar="FILE",
                   help="py-spy the server during the measured load (raw format, to FILE)")
    p.add_argument("--json-only", action="store_true")
    args = p.parse_args(argv)
    if args.get and (args.tool != "raw" or args.warmup <= 0):
        raise SystemExit("--get needs the raw client and a warm-up (its robots are read)")
    if args.tool == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk); use --tool httpx or raw")
    quiet = args.json_only

    with bs.scratch_store(args.storage, args.cache) as store, \
            tempfile.TemporaryDirectory(prefix="rfmvp-http-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        proc = start_server(args, store, port, log_path)
        try:
            wait_healthy(url, proc)
            if args.stored_key:
                global KEY
                KEY = asyncio.run(create_stored_key(store))
            bs.log(quiet, f"server up on {url} (pid {proc.pid}); tool {args.tool}, "
                          f"{args.connections} connections, {args.duration:g} s")
            warm = Stats()
            if args.warmup > 0:
                asyncio.run(run_raw("127.0.0.1", port, args.connections, args.warmup,
                                    args.max_requests, warm))
            spy = None
            if args.profile_server:
                spy = subprocess.Popen(
                    [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                     "record", "-p", str(proc.pid), "-r", "400", "-f", "raw", "--threads",
                     "-d", str(max(1, round(args.duration))), "-o", args.profile_server],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lag0 = loop_lag_buckets(scrape(url))
            server_cpu0, client_cpu0, t0 = cpu_seconds(proc.pid), self_cpu(), time.perf_counter()
            stats = Stats()
            result: dict[str, Any]
            if args.tool == "wrk":
                result = run_wrk(url, args.connections, args.duration, args.wrk_threads)
                raw = result.pop("raw")
                bs.log(quiet, raw)
                accepted = result["requests"] - result["non_2xx"]
            else:
                if args.tool == "httpx":
                    asyncio.run(run_httpx(url, args.connections, args.duration,
                                          args.max_requests, stats))
                else:
                    get_ids = [r[0] for r in bs._rows(store)[0]] if args.get else None
                    asyncio.run(run_raw("127.0.0.1", port, args.connections, args.duration,
                                        args.max_requests, stats, get_ids))
                elapsed = time.perf_counter() - t0
                result = {
                    "requests_per_s": round(len(stats.lat) / elapsed),
                    "p50_ms": round(bs.pct(stats.lat, 50), 3),
                    "p95_ms": round(bs.pct(stats.lat, 95), 3),
                    "p99_ms": round(bs.pct(stats.lat, 99), 3),
                    "requests": len(stats.lat), "non_2xx": stats.non_2xx,
                    "errors": stats.errors, "status": stats.status,
                }
                accepted = stats.ok
            elapsed = time.perf_counter() - t0
            result["server_cpu_s"] = round(cpu_seconds(proc.pid) - server_cpu0, 2)
            result["client_cpu_s"] = round(self_cpu() - client_cpu0, 2)
            result["wall_s"] = round(elapsed, 2)
            text = scrape(url)
            result["server_loop_lag"] = loop_lag_during(lag0, loop_lag_buckets(text))
            result["server_step_p99_ms"] = step_p99_ms(text)
            expected = (0 if args.get else accepted) + warm.ok
            if spy is not None:
                spy.wait(timeout=60)
            left = 0
            if args.worker:
                left, result["backlog_at_end"], result["drain_s"] = wait_drained(
                    store, args.drain_timeout)
        finally:
            code = stop_server(proc)
        check = bs.verify(store) if args.worker else {"verified": True, "problems": []}
        robots, _ = bs._rows(store)
        problems = list(check["problems"])
        if left:
            problems.append(f"{left} robots still queued or running after the drain timeout")
        if args.tool == "wrk":
            # wrk counts responses received within the duration: requests still in flight
            # at its end (one per connection at most) or timed out were stored all the same.
            if not expected <= len(robots) <= expected + args.connections + result["errors"]:
                problems.append(f"{len(robots)} robots stored for {expected} accepted requests")
        elif len(robots) != expected:
            problems.append(f"{len(robots)} robots stored for {expected} accepted requests")
        if code not in (0, -signal.SIGTERM):
            problems.append(f"the server exited with {code}")
        if problems:
            bs.log(False, log_path.read_text()[-3000:])
        out = {
            "system": "robotframework-mvp", "bench": "http", "tool": args.tool,
            "storage": store.storage, "cache": store.cache, "connections": args.connections,
            "rate_limit": args.rate_limit, "stored_key": args.stored_key, "get": args.get,
            "duration_s": args.duration, "worker": args.worker, **result,
            "robots_stored": len(robots), "verified": not problems, "problems": problems,
            "src_digest": bs.src_digest(),
        }
    print(json.dumps(out), flush=True)
    return 0 if out["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
