"""``rfmvp schedules add|list|show|pause|resume|remove``: schedules from a terminal.

Like the robot commands, these act as an operator with direct store access (no API key)
and are audited under the principal ``cli:<user>``. ``add`` creates the schedule for
``--owner`` in ``--tenant`` (the owner's own tenant by default), checked exactly as
``Orchestrator.add_schedule`` checks it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import RobotFrameworkError
from .models import MisfirePolicy, Principal, Schedule
from .scheduling import change_schedule

__all__ = ["add_commands", "run_schedules"]


def add_commands(sub: Any) -> None:
    """Add ``schedules`` and its subcommands to the ``rfmvp`` parser."""
    schedules = sub.add_parser("schedules", help="add, list, pause, resume or remove schedules")
    ssub = schedules.add_subparsers(dest="schedules_command", required=True)
    add = ssub.add_parser("add", help="create a cron schedule that fires robots")
    add.add_argument("kind", help="the kind of robot each due time fires")
    add.add_argument("cron", help="5 fields, or 6 with seconds first (quote it)")
    add.add_argument("--payload", default="{}", help="the robots' payload, a JSON object")
    add.add_argument("--timezone", default="UTC", help="IANA name (default UTC)")
    add.add_argument("--misfire-policy", default="skip",
                     choices=[p.value for p in MisfirePolicy])
    add.add_argument("--misfire-limit", type=int, default=100,
                     help="most catch-up robots of run_all (default 100)")
    add.add_argument("--priority", type=int, default=0)
    add.add_argument("--owner", required=True, help="the principal that owns it")
    add.add_argument("--tenant", help="its tenant (default: the owner)")
    add.add_argument("--paused", action="store_true", help="create it paused")
    lst = ssub.add_parser("list", help="schedules by id")
    lst.add_argument("--tenant")
    lst.add_argument("--limit", type=int, default=100)
    for name, text in (("show", "one schedule with its latest fires"),
                       ("pause", "stop firing"), ("resume", "fire again from now on"),
                       ("remove", "delete a schedule (its robots stay)")):
        ssub.add_parser(name, help=text).add_argument("id")


def _row(s: Schedule) -> list[Any]:
    return [s.id, s.kind, s.cron, s.timezone, s.misfire_policy,
            "paused" if s.paused else "active", s.next_due_at.strftime("%Y-%m-%d %H:%M:%S"),
            s.tenant]


async def run_schedules(args: argparse.Namespace) -> int:
    from .cli import _audit, _settings, _table
    from .orchestrator import Orchestrator

    async with Orchestrator(_settings().with_changes(background={"scheduler_enabled": False})
                            ) as orch:
        command = args.schedules_command
        if command == "add":
            try:
                payload = json.loads(args.payload)
            except ValueError:
                print("rfmvp: --payload is not valid JSON", file=sys.stderr)
                return 2
            principal = Principal(id=args.owner, tenant=args.tenant or args.owner)
            try:
                new = await orch.new_schedule(
                    principal, args.kind, payload, cron=args.cron, timezone=args.timezone,
                    misfire_policy=args.misfire_policy, misfire_limit=args.misfire_limit,
                    priority=args.priority, paused=args.paused)
            except RobotFrameworkError as exc:
                print(f"rfmvp: {exc.message}", file=sys.stderr)
                return 2
            stored = await orch.driver.create_schedule(new)
            _audit(orch, "schedules.add", stored.id, "created")
            print(f"schedule {stored.id} created; next due {stored.next_due_at.isoformat()}")
            return 0
        if command == "list":
            page = await orch.driver.list_schedules(tenant=args.tenant, limit=args.limit,
                                                    after_id=None)
            _audit(orch, "schedules.list", None, "ok")
            print(_table([_row(s) for s in page], ["id", "kind", "cron", "timezone", "misfire",
                                                   "state", "next due (UTC)", "tenant"]))
            return 0
        schedule = await orch.driver.get_schedule(args.id)
        if schedule is None:
            print(f"no schedule {args.id!r}", file=sys.stderr)
            return 1
        if command == "show":
            _audit(orch, "schedules.get", schedule.id, "ok")
            data = schedule.to_dict()
            data["fires"] = [
                {"due_at": f.due_at.isoformat(), "robot_id": f.robot_id, "late": f.late,
                 "covers": f.covers}
                for f in await orch.driver.list_schedule_fires(schedule.id, 20)
            ]
            print(json.dumps(data, indent=2, default=str))
            return 0
        changed = await change_schedule(orch.driver, f"schedules.{command}", schedule)
        _audit(orch, f"schedules.{command}", schedule.id, "ok" if changed else "gone")
        if changed is None:
            print(f"no schedule {args.id!r}", file=sys.stderr)
            return 1
        done = {"pause": "paused", "resume": "resumed", "remove": "removed"}[command]
        print(f"schedule {schedule.id} {done}")
        return 0
