"""An example robotframework-mvp plugin.

Installed (``pip install -e examples/plugin_package``), it is found through the
``robotframework_mvp`` entry-point group, and every orchestrator registers this module:

- ``reverse``, the module for robots of kind ``reverse``: ``{"text": "abc"}`` gives
  ``{"reversed": "cba"}``;
- ``validate_robot``, a decision hook that refuses a ``reverse`` robot without a text (422);
- ``on_robot_finished``, an observer hook counting finished robots by kind and status in
  ``FINISHED`` (a module-level ``Counter``; one per process, shared by its orchestrators).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from robotframework_mvp import ModuleContext, Principal, Robot, hookimpl, module

__all__ = ["FINISHED", "on_robot_finished", "reverse", "validate_robot"]

#: finished robots seen by this process, by ``(kind, status)``
FINISHED: Counter[tuple[str, str]] = Counter()


@module("reverse", kinds=["reverse"])
def reverse(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Reverse ``payload["text"]``. A plain function: it runs in a worker thread."""
    text = robot.payload.get("text")
    if not isinstance(text, str):
        raise ValueError("payload.text must be a string")
    return {"reversed": text[::-1]}


@hookimpl
def validate_robot(kind: str, payload: dict[str, Any], principal: Principal) -> str | None:
    """Refuse a ``reverse`` robot whose payload has no ``text`` string, before it is stored."""
    if kind == "reverse" and not isinstance(payload.get("text"), str):
        return "a reverse robot needs payload.text, a string"
    return None


@hookimpl
def on_robot_finished(robot: Robot) -> None:
    """Count each robot that reached a terminal state."""
    FINISHED[robot.kind, str(robot.status)] += 1
