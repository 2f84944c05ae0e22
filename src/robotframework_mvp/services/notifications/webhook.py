"""WebhookChannel: an HTTP POST of the notification as JSON, signed with HMAC-SHA-256.

The signed material is ``<timestamp>.<raw body>``, so a captured request cannot be
replayed later with a new timestamp. Headers:

- ``X-RFMVP-Timestamp``: Unix seconds when this attempt was signed;
- ``X-RFMVP-Signature``: ``sha256=`` and the hex HMAC of ``timestamp + "." + body``
  under the subscription's secret;
- ``X-RFMVP-Delivery``: the notification id, the same on every attempt (deduplicate on it);
- ``X-RFMVP-Event``: ``robot.finished`` or ``robot.created``.

``verify_signature()`` is the receiver's side of the recipe.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

from ...errors import ConfigError
from .channels import DeliveryError, Notification

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WebhookChannel", "sign", "verify_signature"]

SIGNATURE_HEADER = "X-RFMVP-Signature"
TIMESTAMP_HEADER = "X-RFMVP-Timestamp"
DELIVERY_HEADER = "X-RFMVP-Delivery"
EVENT_HEADER = "X-RFMVP-Event"


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """The ``X-RFMVP-Signature`` value: ``sha256=<hex HMAC of timestamp.body>``."""
    digest = hmac.new(_key(secret), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify_signature(secret: str | bytes, body: bytes, timestamp: str | None,
                     signature: str | None, *, tolerance: float = 300.0,
                     now: float | None = None) -> bool:
    """True when ``signature`` signs ``timestamp.body`` and the timestamp is recent.

    Pass the raw request body (before any JSON parsing) and the two headers. ``tolerance``
    seconds bound how old (or how far in the future) a timestamp may be.
    """
    if not timestamp or not signature or not timestamp.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class WebhookChannel:
    """POST each notification to ``url``; 5xx, 408, 429 and network errors are retried."""

    def __init__(self, url: str, secret: str | bytes, *, name: str | None = None,
                 timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("a webhook URL must be http:// or https:// with a host")
        if not secret:
            raise ConfigError("a webhook needs a secret to sign its requests")
        self.url = url
        self.name = name or f"webhook:{parts.hostname}"
        self.timeout = timeout
        self._secret = _key(secret)
        self._headers = dict(headers or {})
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # the secret never shows
        return f"WebhookChannel({self.name!r}, url={self.url!r})"

    async def send(self, notification: Notification) -> None:
        body = json.dumps(notification.to_dict(), separators=(",", ":"),
                          sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {
            **self._headers,
            "Content-Type": "application/json",
            "User-Agent": "robotframework-mvp-notifications",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
            DELIVERY_HEADER: notification.id,
            EVENT_HEADER: notification.event,
        }
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:  # connect, read, write, pool, timeouts
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:300], retryable=True) from None
        status = response.status_code
        if 200 <= status < 300:
            return
        retryable = status >= 500 or status in (408, 429)
        raise DeliveryError(f"HTTP {status}", retryable=retryable,
                            retry_after=_retry_after(response.headers.get("Retry-After")))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None  # an HTTP date is rare for webhooks; the backoff applies
    return float(value.strip())
