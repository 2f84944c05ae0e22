"""Subscriptions and delivery settings, from Python objects or ``RFMVP_NOTIFY_*`` variables.

A :class:`Subscription` matches robots by kind (shell-style globs such as ``ocr*``) and by
status, and names the channel that delivers to it. ``RFMVP_NOTIFY_SUBSCRIPTIONS`` holds a
JSON list of them (or ``RFMVP_NOTIFY_SUBSCRIPTIONS_FILE`` names a file that does)::

    [{"kinds": ["ocr*"], "statuses": ["succeeded", "failed"],
      "webhook": "https://hooks.example/rfmvp", "secret_env": "ACME_HOOK_SECRET"},
     {"kinds": ["*"], "statuses": ["failed", "timed_out"], "email": ["ops@example.com"]},
     {"kinds": ["invoice*"], "channel": "log"}]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from dotenv import dotenv_values

from ...config import _lookup
from ...errors import ConfigError

if TYPE_CHECKING:
    from ...models import Robot
    from .channels import NotificationChannel

__all__ = ["ENV_VARIABLES", "NotifyConfig", "Subscription", "load_from_env"]

#: variables this plugin reads (listed in ``config._NOT_SETTINGS``)
ENV_VARIABLES = (
    "NOTIFY_SUBSCRIPTIONS", "NOTIFY_MAX_ATTEMPTS", "NOTIFY_RETRY_BASE_SECONDS",
    "NOTIFY_RETRY_CAP_SECONDS", "NOTIFY_TIMEOUT", "NOTIFY_CONCURRENCY", "NOTIFY_QUEUE_SIZE",
    "NOTIFY_LOG_SIZE", "NOTIFY_SHUTDOWN_GRACE_SECONDS", "NOTIFY_MAX_RESULT_BYTES",
    "NOTIFY_SMTP_HOST", "NOTIFY_SMTP_PORT", "NOTIFY_SMTP_USERNAME", "NOTIFY_SMTP_PASSWORD",
    "NOTIFY_SMTP_SECURITY", "NOTIFY_SMTP_FROM",
)

TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")
#: ``queued`` is notified when a robot is created; terminal statuses when it ends
NOTIFIABLE = ("queued", *TERMINAL)


def _statuses(value: Sequence[str]) -> tuple[str, ...]:
    statuses = tuple(str(s) for s in value)
    bad = [s for s in statuses if s not in NOTIFIABLE]
    if bad or not statuses:
        raise ConfigError(f"a subscription's statuses must be some of {', '.join(NOTIFIABLE)}"
                          f"; got {bad or 'none'}")
    return statuses


def _kinds(value: Sequence[str]) -> tuple[str, ...]:
    kinds = tuple(value)
    if not kinds or not all(isinstance(k, str) and k for k in kinds):
        raise ConfigError("a subscription's kinds must be a non-empty list of kind patterns "
                          "(e.g. [\"ocr*\"])")
    return kinds


@attrs.frozen
class Subscription:
    """Send robots of these ``kinds`` that reach one of these ``statuses`` to ``channel``.

    ``channel`` is a channel object, or the name of one (``"log"``, or a channel from the
    ``notification_channels`` hook). ``kinds`` are shell-style patterns (``ocr*``).
    """

    channel: NotificationChannel | str
    kinds: tuple[str, ...] = attrs.field(default=("*",), converter=_kinds)
    statuses: tuple[str, ...] = attrs.field(default=TERMINAL, converter=_statuses)
    name: str = ""
    include_result: bool = True

    @property
    def channel_name(self) -> str:
        return self.channel if isinstance(self.channel, str) else self.channel.name

    def matches(self, robot: Robot) -> bool:
        return str(robot.status) in self.statuses and any(
            fnmatchcase(robot.kind, pattern) for pattern in self.kinds)


@attrs.frozen
class NotifyConfig:
    """How deliveries are made: attempts, backoff (full jitter), timeouts and bounds."""

    max_attempts: int = 5
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 60.0
    timeout: float = 10.0
    concurrency: int = 8
    queue_size: int = 10_000
    log_size: int = 1000
    shutdown_grace_seconds: float = 5.0
    max_result_bytes: int = 16 * 1024

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(NotifyConfig):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not value > 0 or not math.isfinite(value):
                raise ConfigError(f"RFMVP_NOTIFY_{field.name.upper()} has a bad value; "
                                  "expected a number above 0")


def _environ(environ: Mapping[str, str] | None, env_file: str | os.PathLike[str] | None
             ) -> dict[str, str]:
    values: dict[str, str] = {}
    if environ is not None:
        values.update(environ)
        return values
    if env_file is not None and Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ)
    return values


def _number(kind: type[int] | type[float], name: str, form: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text.strip())
        except ValueError:
            raise ConfigError(f"{name} has a bad value; expected {form}") from None
        return value

    return parse


_KEYS = {"name", "kinds", "statuses", "webhook", "secret", "secret_env", "email", "channel",
         "include_result", "headers"}


def load_from_env(environ: Mapping[str, str] | None = None,
                  env_file: str | os.PathLike[str] | None = ".env"
                  ) -> tuple[NotifyConfig, list[Subscription]]:
    """The delivery settings and subscriptions that ``RFMVP_NOTIFY_*`` describe."""
    from .webhook import WebhookChannel

    values = _environ(environ, env_file)
    numbers = {
        "max_attempts": int, "retry_base_seconds": float, "retry_cap_seconds": float,
        "timeout": float, "concurrency": int, "queue_size": int, "log_size": int,
        "shutdown_grace_seconds": float, "max_result_bytes": int,
    }
    kwargs: dict[str, Any] = {}
    for field, kind in numbers.items():
        name = f"RFMVP_NOTIFY_{field.upper()}"
        raw = _lookup(values, name)
        if raw is not None:
            form = "a whole number above 0" if kind is int else "a number above 0"
            kwargs[field] = _number(kind, name, form)(raw)
    config = NotifyConfig(**kwargs)

    raw = _lookup(values, "RFMVP_NOTIFY_SUBSCRIPTIONS")
    if raw is None or not raw.strip():
        return config, []
    try:
        items = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"RFMVP_NOTIFY_SUBSCRIPTIONS is not valid JSON ({exc.msg} at "
                          f"character {exc.pos})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError("RFMVP_NOTIFY_SUBSCRIPTIONS must be a JSON list of objects")

    subscriptions: list[Subscription] = []
    for index, item in enumerate(items):
        where = f"RFMVP_NOTIFY_SUBSCRIPTIONS[{index}]"
        unknown = sorted(set(item) - _KEYS)
        if unknown:
            raise ConfigError(f"{where} has unknown keys {unknown}; expected some of "
                              f"{sorted(_KEYS)}")
        targets = [key for key in ("webhook", "email", "channel") if key in item]
        if len(targets) != 1:
            raise ConfigError(f"{where} needs exactly one of webhook, email or channel")
        name = str(item.get("name") or f"{index}")
        channel: NotificationChannel | str
        try:
            if "webhook" in item:
                channel = WebhookChannel(str(item["webhook"]), _secret(values, item, where),
                                         name=f"webhook:{name}", timeout=config.timeout,
                                         headers=_headers(item.get("headers"), where))
            elif "email" in item:
                recipients = item["email"]
                if isinstance(recipients, str):
                    recipients = [recipients]
                channel = _smtp(values, recipients, f"email:{name}", config.timeout)
            else:
                channel = str(item["channel"])
            subscriptions.append(Subscription(
                channel=channel,
                kinds=tuple(item.get("kinds", ("*",))),
                statuses=tuple(item.get("statuses", TERMINAL)),
                name=name,
                include_result=bool(item.get("include_result", True)),
            ))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
    return config, subscriptions


def _secret(values: Mapping[str, str], item: Mapping[str, Any], where: str) -> str:
    if "secret_env" in item:
        secret = _lookup(values, str(item["secret_env"]))
        if not secret:
            raise ConfigError(f"{where}.secret_env names {item['secret_env']!r}, which is "
                              "not set (nor its _FILE)")
        return secret
    secret = item.get("secret")
    if not isinstance(secret, str) or not secret:
        raise ConfigError(f"{where}: a webhook needs secret_env (a variable holding the "
                          "signing secret) or secret")
    return secret


def _headers(value: object, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{where}.headers must be an object of strings")
    return dict(value)


def _smtp(values: Mapping[str, str], recipients: Sequence[str], name: str, timeout: float
          ) -> NotificationChannel:
    from .smtp import SmtpChannel

    port = _lookup(values, "RFMVP_NOTIFY_SMTP_PORT")
    security = (_lookup(values, "RFMVP_NOTIFY_SMTP_SECURITY") or "starttls").strip().lower()
    return SmtpChannel(
        (_lookup(values, "RFMVP_NOTIFY_SMTP_HOST") or "").strip(),
        _number(int, "RFMVP_NOTIFY_SMTP_PORT", "a port number")(port) if port else
        {"tls": 465, "none": 25}.get(security, 587),
        sender=(_lookup(values, "RFMVP_NOTIFY_SMTP_FROM") or "").strip(),
        recipients=[str(r) for r in recipients],
        username=_lookup(values, "RFMVP_NOTIFY_SMTP_USERNAME") or None,
        password=_lookup(values, "RFMVP_NOTIFY_SMTP_PASSWORD") or None,
        security=security, timeout=timeout, name=name,
    )
