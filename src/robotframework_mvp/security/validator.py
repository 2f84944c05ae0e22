"""SecurityValidator: step 1 of every request (``security.validate``).

Authenticate the credential through the ``authenticate`` hook, slow down clients whose
credentials keep failing, enforce the principal's rate limit and the scope the action
needs, then sanitize what is submitted. Every refusal is audited by the caller with the
error's type; no credential ever reaches a log, an error or an audit record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import attrs

from ..chains import parse_followup
from ..errors import (
    AuthenticationError,
    PermissionDeniedError,
    RateLimitedError,
    RobotFrameworkError,
    ValidationError,
)
from ..hookspecs import hookimpl
from ..models import FollowUp, Principal, utcnow
from ..plugins import call_first_result
from .audit import AuditLog
from .auth import MalformedCredential, StaticKeyBackend, check_credential
from .keys import StoredKeyBackend
from .ratelimit import RATE_DECISION, RateLimiter
from .sanitize import (
    PayloadLimits,
    sanitize_payload,
    validate_delay,
    validate_idempotency_key,
    validate_kind,
    validate_priority,
    validate_run_at,
)
from .schemas import ModuleSchemaPlugin, PayloadSchemas

if TYPE_CHECKING:
    from ..orchestrator import Orchestrator

__all__ = ["RequestInfo", "SanitizedRequest", "SecurityValidator", "SubmitRequest"]


@attrs.frozen
class RequestInfo:
    """Where a request came from, for rate limits and the audit trail."""

    client: str | None
    request_id: str


@attrs.frozen
class SubmitRequest:
    """One robot to create: what ``submit_many`` takes.

    ``delay`` (seconds) or ``run_at`` (an aware datetime; not both) hold the robot back;
    ``on_success`` / ``on_failure`` (``{"kind", "payload"}``) create a follow-up robot
    when it ends (see ``robotframework_mvp.chains``).
    """

    kind: str
    payload: Mapping[str, Any]
    priority: int = 0
    idempotency_key: str | None = None
    delay: float | None = None
    run_at: datetime | str | None = None
    on_success: Mapping[str, Any] | FollowUp | None = None
    on_failure: Mapping[str, Any] | FollowUp | None = None


@attrs.frozen
class SanitizedRequest:
    """A SubmitRequest that passed every check, with its normalized payload."""

    kind: str
    payload: dict[str, Any]
    priority: int
    idempotency_key: str | None
    delay: float | None
    #: when the robot may run (UTC), from ``run_at`` or ``delay``; None means now
    run_at: datetime | None = None
    on_success: FollowUp | None = None
    on_failure: FollowUp | None = None


class _StaticAuthPlugin:
    """The static-key backend on the ``authenticate`` hook (a built-in plugin)."""

    def __init__(self, backend: StaticKeyBackend) -> None:
        self.backend = backend

    @hookimpl(trylast=True)
    def authenticate(self, credential: str, orchestrator: Orchestrator) -> Principal | None:
        return self.backend.authenticate(credential)


class _StoredAuthPlugin:
    """Stored keys (``rfmvp keys``) on the ``authenticate`` hook (a built-in plugin)."""

    def __init__(self, backend: StoredKeyBackend) -> None:
        self.backend = backend

    @hookimpl(trylast=True)
    def authenticate(self, credential: str, orchestrator: Orchestrator) -> Any:
        # Plain def: only a credential shaped like a stored key costs a store read.
        if not credential.startswith("rfmvp_"):
            return None
        return self.backend.authenticate(credential)


class SecurityValidator:
    def __init__(self, orchestrator: Orchestrator, audit: AuditLog) -> None:
        self.orchestrator = orchestrator
        self.settings = orchestrator.settings.security
        self.audit = audit
        self.limits = PayloadLimits.from_config(self.settings)
        self.limiter = RateLimiter(orchestrator.cache, self.settings.rate_limit_fallback)
        self.stored_keys = StoredKeyBackend(
            orchestrator.driver, self.settings.secret_key, self.settings.api_key_touch_interval)
        self.static_keys = StaticKeyBackend(
            self.settings.api_keys, secret_key=self.settings.secret_key,
            admin_principals=self.settings.admin_principals,
        )
        # Registered last, so asked first: the static keys cost no store read.
        orchestrator.pm.register(_StoredAuthPlugin(self.stored_keys), name="rfmvp.stored_keys")
        orchestrator.pm.register(_StaticAuthPlugin(self.static_keys), name="rfmvp.static_keys")
        orchestrator.pm.register(ModuleSchemaPlugin(orchestrator.modules),
                                 name="rfmvp.module_schemas")
        self.schemas = PayloadSchemas(
            lambda kind: orchestrator.pm.hook.payload_schema(kind=kind))
        self.tracker = orchestrator.tracker

    async def run(self) -> None:
        """Background work of the security layer (stored keys' last-used times)."""
        await self.stored_keys.run()

    async def authorize(self, api_key: str | None, info: RequestInfo, *, scope: str) -> Principal:
        """Authenticate, rate-limit and check ``scope`` (the whole ``security.validate``)."""
        with self.tracker.measure("security.validate"):
            return await self._authorize(api_key, info, scope)

    async def validate_submission(
        self, api_key: str | None, info: RequestInfo, requests: Sequence[SubmitRequest]
    ) -> tuple[Principal, list[SanitizedRequest]]:
        """``authorize`` plus sanitizing every robot, timed as one ``security.validate``."""
        with self.tracker.measure("security.validate"):
            principal = await self._authorize(api_key, info, "robots:write")
            try:
                return principal, await self._sanitize(requests, principal)
            except RobotFrameworkError as exc:
                exc.principal_id = principal.id
                raise

    async def _authorize(self, api_key: str | None, info: RequestInfo, scope: str) -> Principal:
        principal = await self._authenticate(api_key, info)
        # A stored key with a limit of its own counts on its own, against that limit.
        limit = principal.rate_limit or self.settings.rate_limit
        bucket = (f"key:{principal.key_prefix}" if principal.rate_limit is not None
                  else f"principal:{principal.id}")
        if limit is not None:
            decision = await self.limiter.check(bucket, limit)
            RATE_DECISION.set(decision)
            if decision is not None and not decision.allowed:
                error = RateLimitedError(
                    f"rate limit of {limit} exceeded; retry in {decision.retry_after:.2f} s",
                    retry_after=decision.retry_after, limit=limit.count,
                    reset_after=decision.reset_after,
                )
                error.principal_id = principal.id
                raise error
        if scope not in principal.scopes and not principal.is_admin:
            denied = PermissionDeniedError(f"this key lacks the {scope!r} scope")
            denied.principal_id = principal.id
            raise denied
        return principal

    async def _authenticate(self, api_key: str | None, info: RequestInfo) -> Principal:
        if api_key is None:
            raise AuthenticationError(
                "an API key is required: send it as X-API-Key or Authorization: Bearer"
            )
        try:
            if isinstance(api_key, MalformedCredential):
                raise AuthenticationError(api_key.reason)
            principal = await call_first_result(
                self.orchestrator.pm.hook.authenticate,
                credential=check_credential(api_key), orchestrator=self.orchestrator,
            )
            if principal is None:
                raise AuthenticationError("the API key is not valid")
        except AuthenticationError:
            await self._count_failure(info)
            raise
        if not isinstance(principal, Principal):
            raise TypeError("an authenticate hook must return a Principal or None")
        return principal

    async def _count_failure(self, info: RequestInfo) -> None:
        """Failed authentications are limited per client address (slows key guessing)."""
        limit = self.settings.auth_failure_limit
        if limit is None:
            return
        decision = await self.limiter.check(f"authfail:{info.client or 'unknown'}", limit)
        if decision is not None and not decision.allowed:
            raise RateLimitedError(
                "too many failed authentications from this address; retry in "
                f"{decision.retry_after:.0f} s",
                retry_after=decision.retry_after, limit=limit.count,
                reset_after=decision.reset_after,
            )

    async def _sanitize(
        self, requests: Sequence[SubmitRequest], principal: Principal
    ) -> list[SanitizedRequest]:
        if not requests:
            raise ValidationError("submit at least one robot", path="$.robots")
        orch = self.orchestrator
        known = orch.balancer.known_kinds()
        unknown = any(isinstance(r.kind, str) and r.kind not in known for r in requests)
        if unknown or orch.balancer.remote_stale:
            # A kind we do not know yet may have been registered by another process since
            # the last reload began.
            await orch.refresh_modules(fresh=unknown)
            known = orch.balancer.known_kinds()
        hook = orch.pm.hook.validate_robot
        check_hook = bool(hook.get_hookimpls())
        sanitized = []
        for i, request in enumerate(requests):
            try:
                kind = validate_kind(request.kind, known)
                payload = sanitize_payload(request.payload, self.limits)
                self.schemas.validate(kind, payload)
                delay = validate_delay(request.delay)
                now = utcnow()
                run_at = validate_run_at(request.run_at, now)
                if run_at is not None and delay is not None:
                    raise ValidationError("give run_at or delay, not both", path="$.run_at")
                if delay:
                    run_at = now + timedelta(seconds=delay)
                item = SanitizedRequest(
                    kind=kind, payload=payload, priority=validate_priority(request.priority),
                    idempotency_key=validate_idempotency_key(request.idempotency_key),
                    delay=delay, run_at=run_at,
                    on_success=parse_followup(request.on_success, known, self.limits,
                                              path="$.on_success"),
                    on_failure=parse_followup(request.on_failure, known, self.limits,
                                              path="$.on_failure"),
                )
                if check_hook:
                    refusal = await call_first_result(
                        hook, kind=kind, payload=payload, principal=principal)
                    if refusal is not None:
                        raise ValidationError(str(refusal), path="$.payload")
            except RobotFrameworkError as exc:
                if len(requests) > 1:
                    _prefix_path(exc, f"$.robots[{i}]")
                raise
            sanitized.append(item)
        return sanitized

    def audit_refusal(
        self, action: str, principal: Principal | None, target: str | None, info: RequestInfo,
        exc: RobotFrameworkError,
    ) -> None:
        self.audit.record(
            action=action, outcome=f"refused:{exc.type}",
            principal=exc.principal_id if principal is None else principal.id, target=target,
            client=info.client, request_id=info.request_id, details={"status": exc.status},
        )


def _prefix_path(exc: RobotFrameworkError, prefix: str) -> None:
    """Point a batch item's error at its place in the batch (``$.robots[3].payload``)."""
    if not isinstance(exc, ValidationError) or exc.path is None:
        return
    path = prefix + exc.path[1:] if exc.path.startswith("$") else exc.path
    exc.path = path
    exc.details["path"] = path
