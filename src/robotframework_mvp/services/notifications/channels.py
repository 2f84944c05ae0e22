"""What a channel receives and how it reports failure: Notification, the channel protocol,
DeliveryError, and the built-in LogChannel.

A channel is any object with a ``name`` and ``async send(notification)``. It raises
:class:`DeliveryError` to say whether a retry may help; ``OSError`` and ``TimeoutError``
are retried too, anything else fails the delivery at once.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import attrs

from ...models import Robot

__all__ = ["DeliveryError", "LogChannel", "Notification", "NotificationChannel"]

log = logging.getLogger(__name__)

#: robot fields a notification shows; never the payload (it may hold personal data)
_ROBOT_FIELDS = ("id", "kind", "status", "module", "owner", "tenant", "attempts",
                 "max_attempts", "progress", "progress_message", "error", "created_at",
                 "started_at", "finished_at", "parent_id", "parent_trigger", "schedule_id")


@attrs.frozen
class Notification:
    """One event for one subscription. ``id`` is the same on every attempt (deduplicate
    on it: delivery is at least once)."""

    id: str
    event: str  # robot.finished or robot.created
    subscription: str
    robot: Robot
    created_at: datetime
    include_result: bool = True
    max_result_bytes: int = 16 * 1024

    def to_dict(self) -> dict[str, Any]:
        """The JSON document a webhook posts (and an e-mail attaches)."""
        data = self.robot.to_dict()
        robot = {name: data[name] for name in _ROBOT_FIELDS if name in data}
        if self.include_result and self.robot.result is not None:
            encoded = json.dumps(self.robot.result, separators=(",", ":"))
            if len(encoded.encode()) <= self.max_result_bytes:
                robot["result"] = self.robot.result
            else:
                robot["result"] = None
                robot["result_truncated"] = True
        return {
            "id": self.id,
            "event": self.event,
            "subscription": self.subscription,
            "created_at": self.created_at.isoformat(),
            "robot": robot,
        }

    @property
    def summary(self) -> str:
        robot = self.robot
        text = f"robot {robot.id} ({robot.kind}) {robot.status}"
        if robot.error is not None:
            text += f": {robot.error.type}: {robot.error.message[:200]}"
        return text


@runtime_checkable
class NotificationChannel(Protocol):
    """Delivers notifications somewhere. ``aclose()``, when present, is called at shutdown."""

    name: str

    async def send(self, notification: Notification) -> None:
        """Deliver one notification, or raise (``DeliveryError`` says if a retry may help)."""
        ...


class DeliveryError(Exception):
    """A delivery attempt failed; ``retryable`` says whether another attempt may succeed.

    ``retry_after`` (seconds), when the receiver asked for it, delays the next attempt at
    least that long. The message must not hold secrets: it goes to the delivery log.
    """

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None
                 ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class LogChannel:
    """Writes each notification to the ``robotframework_mvp.notifications`` logger.

    Built in under the name ``log``: a subscription with ``"channel": "log"`` uses it.
    """

    def __init__(self, name: str = "log", *, level: int = logging.INFO) -> None:
        self.name = name
        self.level = level
        self.logger = logging.getLogger("robotframework_mvp.notifications")

    async def send(self, notification: Notification) -> None:
        self.logger.log(self.level, "notification %s [%s]: %s", notification.id,
                        notification.subscription, notification.summary)
