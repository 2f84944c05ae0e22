"""The HTTP contract on FastAPI: a thin adapter over ``robotframework_mvp.http.HttpApi``.

Routes hand raw body bytes and headers to ``HttpApi``, which authenticates, validates and
maps errors; FastAPI adds the OpenAPI schema (``/docs``), described in
``fastapi_schemas.py`` by models that never validate anything themselves.

    uvicorn --app-dir examples --factory fastapi_app:create_app
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route

import fastapi_schemas as docs
import robotframework_mvp
from robotframework_mvp import Module, Orchestrator, PayloadTooLargeError, Settings
from robotframework_mvp.http import API_PREFIX, HttpApi, HttpResponse, error_response, read_body

__all__ = ["create_app"]

Endpoint = Callable[..., Awaitable[Response]]


def to_response(resp: HttpResponse) -> Response:
    return Response(resp.body_bytes(), resp.status, dict(resp.headers), resp.media_type)


def _error(status: int, type_: str, message: str, headers: dict[str, str] | None = None
           ) -> Response:
    body = {"error": {"type": type_, "message": message}}
    return to_response(HttpResponse(status, body, headers or {}))


def _api(request: Request) -> HttpApi:
    api: HttpApi = request.app.state.api
    return api


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _named(name: str, endpoint: Endpoint) -> Endpoint:
    endpoint.__name__ = name
    return endpoint


def _submit(method: str) -> Endpoint:
    """Stream the body (413 past the limit) into ``HttpApi.<method>``."""

    async def endpoint(request: Request) -> Response:
        api = _api(request)
        try:
            body = await read_body(request.stream(), request.headers, api.max_body_bytes)
        except PayloadTooLargeError as exc:
            return to_response(error_response(exc))
        handler = getattr(api, method)
        return to_response(await handler(body, request.headers, _client(request)))

    return _named(method, endpoint)


def _one_robot(method: str) -> Endpoint:
    """``HttpApi.<method>(robot_id, headers, client)``."""

    async def endpoint(request: Request, robot_id: str) -> Response:
        handler = getattr(_api(request), method)
        return to_response(await handler(robot_id, request.headers, _client(request)))

    return _named(method, endpoint)


def _operation(method: str) -> Endpoint:
    """``HttpApi.<method>()``: health, readiness and metrics need no key."""

    async def endpoint(request: Request) -> Response:
        return to_response(await getattr(_api(request), method)())

    return _named(method, endpoint)


async def list_robots(request: Request, status: str | None = None, kind: str | None = None,
                      limit: str = "50", cursor: str | None = None,
                      order: str | None = None) -> Response:
    # Parameters are declared (as text, so FastAPI never refuses one) for the docs only.
    query = dict(request.query_params.multi_items())  # a repeated parameter: the last wins
    return to_response(await _api(request).list_robots(query, request.headers, _client(request)))


def _one_schedule(method: str) -> Endpoint:
    """``HttpApi.<method>(schedule_id, headers, client)``."""

    async def endpoint(request: Request, schedule_id: str) -> Response:
        handler = getattr(_api(request), method)
        return to_response(await handler(schedule_id, request.headers, _client(request)))

    return _named(method, endpoint)


async def list_schedules(request: Request, limit: str = "50", cursor: str | None = None
                         ) -> Response:
    query = dict(request.query_params.multi_items())
    return to_response(await _api(request).list_schedules(query, request.headers,
                                                          _client(request)))


async def list_modules(request: Request) -> Response:
    return to_response(await _api(request).list_modules(request.headers, _client(request)))


async def dashboard_data(request: Request) -> Response:
    return to_response(await _api(request).dashboard_data(request.headers, _client(request)))


async def http_error(request: Request, exc: Exception) -> Response:
    """Router errors (unknown path, wrong method) in the contract's error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allowed = sorted({m for r in request.app.state.routes
                          if r.matches(request.scope)[0] != Match.NONE for m in r.methods})
        return _error(405, "method_not_allowed", f"{request.method} is not allowed here",
                      {"Allow": ", ".join(allowed)})
    if exc.status_code == 404:
        return _error(404, "not_found", "no such route")
    return _error(exc.status_code, "http_error", str(exc.detail))


