"""Two demo modules: ``echo`` answers at once, ``sleep`` takes its time and reports progress.

Register them with an orchestrator (``Orchestrator(settings, modules=[echo, sleep])``), or
register this whole file as a plugin (``plugins=[demo]``, or ``RFMVP_PLUGINS=modules.demo``
with ``examples/`` on ``sys.path``): then its ``validate_robot`` hook also refuses a bad
``sleep`` payload with 422 at submission instead of letting the robot fail.
"""

from __future__ import annotations

import math
import time
from typing import Any

import anyio

from robotframework_mvp import ModuleContext, Principal, Robot, hookimpl, module

__all__ = ["MAX_SLEEP_SECONDS", "echo", "sleep", "validate_robot"]

MAX_SLEEP_SECONDS = 3600.0
_STEP_SECONDS = 0.25  # progress is reported at least every 0.5 s, as promised


@module("echo", kinds=["echo"])
async def echo(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Return the payload unchanged: ``{"echo": payload}``."""
    return {"echo": robot.payload}


def _seconds(payload: dict[str, Any]) -> float:
    value = payload.get("seconds")
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_SLEEP_SECONDS
    ):
        raise ValueError(
            f"payload.seconds must be a number from 0 to {MAX_SLEEP_SECONDS:g}, "
            f"not {type(value).__name__ if not isinstance(value, int | float) else value!r}"
        )
    return float(value)


@module("sleep", kinds=["sleep"], timeout=MAX_SLEEP_SECONDS + 60)
async def sleep(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Sleep ``payload["seconds"]`` (0-3600), reporting progress as it goes."""
    seconds = _seconds(robot.payload)
    shown = robot.payload["seconds"]
    started = time.monotonic()
    deadline = started + seconds
    while (left := deadline - time.monotonic()) > 0:
        await anyio.sleep(min(_STEP_SECONDS, left))
        slept = min(time.monotonic() - started, seconds)
        if slept < seconds:
            await ctx.progress(100 * slept / seconds, f"slept {slept:.1f} of {shown} s")
    await ctx.progress(100, f"slept {seconds:.1f} of {shown} s")
    return {"slept": shown}


@hookimpl
def validate_robot(kind: str, payload: dict[str, Any], principal: Principal) -> str | None:
    """Refuse a ``sleep`` robot whose ``seconds`` is not a number from 0 to 3600 (422)."""
    if kind != "sleep":
        return None
    try:
        _seconds(payload)
    except ValueError as exc:
        return str(exc)
    return None
