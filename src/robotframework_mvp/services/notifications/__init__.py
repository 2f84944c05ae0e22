"""NotificationService: notifications of robot events, through the observe hooks (extra
``notifications``).

Webhooks (HTTP POST of JSON, signed with HMAC-SHA-256 over the timestamp and the body),
e-mail through SMTP (aiosmtplib), a ``log`` channel, and any channel another plugin
contributes through the ``notification_channels`` hook. Subscriptions pick robots by kind
pattern and status. Delivery runs in a background task, off the worker's completion
path, retried with exponential backoff and full jitter while failures are transient, and
recorded in a bounded delivery log.

Enable it with ``RFMVP_PLUGINS=robotframework_mvp.services.notifications`` (configured
from ``RFMVP_NOTIFY_*`` variables), or pass ``NotificationService(subscriptions=[...])``
to ``Orchestrator(plugins=[...])``. See ``docs/services/notifications.md``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from ...hookspecs import hookimpl
from .channels import DeliveryError, LogChannel, Notification, NotificationChannel
from .config import NotifyConfig, Subscription
from .service import DeliveryAttempt, DeliveryRecord, NotificationService
from .smtp import SmtpChannel
from .webhook import WebhookChannel, sign, verify_signature

if TYPE_CHECKING:
    from ...orchestrator import Orchestrator

__all__ = [
    "DeliveryAttempt",
    "DeliveryError",
    "DeliveryRecord",
    "LogChannel",
    "Notification",
    "NotificationChannel",
    "NotificationService",
    "NotifyConfig",
    "SmtpChannel",
    "Subscription",
    "WebhookChannel",
    "background_tasks",
    "sign",
    "verify_signature",
]


@hookimpl
def background_tasks(orchestrator: Orchestrator) -> Sequence[Callable[[], Awaitable[None]]]:
    """``RFMVP_PLUGINS=robotframework_mvp.services.notifications``: a service built from
    ``RFMVP_NOTIFY_*``, registered on this orchestrator only (unless it has one already),
    and its delivery task."""
    pm = orchestrator.pm
    if any(isinstance(p, NotificationService) for p in pm.get_plugins()):
        return []
    service = NotificationService.from_env()
    tasks = service.background_tasks(orchestrator)  # fails startup on a bad channel name
    pm.register(service, name="rfmvp.notifications")
    service.open()  # its on_startup may already have been called for the others
    return tasks
