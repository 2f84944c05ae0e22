"""``rfmvp robots submit|wait`` and ``rfmvp stats --url``: waiting on robots in a terminal.

This module owns the terminal side of waiting: ``ProgressBoard`` draws one progress bar
per robot, redrawn in place with ANSI escapes on a terminal and as plain lines (one per
change of status or of 10 % of progress) when the output is a pipe or a file, so CI logs
stay readable. ``wait_for`` polls the store until every robot ended or the timeout
passed. ``step_table`` reads a running server's ``/metrics`` for the per-step latencies
that only a server process has (the ``rfmvp`` process itself has run no step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

import anyio

from .models import Robot, RobotStatus

__all__ = ["ProgressBoard", "add_commands", "exit_code", "step_table", "wait_for"]

_COLORS = {"succeeded": "32", "failed": "31", "timed_out": "31", "cancelled": "90",
           "running": "33", "queued": "34", "pending": "34"}
_POLL = 0.25


def add_commands(rsub: Any) -> None:
    """Add ``submit`` and ``wait`` to the ``robots`` sub-commands."""
    submit = rsub.add_parser("submit", help="submit a robot (as the owner of --api-key)")
    submit.add_argument("kind")
    submit.add_argument("--payload", default="{}", help="the payload as a JSON object")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--idempotency-key")
    submit.add_argument("--api-key", default=os.environ.get("RFMVP_API_KEY"),
                        help="whose robot it is (default: $RFMVP_API_KEY)")
    submit.add_argument("--wait", action="store_true",
                        help="show its progress until it ends (a worker must be running)")
    submit.add_argument("--timeout", type=float, default=600.0,
                        help="longest --wait, in seconds (default 600)")
    wait = rsub.add_parser("wait", help="show progress bars until the robots end")
    wait.add_argument("ids", nargs="+", metavar="ID")
    wait.add_argument("--timeout", type=float, default=600.0,
                      help="give up after this many seconds (default 600)")


class ProgressBoard:
    """One line per robot: a bar, its progress, status and latest message."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 width: int = 30) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self._drawn = 0
        self._last: dict[str, tuple[str, int, str | None]] = {}

    def line(self, robot: Robot) -> str:
        filled = round(self.width * max(0.0, min(100.0, robot.progress)) / 100)
        bar = "#" * filled + "-" * (self.width - filled)
        status = str(robot.status)
        if self.tty:
            status = f"\x1b[{_COLORS.get(status, '0')}m{status:<9}\x1b[0m"
        else:
            status = f"{status:<9}"
        message = robot.progress_message or (robot.error.type if robot.error else "")
        return (f"{robot.id[:13]} {robot.kind[:16]:<16} [{bar}] {robot.progress:5.1f}% "
                f"{status} {message[:60]}").rstrip()

    def update(self, robots: Sequence[Robot]) -> None:
        if self.tty:
            out = "\x1b[1A\x1b[2K" * self._drawn
            out += "".join(self.line(r) + "\n" for r in robots)
            self.stream.write(out)
            self._drawn = len(robots)
        else:
            for robot in robots:
                # A line per change of status, of 10 % of progress, or of message.
                seen = (str(robot.status), int(robot.progress // 10), robot.progress_message)
                if self._last.get(robot.id) != seen:
                    self._last[robot.id] = seen
                    self.stream.write(self.line(robot) + "\n")
        self.stream.flush()


async def wait_for(get: Any, ids: Sequence[str], timeout: float,
                   board: ProgressBoard | None = None) -> list[Robot]:
    """Poll ``get(id)`` until every robot ended or ``timeout`` passed; draw each round."""
    deadline = time.monotonic() + timeout
    while True:
        robots = [await get(robot_id) for robot_id in ids]
        found = [r for r in robots if r is not None]
        if board is not None:
            board.update(found)
        if all(r.is_terminal for r in found) or time.monotonic() >= deadline:
            return found
        await anyio.sleep(_POLL)


def exit_code(robots: Sequence[Robot]) -> int:
    """0 when every robot succeeded, 1 when any ended otherwise, 3 when any is still on."""
    if any(not r.is_terminal for r in robots):
        return 3
    return 0 if all(r.status is RobotStatus.SUCCEEDED for r in robots) else 1


def step_table(url: str, timeout: float = 5.0) -> tuple[list[list[Any]], list[str], str]:
    """Per-step rows (operation, count, p50, p95, p99, budget), active alerts, and the
    leader state, read from ``<url>/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    from .dashboard import BUDGETS_MS
    from .performance import OPERATIONS

    target = url.rstrip("/") + "/metrics"
    if not target.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError("--url must be an http:// or https:// URL")
    with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310
        text = response.read().decode()
    counts: dict[str, float] = {}
    quantiles: dict[tuple[str, str], float] = {}
    alerts: list[str] = []
    leader = "unknown"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "rfmvp_step_duration_seconds_count":
                counts[labels["operation"]] = sample.value
            elif sample.name == "rfmvp_step_latency_seconds":
                quantiles[(labels["operation"], labels["quantile"])] = sample.value * 1000
            elif sample.name == "rfmvp_alerts_active" and sample.value:
                alerts.append(labels["key"])
            elif sample.name == "rfmvp_leader":
                leader = f"{'leader' if sample.value else 'follower'} ({labels['backend']})"

    def ms(op: str, q: str) -> str:
        value = quantiles.get((op, q))
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for op in OPERATIONS:
        budget = BUDGETS_MS.get(op)
        rows.append([op, int(counts.get(op, 0)), ms(op, "0.5"), ms(op, "0.95"), ms(op, "0.99"),
                     "-" if budget is None else f"{budget[0]:g}-{budget[1]:g}"])
    return rows, alerts, leader


def parse_payload(text: str) -> dict[str, Any]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"rfmvp: --payload is not JSON: {exc.msg}") from None
    if not isinstance(payload, dict):
        raise SystemExit("rfmvp: --payload must be a JSON object")
    return payload
