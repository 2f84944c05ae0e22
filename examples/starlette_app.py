"""The HTTP contract on Starlette: a thin adapter over ``robotframework_mvp.http.HttpApi``.

Every route hands raw body bytes and headers to ``HttpApi``, which authenticates,
validates and maps errors; this file only moves bytes, headers and statuses between
Starlette and the core.

    uvicorn --app-dir examples --factory starlette_app:create_app
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from robotframework_mvp import Module, Orchestrator, PayloadTooLargeError, Settings
from robotframework_mvp.http import API_PREFIX, HttpApi, HttpResponse, error_response, read_body

__all__ = ["create_app"]

Endpoint = Callable[[Request], Awaitable[Response]]


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

    return endpoint


def _one_robot(method: str) -> Endpoint:
    """``HttpApi.<method>(robot_id, headers, client)``."""

    async def endpoint(request: Request) -> Response:
        handler = getattr(_api(request), method)
        return to_response(await handler(request.path_params["robot_id"], request.headers,
                                         _client(request)))

    return endpoint


def _one_schedule(method: str) -> Endpoint:
    """``HttpApi.<method>(schedule_id, headers, client)``."""

    async def endpoint(request: Request) -> Response:
        handler = getattr(_api(request), method)
        return to_response(await handler(request.path_params["schedule_id"], request.headers,
                                         _client(request)))

    return endpoint


def _operation(method: str) -> Endpoint:
    """``HttpApi.<method>()``: health, readiness and metrics need no key."""

    async def endpoint(request: Request) -> Response:
        return to_response(await getattr(_api(request), method)())

    return endpoint


_submit_robot = _submit("submit_robot")


async def robots(request: Request) -> Response:
    """``POST`` submits a robot, ``GET`` lists them (one route, so a 405 names both)."""
    if request.method == "POST":
        return await _submit_robot(request)
    query = dict(request.query_params.multi_items())  # a repeated parameter: the last wins
    return to_response(await _api(request).list_robots(query, request.headers, _client(request)))


_add_schedule = _submit("add_schedule")


async def schedules(request: Request) -> Response:
    """``POST`` creates a schedule, ``GET`` lists them."""
    if request.method == "POST":
        return await _add_schedule(request)
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
        return _error(405, "method_not_allowed", f"{request.method} is not allowed here",
                      dict(exc.headers or {}))
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
) -> Starlette:
    """The app. Given ``orchestrator`` (already running) it serves that one; otherwise its
    lifespan runs ``Orchestrator(settings or Settings.from_env(), ...)``."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if orchestrator is not None:
            yield
            return
        async with Orchestrator(settings or Settings.from_env(), modules=modules,
                                plugins=plugins) as orch:
            app.state.api = HttpApi(orch)
            yield

    one = API_PREFIX + "/robots/{robot_id}"
    schedule = API_PREFIX + "/schedules/{schedule_id}"
    routes = [
        Route(API_PREFIX + "/robots", robots, methods=["GET", "POST"]),
        Route(API_PREFIX + "/robots:batch", _submit("submit_batch"), methods=["POST"]),
        Route(one, _one_robot("get_robot"), methods=["GET"]),
        Route(one + "/cancel", _one_robot("cancel_robot"), methods=["POST"]),
        Route(one + "/retry", _one_robot("retry_robot"), methods=["POST"]),
        Route(one + "/executions", _one_robot("list_executions"), methods=["GET"]),
        Route(API_PREFIX + "/modules", list_modules, methods=["GET"]),
        Route(API_PREFIX + "/schedules", schedules, methods=["GET", "POST"]),
        Route(schedule, _one_schedule("get_schedule"), methods=["GET"]),
        Route(schedule, _one_schedule("remove_schedule"), methods=["DELETE"]),
        Route(schedule + "/pause", _one_schedule("pause_schedule"), methods=["POST"]),
        Route(schedule + "/resume", _one_schedule("resume_schedule"), methods=["POST"]),
        Route("/health", _operation("health"), methods=["GET"]),
        Route("/health/ready", _operation("ready"), methods=["GET"]),
        Route("/metrics", _operation("metrics"), methods=["GET"]),
        Route("/dashboard", _operation("dashboard"), methods=["GET"]),
        Route("/dashboard/data", dashboard_data, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.router.redirect_slashes = False  # "/robots/" is not a route: 404, not a redirect
    if orchestrator is not None:
        app.state.api = HttpApi(orchestrator)
    return app
