"""The ``rfmvp`` command: migrate, run workers, look at robots, manage API keys and check
the audit trail from a terminal.

Every command reads ``Settings.from_env()`` (``RFMVP_*`` variables and ``.env``). The
robot commands act as an operator with direct store access and are audited under the
principal ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from . import __version__
from .config import Settings, settings_reference
from .errors import RobotFrameworkError
from .models import Robot, RobotStatus, new_id
from .orchestrator import Orchestrator
from .schedule_commands import add_commands as add_schedule_commands
from .schedule_commands import run_schedules
from .security.commands import add_commands as add_security_commands
from .security.commands import run_audit, run_keys

__all__ = ["main"]


def _settings(worker: bool = False) -> Settings:
    settings = Settings.from_env()
    # `rfmvp worker` always runs workers (RFMVP_WORKER_ENABLED=false is meant for API
    # processes); the other commands never do.
    return settings.with_changes(worker={"enabled": worker})


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _robot_row(r: Robot) -> list[Any]:
    return [r.id, r.kind, r.status, f"{r.progress:.0f}%", f"{r.attempts}/{r.max_attempts}",
            r.module, r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            "" if r.error is None else r.error.type]


def _audit(orch: Orchestrator, action: str, target: str | None, outcome: str) -> None:
    orch.audit.record(action=action, outcome=outcome, principal=f"cli:{getpass.getuser()}",
                      target=target, client="cli", request_id=new_id())


async def _migrate(args: argparse.Namespace) -> int:
    from .plugins import build_plugin_manager

    settings = _settings()
    pm = build_plugin_manager(settings)
    driver = pm.hook.storage_driver(url=settings.storage.url, settings=settings)
    if driver is None:
        print("rfmvp: RFMVP_STORAGE_URL has a scheme no storage driver handles",
              file=sys.stderr)
        return 2
    await driver.open()
    try:
        applied = await driver.migrate()
    finally:
        await driver.close()
    print(f"applied migrations: {', '.join(map(str, applied))}" if applied
          else "schema is up to date")
    return 0


async def _worker(args: argparse.Namespace) -> int:
    settings = _settings(worker=True)
    if args.concurrency:
        settings = settings.with_changes(worker={"concurrency": args.concurrency})
    async with Orchestrator(settings) as orch:
        names = ", ".join(sorted(orch.modules)) or "none (set RFMVP_PLUGINS)"
        logging.getLogger("robotframework_mvp").info(
            "worker %s running modules: %s", orch.worker.id, names)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logging.getLogger("robotframework_mvp").info(
                    "received %s: finishing running robots, then stopping",
                    signal.Signals(signum).name)
                break
    return 0


async def _robots(args: argparse.Namespace) -> int:
    async with Orchestrator(_settings()) as orch:
        if args.robots_command in ("submit", "wait"):
            return await _submit_or_wait(orch, args)
        if args.robots_command == "list":
            status = RobotStatus(args.status) if args.status else None
            robots = await orch.state.list_robots(tenant=args.tenant, status=status,
                                                  kind=args.kind, limit=args.limit)
            _audit(orch, "robots.list", None, "ok")
            print(_table([_robot_row(r) for r in robots],
                         ["id", "kind", "status", "progress", "attempts", "module", "created",
                          "error"]))
            return 0
        robot = await orch.state.get_robot(args.id, fresh=True)
        if robot is None:
            print(f"no robot {args.id!r}", file=sys.stderr)
            return 1
        if args.robots_command == "show":
            _audit(orch, "robots.get", robot.id, "ok")
            data = robot.to_dict()
            data["executions"] = [
                {"attempt": e.attempt, "status": e.status, "module": e.module,
                 "duration_ms": e.duration_ms, "error": None if e.error is None
                 else f"{e.error.type}: {e.error.message}"}
                for e in await orch.state.list_executions(robot.id)
            ]
            print(json.dumps(data, indent=2, default=str))
            return 0
        if args.robots_command == "cancel":
            cancelled = await orch.state.cancel(robot.id)
            _audit(orch, "robots.cancel", robot.id, "cancelled" if cancelled else "conflict")
            if cancelled is None:
                print(f"robot {robot.id} already ended as {robot.status}", file=sys.stderr)
                return 1
            print(f"robot {robot.id} cancelled")
            return 0
        # retry
        requeued = await orch.state.requeue(robot.id, args.attempts)
        _audit(orch, "robots.retry", robot.id, "queued" if requeued else "conflict")
        if requeued is None:
            print(f"robot {robot.id} is {robot.status}; only failed or timed_out robots can be "
                  "retried", file=sys.stderr)
            return 1
        print(f"robot {robot.id} queued again with {args.attempts} more attempt(s)")
        return 0


async def _submit_or_wait(orch: Orchestrator, args: argparse.Namespace) -> int:
    """``robots submit`` (as the key's principal) and ``robots wait``, with progress bars."""
    from .robot_commands import ProgressBoard, exit_code, parse_payload, wait_for

    if args.robots_command == "submit":
        robot = await orch.submit(args.kind, parse_payload(args.payload), api_key=args.api_key,
                                  priority=args.priority, idempotency_key=args.idempotency_key,
                                  client="cli")
        print(robot.id if not args.wait else f"submitted {robot.id}", flush=True)
        if not args.wait:
            return 0
        ids = [robot.id]
    else:
        ids = args.ids
        _audit(orch, "robots.wait", ",".join(ids)[:200], "ok")

    async def fresh(robot_id: str) -> Robot | None:
        return await orch.state.get_robot(robot_id, fresh=True)

    robots = await wait_for(fresh, ids, args.timeout, ProgressBoard())
    missing = sorted(set(ids) - {r.id for r in robots})
    for robot_id in missing:
        print(f"no robot {robot_id!r}", file=sys.stderr)
    if any(not r.is_terminal for r in robots):
        print(f"still running after {args.timeout:g} s", file=sys.stderr)
    return 1 if missing else exit_code(robots)


async def _stats(args: argparse.Namespace) -> int:
    if args.url:
        from .robot_commands import step_table

        rows, alerts, leader = step_table(args.url)
        print(_table(rows, ["step", "count", "p50 ms", "p95 ms", "p99 ms", "budget ms"]))
        print(f"\nserver: {leader}; active alerts: {', '.join(alerts) or 'none'}\n")
    async with Orchestrator(_settings()) as orch:
        counts = await orch.driver.count_robots()
        from .models import utcnow

        depth, oldest = await orch.driver.queue_stats(utcnow())
        rows = [[kind, status, n] for (kind, status), n in sorted(counts.items())]
        print(_table(rows, ["kind", "status", "robots"]))
        age = "-" if oldest is None else f"{oldest:.1f} s"
        print(f"\nqueue: {depth} due robots, oldest waiting {age}")
        modules = await orch.state.list_modules()
        if modules:
            print()
            print(_table([[m.name, ",".join(m.kinds), m.health, f"{m.score:.3f}",
                           m.circuit_state, f"{m.load}/{m.capacity}"] for m in modules],
                         ["module", "kinds", "health", "score", "circuit", "load"]))
    return 0


def _config(args: argparse.Namespace) -> int:
    print(_table(settings_reference(), ["variable", "default", "accepted", "meaning"]))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rfmvp", description="robotframework-mvp operator tool")
    parser.add_argument("--version", action="version", version=f"rfmvp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending schema migrations")
    worker = sub.add_parser("worker", help="run workers and background loops (no HTTP)")
    worker.add_argument("--concurrency", type=int, default=0,
                        help="robots at once (default RFMVP_WORKER_CONCURRENCY)")
    robots = sub.add_parser("robots", help="list, show, submit, wait for, cancel or retry "
                            "robots")
    rsub = robots.add_subparsers(dest="robots_command", required=True)
    lst = rsub.add_parser("list", help="newest robots first")
    lst.add_argument("--status", choices=[s.value for s in RobotStatus])
    lst.add_argument("--kind")
    lst.add_argument("--tenant")
    lst.add_argument("--limit", type=int, default=50)
    for name, text in (("show", "one robot with its executions"),
                       ("cancel", "cancel a queued or running robot")):
        rsub.add_parser(name, help=text).add_argument("id")
    retry = rsub.add_parser("retry", help="requeue a failed or timed-out robot")
    retry.add_argument("id")
    retry.add_argument("--attempts", type=int, default=1, help="extra attempts (default 1)")
    from .robot_commands import add_commands as add_robot_commands

    add_robot_commands(rsub)  # submit, wait
    add_security_commands(sub)  # keys, audit
    add_schedule_commands(sub)  # schedules
    stats = sub.add_parser("stats", help="robots by kind and status, queue depth, modules")
    stats.add_argument("--url", help="also show per-step latencies from this server's /metrics "
                       "(e.g. http://127.0.0.1:8000)")
    sub.add_parser("config", help="every setting with its variable and default")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"migrate": _migrate, "worker": _worker, "robots": _robots, "stats": _stats,
                "schedules": run_schedules,
                "keys": run_keys, "audit": run_audit}
    try:
        if args.command == "config":
            return _config(args)
        result: int = anyio.run(commands[args.command], args)
        return result
    except RobotFrameworkError as exc:
        print(f"rfmvp: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
