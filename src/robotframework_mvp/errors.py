"""One exception hierarchy for the whole framework.

Every error a caller can cause knows the HTTP status it maps to and a stable ``type``
name, so the HTTP adapters translate errors without knowing any of them, and no error
message ever carries a secret (messages are written here, from values we choose to show).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

__all__ = [
    "AuthenticationError",
    "ConfigError",
    "ConflictError",
    "LeaseLostError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermanentError",
    "PermissionDeniedError",
    "RateLimitedError",
    "RobotFrameworkError",
    "ServiceUnavailableError",
    "StoreUnavailableError",
    "ValidationError",
]


class RobotFrameworkError(Exception):
    """Base class: ``status`` is the HTTP status, ``type`` the name clients switch on."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    #: who was refused, once known (set by the security layer for the audit trail)
    principal_id: str | None = None

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` body of the HTTP contract."""
        body: dict[str, Any] = {"type": self.type, "message": self.message}
        body.update(self.details)
        return {"error": body}

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for (e.g. ``Retry-After``)."""
        return {}


class ConfigError(RobotFrameworkError):
    """A setting has a bad value; the message names the variable and the accepted form."""

    type = "config_error"


class AuthenticationError(RobotFrameworkError):
    status = 401
    type = "unauthenticated"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="robotframework-mvp"'}


class PermissionDeniedError(RobotFrameworkError):
    status = 403
    type = "forbidden"


class NotFoundError(RobotFrameworkError):
    status = 404
    type = "not_found"


class ConflictError(RobotFrameworkError):
    status = 409
    type = "conflict"


class PayloadTooLargeError(RobotFrameworkError):
    status = 413
    type = "payload_too_large"


class ValidationError(RobotFrameworkError):
    """Bad input; ``path`` (when given) points at the offending part of the request."""

    status = 422
    type = "validation_error"

    def __init__(self, message: str, *, path: str | None = None, **details: Any) -> None:
        if path is not None:
            details["path"] = path
        super().__init__(message, **details)
        self.path = path


class RateLimitedError(RobotFrameworkError):
    status = 429
    type = "rate_limited"

    def __init__(self, message: str, *, retry_after: float, limit: int, reset_after: float) -> None:
        super().__init__(message, retry_after=round(retry_after, 3))
        self.retry_after = retry_after
        self.limit = limit
        self.reset_after = reset_after

    def headers(self) -> dict[str, str]:
        return {
            "Retry-After": str(max(1, int(-(-self.retry_after // 1)))),
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(max(1, int(-(-self.reset_after // 1)))),
        }


class ServiceUnavailableError(RobotFrameworkError):
    status = 503
    type = "service_unavailable"


class StoreUnavailableError(ServiceUnavailableError):
    """The store cannot be reached right now: nothing was written; retry after a moment."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=round(retry_after, 3))
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class PermanentError(RobotFrameworkError):
    """Raise from a module to fail the robot now, without retrying (e.g. bad input)."""

    type = "permanent_error"


class LeaseLostError(RobotFrameworkError):
    """A worker's lease on a robot is gone: another worker or a cancel took it over."""

    type = "lease_lost"
