"""The HTTP contract, framework-free: request bytes and headers in, status and JSON out.

``HttpApi`` implements every route of DESIGN section 9 once, so the FastAPI and
Starlette adapters in ``examples/`` only map routes to these methods and responses to
their framework's types. Errors become ``{"error": {"type", "message"}}`` with the
status and headers the error calls for; nothing else (no stack trace, no key) leaves.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from .errors import PayloadTooLargeError, RobotFrameworkError, ValidationError
from .models import Robot, json_bytes, new_id
from .security.auth import request_credential
from .security.ratelimit import RATE_DECISION
from .security.sanitize import parse_json_body, validate_delay, validate_wait
from .security.validator import SubmitRequest

if TYPE_CHECKING:
    from .orchestrator import Orchestrator

__all__ = ["API_PREFIX", "HttpApi", "HttpResponse", "read_body"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
_SUBMIT_FIELDS = frozenset({"kind", "payload", "priority", "idempotency_key", "wait", "delay",
                            "run_at", "on_success", "on_failure"})
_SCHEDULE_FIELDS = frozenset({"kind", "payload", "cron", "timezone", "misfire_policy",
                              "misfire_limit", "priority", "paused"})
_BATCH_FIELDS = frozenset({"robots"})
_MAX_BATCH = 1000


@attrs.frozen
class HttpResponse:
    status: int
    body: Any
    headers: Mapping[str, str] = attrs.field(factory=dict)
    media_type: str = "application/json"

    def body_bytes(self) -> bytes:
        if self.media_type == "application/json":
            return json_bytes(self.body)
        return str(self.body).encode()


async def read_body(
    chunks: AsyncIterable[bytes], headers: Mapping[str, str], limit: int
) -> bytes:
    """Read a request body, refusing (413) before buffering more than ``limit`` bytes."""
    declared = {k.lower(): v for k, v in headers.items()}.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() \
            and (len(declared) > 18 or int(declared) > limit):
        raise PayloadTooLargeError(
            f"request body is {declared[:20]} bytes; the limit is {limit}"
        )
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


def error_response(exc: RobotFrameworkError) -> HttpResponse:
    return HttpResponse(exc.status, exc.to_dict(), exc.headers())


def _robot(robot: Robot) -> dict[str, Any]:
    return robot.to_dict()


class HttpApi:
    """Every route of the HTTP contract as a method returning an ``HttpResponse``."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orch = orchestrator

    @property
    def max_body_bytes(self) -> int:
        # Room for the envelope around a payload of the configured size.
        return self.orch.settings.security.max_payload_bytes + 4096

    async def _run(self, coro: Any) -> HttpResponse:
        """Run a handler; errors become responses, and the caller's rate-limit state
        becomes ``RateLimit-Limit/Remaining/Reset`` headers on whatever is answered."""
        token = RATE_DECISION.set(None)
        try:
            response = await self._respond(coro)
            decision = RATE_DECISION.get()
        finally:
            RATE_DECISION.reset(token)
        if decision is None or "RateLimit-Limit" in response.headers:
            return response
        return attrs.evolve(response, headers={
            **response.headers,
            "RateLimit-Limit": str(decision.limit),
            "RateLimit-Remaining": str(decision.remaining),
            "RateLimit-Reset": str(max(0, int(-(-decision.reset_after // 1)))),
        })

    async def _respond(self, coro: Any) -> HttpResponse:
        try:
            result: HttpResponse = await coro
            return result
        except RobotFrameworkError as exc:
            return error_response(exc)
        except Exception:
            request_id = new_id()
            log.exception("unhandled error in an HTTP handler (request %s)", request_id)
            return HttpResponse(500, {"error": {"type": "internal_error",
                                                "message": "internal error",
                                                "request_id": request_id}})

    # -- robots ------------------------------------------------------------------------

    async def submit_robot(self, body: bytes, headers: Mapping[str, str],
                           client: str | None) -> HttpResponse:
        return await self._run(self._submit_robot(body, headers, client))

    async def _submit_robot(self, body: bytes, headers: Mapping[str, str],
                            client: str | None) -> HttpResponse:
        api_key = request_credential(headers)
        limits = self.orch.security.limits
        data = parse_json_body(body, limits)
        _check_fields(data, _SUBMIT_FIELDS)
        if "payload" not in data:
            raise ValidationError("payload is required (a JSON object)", path="$.payload")
        wait = validate_wait(data.get("wait"), self.orch.settings.security.max_wait_seconds)
        delay = validate_delay(data.get("delay"))
        robot = (await self.orch.submit_many(
            [SubmitRequest(kind=data.get("kind"),  # type: ignore[arg-type]  # validated inside
                           payload=data["payload"], priority=data.get("priority", 0),
                           idempotency_key=data.get("idempotency_key"), delay=delay,
                           run_at=data.get("run_at"), on_success=data.get("on_success"),
                           on_failure=data.get("on_failure"))],
            api_key=api_key, client=client, request_id=_request_id(headers),
        ))[0]
        if wait:
            robot = await self.orch._wait_until_terminal(robot, wait)
        return HttpResponse(200 if wait and robot.is_terminal else 202, _robot(robot))

    async def submit_batch(self, body: bytes, headers: Mapping[str, str],
                           client: str | None) -> HttpResponse:
        return await self._run(self._submit_batch(body, headers, client))

    async def _submit_batch(self, body: bytes, headers: Mapping[str, str],
                            client: str | None) -> HttpResponse:
        api_key = request_credential(headers)
        data = parse_json_body(body, self.orch.security.limits)
        _check_fields(data, _BATCH_FIELDS)
        items = data.get("robots")
        if not isinstance(items, list) or not 1 <= len(items) <= _MAX_BATCH:
            raise ValidationError(f"robots must be a list of 1 to {_MAX_BATCH} robots",
                                  path="$.robots")
        requests = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValidationError("each robot must be a JSON object", path=f"$.robots[{i}]")
            _check_fields(item, _SUBMIT_FIELDS - {"wait"}, prefix=f"$.robots[{i}]")
            delay = validate_delay(item.get("delay"))
            requests.append(SubmitRequest(
                kind=item.get("kind"), payload=item.get("payload"),  # type: ignore[arg-type]
                priority=item.get("priority", 0), idempotency_key=item.get("idempotency_key"),
                delay=delay, run_at=item.get("run_at"), on_success=item.get("on_success"),
                on_failure=item.get("on_failure"),
            ))
        robots = await self.orch.submit_many(requests, api_key=api_key, client=client,
                                             request_id=_request_id(headers))
        return HttpResponse(202, {"items": [_robot(r) for r in robots]})

    async def get_robot(self, robot_id: str, headers: Mapping[str, str],
                        client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            robot = await self.orch.get(robot_id, api_key=request_credential(headers),
                                        client=client, request_id=_request_id(headers))
            return HttpResponse(200, _robot(robot))

        return await self._run(run())

    async def list_robots(self, query: Mapping[str, str], headers: Mapping[str, str],
                          client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            unknown = set(query) - {"status", "kind", "limit", "cursor", "order"}
            if unknown:
                raise ValidationError(
                    f"unknown query parameter {sorted(unknown)[0][:64]!r}; use status, kind, "
                    "limit, cursor, order", path=f"$.{sorted(unknown)[0][:64]}")
            limit_text = query.get("limit", "50")
            if not (limit_text.isascii() and limit_text.isdigit()) or len(limit_text) > 9:
                raise ValidationError("limit must be a whole number from 1 to 500",
                                      path="$.limit")
            page = await self.orch.list(
                api_key=request_credential(headers), status=query.get("status"),
                kind=query.get("kind") or None, limit=int(limit_text),
                cursor=query.get("cursor") or None, client=client,
                request_id=_request_id(headers), order=query.get("order") or "newest",
            )
            return HttpResponse(200, {"items": [_robot(r) for r in page.items],
                                      "next_cursor": page.next_cursor})

        return await self._run(run())

    async def cancel_robot(self, robot_id: str, headers: Mapping[str, str],
                           client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            robot = await self.orch.cancel(robot_id, api_key=request_credential(headers),
                                           client=client, request_id=_request_id(headers))
            return HttpResponse(200, _robot(robot))

        return await self._run(run())

    async def retry_robot(self, robot_id: str, headers: Mapping[str, str],
                          client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            robot = await self.orch.retry(robot_id, api_key=request_credential(headers),
                                          client=client)
            return HttpResponse(202, _robot(robot))

        return await self._run(run())

    async def list_executions(self, robot_id: str, headers: Mapping[str, str],
                              client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            from .models import converter

            executions = await self.orch.executions(
                robot_id, api_key=request_credential(headers), client=client)
            return HttpResponse(200, {"items": converter.unstructure(executions)})

        return await self._run(run())

    async def list_modules(self, headers: Mapping[str, str], client: str | None
                           ) -> HttpResponse:
        async def run() -> HttpResponse:
            rows = await self.orch.module_table(api_key=request_credential(headers),
                                                client=client)
            return HttpResponse(200, {"items": rows})

        return await self._run(run())

    # -- schedules ---------------------------------------------------------------------

    async def add_schedule(self, body: bytes, headers: Mapping[str, str],
                           client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            api_key = request_credential(headers)
            data = parse_json_body(body, self.orch.security.limits)
            _check_fields(data, _SCHEDULE_FIELDS)
            for name in ("kind", "cron"):
                if name not in data:
                    raise ValidationError(f"{name} is required", path=f"$.{name}")
            schedule = await self.orch.add_schedule(
                data["kind"], data.get("payload", {}), cron=data["cron"], api_key=api_key,
                timezone=data.get("timezone", "UTC"),
                misfire_policy=data.get("misfire_policy", "skip"),
                misfire_limit=data.get("misfire_limit", 100),
                priority=data.get("priority", 0), paused=data.get("paused", False),
                client=client, request_id=_request_id(headers))
            return HttpResponse(201, schedule.to_dict())

        return await self._run(run())

    async def list_schedules(self, query: Mapping[str, str], headers: Mapping[str, str],
                             client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            unknown = set(query) - {"limit", "cursor"}
            if unknown:
                name = sorted(unknown)[0][:64]
                raise ValidationError(f"unknown query parameter {name!r}; use limit, cursor",
                                      path=f"$.{name}")
            limit_text = query.get("limit", "50")
            if not (limit_text.isascii() and limit_text.isdigit()) or len(limit_text) > 9:
                raise ValidationError("limit must be a whole number from 1 to 500",
                                      path="$.limit")
            page = await self.orch.list_schedules(
                api_key=request_credential(headers), limit=int(limit_text),
                cursor=query.get("cursor") or None, client=client,
                request_id=_request_id(headers))
            return HttpResponse(200, {"items": [s.to_dict() for s in page.items],
                                      "next_cursor": page.next_cursor})

        return await self._run(run())

    async def get_schedule(self, schedule_id: str, headers: Mapping[str, str],
                           client: str | None) -> HttpResponse:
        return await self._schedule_call("get_schedule", schedule_id, headers, client)

    async def pause_schedule(self, schedule_id: str, headers: Mapping[str, str],
                             client: str | None) -> HttpResponse:
        return await self._schedule_call("pause_schedule", schedule_id, headers, client)

    async def resume_schedule(self, schedule_id: str, headers: Mapping[str, str],
                              client: str | None) -> HttpResponse:
        return await self._schedule_call("resume_schedule", schedule_id, headers, client)

    async def remove_schedule(self, schedule_id: str, headers: Mapping[str, str],
                              client: str | None) -> HttpResponse:
        return await self._schedule_call("remove_schedule", schedule_id, headers, client)

    async def _schedule_call(self, method: str, schedule_id: str, headers: Mapping[str, str],
                             client: str | None) -> HttpResponse:
        async def run() -> HttpResponse:
            schedule = await getattr(self.orch, method)(
                schedule_id, api_key=request_credential(headers), client=client,
                request_id=_request_id(headers))
            return HttpResponse(200, schedule.to_dict())

        return await self._run(run())

    # -- operations --------------------------------------------------------------------

    async def health(self) -> HttpResponse:
        """Liveness: 503 only when the store is down (a degraded cache still serves)."""
        async def run() -> HttpResponse:
            report = await self.orch.health()
            return HttpResponse(200 if report["status"] != "down" else 503, report)

        return await self._run(run())

    async def ready(self) -> HttpResponse:
        """Readiness: 503 while the store is down or no module can take work."""
        async def run() -> HttpResponse:
            report = await self.orch.health()
            ready = report["status"] != "down" and report["components"]["modules"]["known"]
            return HttpResponse(200 if ready else 503, report)

        return await self._run(run())

    async def metrics(self) -> HttpResponse:
        async def run() -> HttpResponse:
            from .metrics import CONTENT_TYPE, render_metrics

            text = await render_metrics(self.orch)
            return HttpResponse(200, text, media_type=CONTENT_TYPE)

        return await self._run(run())

    async def dashboard(self) -> HttpResponse:
        """The dashboard page: static HTML that polls ``/dashboard/data`` (no key needed)."""
        from .dashboard import CONTENT_SECURITY_POLICY, dashboard_page

        return HttpResponse(200, dashboard_page(), {
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
        }, media_type="text/html; charset=utf-8")

    async def dashboard_data(self, headers: Mapping[str, str], client: str | None
                             ) -> HttpResponse:
        """The dashboard's numbers: an admin key sees everything, recent failures too; with
        ``RFMVP_DASHBOARD_PUBLIC=true`` a request without a key gets all but the failures."""
        async def run() -> HttpResponse:
            from .dashboard import dashboard_data
            from .security.validator import RequestInfo

            api_key = request_credential(headers)
            if api_key is None and self.orch.settings.security.dashboard_public:
                include_failures = False
            else:
                # Refusals are audited; a dashboard polls every 2 s, so successes are not.
                info = RequestInfo(client=client, request_id=_request_id(headers) or new_id())
                try:
                    await self.orch.security.authorize(api_key, info, scope="admin")
                except RobotFrameworkError as exc:
                    self.orch.security.audit_refusal("dashboard.data", None, None, info, exc)
                    raise
                include_failures = True
            data = await dashboard_data(self.orch, include_failures=include_failures)
            return HttpResponse(200, data, {"Cache-Control": "no-store"})

        return await self._run(run())

    def not_found(self) -> HttpResponse:
        return HttpResponse(404, {"error": {"type": "not_found", "message": "no such route"}})


def _request_id(headers: Mapping[str, str]) -> str | None:
    """A caller's (or proxy's) ``X-Request-Id``, kept for the audit trail when sane."""
    for name, value in headers.items():
        if name.lower() == "x-request-id":
            value = value.strip()
            if 0 < len(value) <= 128 and value.isprintable() and value.isascii():
                return value
            return None
    return None


def _check_fields(data: Mapping[str, Any], allowed: frozenset[str], prefix: str = "$") -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        name = str(unknown[0])[:64]
        raise ValidationError(
            f"unknown field {name!r}; allowed: {', '.join(sorted(allowed))}",
            path=f"{prefix}.{name}",
        )