async def internal_error(request: Request, exc: Exception) -> Response:
    """Anything unexpected: logged by the server, never shown to the client."""
    return _error(500, "internal_error", "internal error")


def create_app(
    settings: Settings | None = None,
    *,
    orchestrator: Orchestrator | None = None,
    modules: Iterable[Module] = (),
    plugins: Iterable[object] = (),
) -> FastAPI:
    """The app. Given ``orchestrator`` (already running) it serves that one; otherwise its
    lifespan runs ``Orchestrator(settings or Settings.from_env(), ...)``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if orchestrator is not None:
            yield
            return
        async with Orchestrator(settings or Settings.from_env(), modules=modules,
                                plugins=plugins) as orch:
            app.state.api = HttpApi(orch)
            yield

    app = FastAPI(title="robotframework-mvp", version=robotframework_mvp.__version__,
                  description="Run automation robots. Send the API key as `X-API-Key` or "
                  "`Authorization: Bearer`.", lifespan=lifespan, redirect_slashes=False,
                  exception_handlers={HTTPException: http_error, Exception: internal_error})
    # The key schemes are declared for OpenAPI only: the core authenticates.
    keys = [Security(APIKeyHeader(name="X-API-Key", auto_error=False)),
            Security(HTTPBearer(auto_error=False))]
    robots = APIRouter(prefix=API_PREFIX, dependencies=keys, responses=docs.ERRORS,
                       tags=["robots"])
    ops = APIRouter(tags=["operations"])
    one = "/robots/{robot_id}"
    for router, method, path, endpoint in [
        (robots, "POST", "/robots", _submit("submit_robot")),
        (robots, "POST", "/robots:batch", _submit("submit_batch")),
        (robots, "GET", "/robots", list_robots),
        (robots, "GET", one, _one_robot("get_robot")),
        (robots, "POST", one + "/cancel", _one_robot("cancel_robot")),
        (robots, "POST", one + "/retry", _one_robot("retry_robot")),
        (robots, "GET", one + "/executions", _one_robot("list_executions")),
        (robots, "GET", "/modules", list_modules),
        (robots, "POST", "/schedules", _submit("add_schedule")),
        (robots, "GET", "/schedules", list_schedules),
        (robots, "GET", "/schedules/{schedule_id}", _one_schedule("get_schedule")),
        (robots, "DELETE", "/schedules/{schedule_id}", _one_schedule("remove_schedule")),
        (robots, "POST", "/schedules/{schedule_id}/pause", _one_schedule("pause_schedule")),
        (robots, "POST", "/schedules/{schedule_id}/resume", _one_schedule("resume_schedule")),
        (ops, "GET", "/health", _operation("health")),
        (ops, "GET", "/health/ready", _operation("ready")),
        (ops, "GET", "/metrics", _operation("metrics")),
        (ops, "GET", "/dashboard", _operation("dashboard")),
        (ops, "GET", "/dashboard/data", dashboard_data),
    ]:
        router.add_api_route(path, endpoint, methods=[method], name=endpoint.__name__,
                             **docs.ROUTES[endpoint.__name__])
    # FastAPI documents every route (OpenAPI, /docs). Those whose endpoint takes only the
    # request (submissions, health, metrics) are served by a plain Starlette route with the
    # same endpoint, ahead of FastAPI's: the core authenticates and validates the request
    # itself, and FastAPI's per-request dependency solving costs a fifth of a submission.
    for route in [*robots.routes, *ops.routes]:
        assert isinstance(route, APIRoute)
        if list(inspect.signature(route.endpoint).parameters) == ["request"]:
            app.router.routes.append(Route(route.path, route.endpoint, methods=route.methods,
                                           name=route.name))
    app.include_router(robots)
    app.include_router(ops)
    app.state.routes = [*robots.routes, *ops.routes]  # for the Allow header of a 405
    docs.install_openapi(app)
    if orchestrator is not None:
        app.state.api = HttpApi(orchestrator)
    return app
