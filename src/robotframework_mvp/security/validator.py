"""SecurityValidator: step 1 of every request (``security.validate``).

Authenticate the credential through the ``authenticate`` hook, slow down clients whose
credentials keep failing, enforce the principal's rate limit and the scope the action
needs, then sanitize what is submitted. Every refusal is audited by the caller with the
error's type; no credential ever reaches a log, an error or an audit record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import (
    AuthenticationError,
    PermissionDeniedError,
    RateLimitedError,
    RobotFrameworkError,
    ValidationError,
)
from ..hookspecs import hookimpl
from ..models import Principal, Robot, RobotStatus, new_id, utcnow
from ..plugins import await_me_maybe
from .audit import AuditLog
from .auth import StaticKeyBackend
from .ratelimit import RateLimiter
from .sanitize import (
    PayloadLimits,
    sanitize_payload,
    validate_idempotency_key,
    validate_kind,
    validate_priority,
)

if TYPE_CHECKING:
    from ..orchestrator import Orchestrator

__all__ = ["RequestInfo", "SecurityValidator", "SubmitRequest"]


@attrs.frozen
class RequestInfo:
    """Where a request came from, for rate limits and the audit trail."""

    client: str | None
    request_id: str


@attrs.frozen
class SubmitRequest:
    """One robot to create: what ``submit_many`` takes."""

    kind: str
    payload: Mapping[str, Any]
    priority: int = 0
    idempotency_key: str | None = None
    delay: float | None = None


class _StaticAuthPlugin:
    """The static-key backend on the ``authenticate`` hook (a built-in plugin)."""

    def __init__(self, backend: StaticKeyBackend) -> None:
        self.backend = backend

    @hookimpl(trylast=True)
    def authenticate(self, credential: str, orchestrator: Orchestrator) -> Principal | None:
        return self.backend.authenticate(credential)


class SecurityValidator:
    def __init__(self, orchestrator: Orchestrator, audit: AuditLog) -> None:
        self.orchestrator = orchestrator
        self.settings = orchestrator.settings.security
        self.audit = audit
        self.limits = PayloadLimits.from_config(self.settings)
        self.limiter = RateLimiter(orchestrator.cache)
        self.static_keys = StaticKeyBackend(
            self.settings.api_keys, secret_key=self.settings.secret_key,
            admin_principals=self.settings.admin_principals,
        )
        orchestrator.pm.register(_StaticAuthPlugin(self.static_keys), name="rfmvp.static_keys")
        self.tracker = orchestrator.tracker

    async def authorize(self, api_key: str | None, info: RequestInfo, *, scope: str) -> Principal:
        """Authenticate, rate-limit and check ``scope``; raise the right error otherwise."""
        with self.tracker.measure("security.validate"):
            principal = await self._authenticate(api_key, info)
            limit = self.settings.rate_limit
            if limit is not None:
                decision = await self.limiter.check(f"principal:{principal.id}", limit)
                if not decision.allowed:
                    raise RateLimitedError(
                        f"rate limit of {limit} exceeded; retry in {decision.retry_after:.2f} s",
                        retry_after=decision.retry_after, limit=limit.count,
                        reset_after=decision.reset_after,
                    )
            if scope not in principal.scopes and not principal.is_admin:
                raise PermissionDeniedError(f"this key lacks the {scope!r} scope")
            return principal

    async def _authenticate(self, api_key: str | None, info: RequestInfo) -> Principal:
        failure_limit = self.settings.auth_failure_limit
        client_key = f"authfail:{info.client or 'unknown'}"
        if api_key is None:
            raise AuthenticationError(
                "an API key is required: send it as X-API-Key or Authorization: Bearer"
            )
        outcome = self.orchestrator.pm.hook.authenticate(
            credential=api_key, orchestrator=self.orchestrator
        )
        principal = await await_me_maybe(outcome)
        if principal is None:
            if failure_limit is not None:
                decision = await self.limiter.check(client_key, failure_limit)
                if not decision.allowed:
                    raise RateLimitedError(
                        "too many failed authentications from this address; retry in "
                        f"{decision.retry_after:.0f} s",
                        retry_after=decision.retry_after, limit=failure_limit.count,
                        reset_after=decision.reset_after,
                    )
            raise AuthenticationError("the API key is not valid")
        if not isinstance(principal, Principal):
            raise TypeError("an authenticate hook must return a Principal or None")
        return principal

    async def build_robots(
        self, requests: Sequence[SubmitRequest], principal: Principal
    ) -> list[Robot]:
        """Sanitize every request and turn it into a queued robot with its module."""
        if not requests:
            raise ValidationError("submit at least one robot", path="$.robots")
        orch = self.orchestrator
        if orch.balancer.remote_stale:
            await orch.refresh_modules()
        known = orch.balancer.known_kinds()
        robots = []
        now = utcnow()
        with self.tracker.measure("security.validate"):
            prepared = []
            for i, request in enumerate(requests):
                prefix = "$" if len(requests) == 1 else f"$.robots[{i}]"
                try:
                    kind = validate_kind(request.kind, known)
                    payload = sanitize_payload(request.payload, self.limits)
                    priority = validate_priority(request.priority)
                    idem = validate_idempotency_key(request.idempotency_key)
                    refusal = await await_me_maybe(orch.pm.hook.validate_robot(
                        kind=kind, payload=payload, principal=principal))
                    if refusal is not None:
                        raise ValidationError(str(refusal), path="$.payload")
                except RobotFrameworkError as exc:
                    _prefix_path(exc, prefix)
                    raise
                prepared.append((kind, payload, priority, idem, request.delay))
        for kind, payload, priority, idem, delay in prepared:
            module_name = orch.balancer.select(kind)
            module = orch.modules.get(module_name)
            max_attempts = (
                module.max_attempts if module is not None and module.max_attempts
                else orch.settings.resilience.default_max_attempts
            )
            robots.append(Robot(
                id=new_id(), kind=kind, payload=payload, owner=principal.id,
                tenant=principal.tenant, status=RobotStatus.QUEUED, module=module_name,
                max_attempts=max_attempts, priority=priority, idempotency_key=idem,
                created_at=now, updated_at=now,
                scheduled_at=now if not delay else now + timedelta(seconds=delay),
            ))
        return robots

    def audit_refusal(
        self, action: str, principal: Principal | None, target: str | None, info: RequestInfo,
        exc: RobotFrameworkError,
    ) -> None:
        self.audit.record(
            action=action, outcome=f"refused:{exc.type}",
            principal=None if principal is None else principal.id, target=target,
            client=info.client, request_id=info.request_id, details={"status": exc.status},
        )


def _prefix_path(exc: RobotFrameworkError, prefix: str) -> None:
    """Point a batch item's error at its place in the batch (``$.robots[3].payload``)."""
    if prefix == "$" or not isinstance(exc, ValidationError) or exc.path is None:
        return
    path = prefix + exc.path[1:] if exc.path.startswith("$") else exc.path
    exc.path = path
    exc.details["path"] = path
