"""The HTTP contract (DESIGN section 9), run against every adapter in ``examples/``."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from types import ModuleType
from typing import Any

import anyio
import httpx
import pytest

from robotframework_mvp import RateLimit, StaticKey
from robotframework_mvp.hookspecs import hookimpl
from robotframework_mvp.testing import TEST_API_KEY, TEST_PRINCIPAL, test_settings

pytestmark = pytest.mark.anyio

AUTH = {"X-API-Key": TEST_API_KEY}
ROBOTS = "/api/v1/robots"
OTHER_KEY = "other-tenant-key-0123456789"


def error_of(resp: httpx.Response, status: int, type_: str | None = None) -> dict[str, Any]:
    """The ``error`` object of a contract error response, checked for shape and leaks."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert isinstance(error["type"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in resp.text
    assert TEST_API_KEY not in resp.text
    if type_ is not None:
        assert error["type"] == type_
    return error


async def submit(client: httpx.AsyncClient, kind: str = "echo", payload: Any = None,
                 **fields: Any) -> httpx.Response:
    body = {"kind": kind, "payload": {"n": 1} if payload is None else payload, **fields}
    return await client.post(ROBOTS, json=body, headers=AUTH)


async def wait_for(client: httpx.AsyncClient, robot_id: str, statuses: set[str],
                   timeout: float = 10.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            resp = await client.get(f"{ROBOTS}/{robot_id}", headers=AUTH)
            assert resp.status_code == 200, resp.text
            robot: dict[str, Any] = resp.json()
            if robot["status"] in statuses:
                return robot
            await anyio.sleep(0.05)


# -- submit -------------------------------------------------------------------------------


async def test_submit_returns_202_with_the_queued_robot(client: httpx.AsyncClient) -> None:
    resp = await submit(client, payload={"hello": "world"})
    assert resp.status_code == 202, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    robot = resp.json()
    assert robot["status"] == "queued"
    assert robot["kind"] == "echo"
    assert robot["payload"] == {"hello": "world"}
    assert robot["owner"] == TEST_PRINCIPAL
    assert "lease_token" not in robot
    done = await wait_for(client, robot["id"], {"succeeded"})
    assert done["result"] == {"echo": {"hello": "world"}}
    assert "lease_token" not in done


async def test_submit_with_wait_returns_200_and_the_result(client: httpx.AsyncClient) -> None:
    resp = await submit(client, payload={"x": [1, 2]}, wait=5)
    assert resp.status_code == 200, resp.text
    robot = resp.json()
    assert robot["status"] == "succeeded"
    assert robot["result"] == {"echo": {"x": [1, 2]}}
    assert robot["progress"] == 100


async def test_wait_that_runs_out_returns_202(client: httpx.AsyncClient) -> None:
    resp = await submit(client, "sleep", {"seconds": 5}, wait=0.2)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] in ("queued", "running")
    cancel = await client.post(f"{ROBOTS}/{resp.json()['id']}/cancel", headers=AUTH)
    assert cancel.status_code == 200


async def test_same_idempotency_key_returns_the_same_robot(client: httpx.AsyncClient) -> None:
    first = await submit(client, idempotency_key="order-42")
    second = await submit(client, idempotency_key="order-42")
    assert first.status_code in (200, 202)
    assert second.status_code in (200, 202)
    assert first.json()["id"] == second.json()["id"]
    other = await submit(client, idempotency_key="order-43")
    assert other.json()["id"] != first.json()["id"]


# -- authentication -----------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {},
    {"X-API-Key": "not-the-right-key-at-all"},
    {"Authorization": "Bearer not-the-right-key"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer"},
    {"Authorization": TEST_API_KEY},
    {"X-API-Key": "bad\x7fkey"},
], ids=["none", "wrong-key", "wrong-bearer", "basic", "empty-bearer", "no-scheme", "control"])
async def test_401_without_a_valid_key(client: httpx.AsyncClient,
                                       headers: dict[str, str]) -> None:
    resp = await client.post(ROBOTS, json={"kind": "echo", "payload": {}}, headers=headers)
    error_of(resp, 401, "unauthenticated")
    assert "Bearer" in resp.headers["WWW-Authenticate"]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", ROBOTS), ("GET", ROBOTS), ("POST", ROBOTS + ":batch"),
    ("GET", ROBOTS + "/x"), ("POST", ROBOTS + "/x/cancel"), ("POST", ROBOTS + "/x/retry"),
    ("GET", ROBOTS + "/x/executions"), ("GET", "/api/v1/modules"),
])
async def test_every_api_route_needs_a_key(client: httpx.AsyncClient, method: str,
                                           path: str) -> None:
    body = {"kind": "echo", "payload": {}} if path == ROBOTS else {"robots": [
        {"kind": "echo", "payload": {}}]}
    resp = await client.request(method, path, json=body if method == "POST" else None)
    error_of(resp, 401, "unauthenticated")


async def test_bearer_token_works(client: httpx.AsyncClient) -> None:
    bearer = {"Authorization": f"Bearer {TEST_API_KEY}"}
    resp = await client.post(ROBOTS, json={"kind": "echo", "payload": {}, "wait": 5},
                             headers=bearer)
    assert resp.status_code == 200, resp.text
    got = await client.get(f"{ROBOTS}/{resp.json()['id']}", headers=bearer)
    assert got.status_code == 200
    assert got.json()["status"] == "succeeded"


async def test_404_for_a_missing_robot_and_for_another_tenants(serve: Any) -> None:
    keys = (StaticKey(TEST_PRINCIPAL, TEST_API_KEY), StaticKey("other", OTHER_KEY))
    async with serve(security={"api_keys": keys, "rate_limit": None}) as client:
        mine = (await submit(client, wait=5)).json()
        missing = await client.get(f"{ROBOTS}/01234567-0000-7000-8000-000000000000",
                                   headers=AUTH)
        error_of(missing, 404, "not_found")
        other = {"X-API-Key": OTHER_KEY}
        theirs = await client.get(f"{ROBOTS}/{mine['id']}", headers=other)
        error = error_of(theirs, 404, "not_found")
        # Another tenant's robot looks exactly like a missing one.
        assert error["message"] == f"no robot {mine['id']!r}"
        for action in ("cancel", "retry"):
            error_of(await client.post(f"{ROBOTS}/{mine['id']}/{action}", headers=other), 404)
        error_of(await client.get(f"{ROBOTS}/{mine['id']}/executions", headers=other), 404)
        listed = await client.get(ROBOTS, headers=other)
        assert listed.status_code == 200
        assert listed.json()["items"] == []
        assert (await client.get(f"{ROBOTS}/{mine['id']}", headers=AUTH)).status_code == 200


# -- cancel, retry, executions --------------------------------------------------------------


async def test_cancel_a_running_robot(client: httpx.AsyncClient) -> None:
    robot = (await submit(client, "sleep", {"seconds": 30})).json()
    running = await wait_for(client, robot["id"], {"running"})
    assert running["started_at"] is not None
    resp = await client.post(f"{ROBOTS}/{robot['id']}/cancel", headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled"
    assert (await wait_for(client, robot["id"], {"cancelled"}))["finished_at"] is not None


async def test_cancel_a_finished_robot_is_409(client: httpx.AsyncClient) -> None:
    robot = (await submit(client, wait=5)).json()
    assert robot["status"] == "succeeded"
    resp = await client.post(f"{ROBOTS}/{robot['id']}/cancel", headers=AUTH)
    error_of(resp, 409, "conflict")
    error_of(await client.post(f"{ROBOTS}/{robot['id']}/retry", headers=AUTH), 409, "conflict")


async def test_retry_a_failed_robot_and_list_its_executions(client: httpx.AsyncClient) -> None:
    # sleep refuses a negative duration at run time (no validate_robot plugin here).
    robot = (await submit(client, "sleep", {"seconds": -1}, wait=10)).json()
    assert robot["status"] == "failed", robot
    assert robot["error"]["type"] == "ValueError"
    assert "0 to 3600" in robot["error"]["message"]
    executions = await client.get(f"{ROBOTS}/{robot['id']}/executions", headers=AUTH)
    assert executions.status_code == 200
    attempts = executions.json()["items"]
    assert len(attempts) == robot["attempts"] == robot["max_attempts"]
    assert {e["status"] for e in attempts} == {"failed"}
    retried = await client.post(f"{ROBOTS}/{robot['id']}/retry", headers=AUTH)
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "queued"
    again = await wait_for(client, robot["id"], {"failed"})
    assert again["attempts"] == robot["attempts"] + 1


# -- limits and validation ----------------------------------------------------------------


async def test_413_for_a_body_over_the_limit(serve: Any) -> None:
    async with serve(security={"max_payload_bytes": 1024}) as client:
        small = await client.post(ROBOTS, headers=AUTH,
                                  json={"kind": "echo", "payload": {"s": "x" * 900}})
        assert small.status_code == 202, small.text
        for size in (2000, 20_000):  # over the payload limit / over the body limit
            body = json.dumps({"kind": "echo", "payload": {"s": "x" * size}}).encode()
            with_length = await client.post(ROBOTS, content=body, headers={
                **AUTH, "content-type": "application/json"})
            assert "content-length" in with_length.request.headers
            error_of(with_length, 413, "payload_too_large")

        sent = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal sent
            yield b'{"kind": "echo", "payload": {"s": "'
            for _ in range(100):
                sent += 1
                yield b"x" * 1000
            yield b'"}}'

        streamed = await client.post(ROBOTS, content=chunks(), headers={
            **AUTH, "content-type": "application/json"})
        assert "content-length" not in streamed.request.headers
        error_of(streamed, 413, "payload_too_large")
        assert sent < 100  # refused while streaming, not after buffering it all
        batch = {"robots": [{"kind": "echo", "payload": {"s": "x" * 900}}] * 10}
        error_of(await client.post(ROBOTS + ":batch", json=batch, headers=AUTH), 413)


BAD_SUBMISSIONS = [
    pytest.param(b'{"kind": "echo", "payload": {', "$", id="invalid-json"),
    pytest.param(b"", "$", id="empty"),
    pytest.param(b"[1, 2]", "$", id="array"),
    pytest.param(b'"echo"', "$", id="string"),
    pytest.param(b'{"kind": "echo", "payload": {}, "colour": "red"}', "$.colour",
                 id="unknown-field"),
    pytest.param(b'{"kind": "echo"}', "$.payload", id="no-payload"),
    pytest.param(b'{"kind": "echo", "payload": [1]}', "$.payload", id="payload-not-object"),
    pytest.param(b'{"kind": "echo", "payload": {}, "priority": "high"}', "$.priority",
                 id="priority-text"),
    pytest.param(b'{"kind": "echo", "payload": {}, "priority": 5000}', "$.priority",
                 id="priority-range"),
    pytest.param(b'{"kind": "echo", "payload": {}, "wait": -1}', "$.wait", id="wait"),
    pytest.param(b'{"kind": "echo", "payload": {"s": "a\\u0000b"}}', "$.payload.s", id="nul"),
    pytest.param(b'{"kind": 7, "payload": {}}', "$.kind", id="kind-number"),
]


@pytest.mark.parametrize(("body", "path"), BAD_SUBMISSIONS)
async def test_422_for_bad_submissions(client: httpx.AsyncClient, body: bytes,
                                       path: str) -> None:
    resp = await client.post(ROBOTS, content=body,
                             headers={**AUTH, "content-type": "application/json"})
    error = error_of(resp, 422, "validation_error")
    assert error["path"] == path


async def test_422_for_an_unknown_kind_lists_the_known_kinds(
        client: httpx.AsyncClient) -> None:
    error = error_of(await submit(client, "teleport"), 422, "validation_error")
    assert error["path"] == "$.kind"
    assert "teleport" in error["message"]
    assert "echo" in error["message"]
    assert "sleep" in error["message"]


@pytest.mark.parametrize(("query", "path"), [
    ("limit=abc", "$.limit"), ("limit=0", "$.limit"), ("limit=501", "$.limit"),
    ("limit=-1", "$.limit"), ("status=bogus", "$.status"), ("colour=red", "$.colour"),
])
async def test_422_for_bad_list_parameters(client: httpx.AsyncClient, query: str,
                                           path: str) -> None:
    error = error_of(await client.get(f"{ROBOTS}?{query}", headers=AUTH), 422,
                     "validation_error")
    assert error["path"] == path


async def test_429_after_the_rate_limit(serve: Any) -> None:
    async with serve(security={"rate_limit": RateLimit(3, 60)}) as client:
        for _ in range(3):
            assert (await client.get(ROBOTS, headers=AUTH)).status_code == 200
        resp = await client.get(ROBOTS, headers=AUTH)
        error = error_of(resp, 429, "rate_limited")
        assert error["retry_after"] > 0
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.headers["RateLimit-Limit"] == "3"
        assert resp.headers["RateLimit-Remaining"] == "0"
        assert int(resp.headers["RateLimit-Reset"]) >= 1
        error_of(await submit(client), 429, "rate_limited")


# -- listing and batches ------------------------------------------------------------------


async def test_list_pages_through_every_robot_exactly_once(client: httpx.AsyncClient) -> None:
    created = {(await submit(client, payload={"i": i})).json()["id"] for i in range(7)}
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = await client.get(ROBOTS, params=params, headers=AUTH)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= 3
        seen += [r["id"] for r in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7
    assert set(seen) == created
    assert seen == sorted(seen, reverse=True)  # newest first


async def test_list_filters_and_takes_the_last_repeated_parameter(
        client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await submit(client, wait=5)
    resp = await client.get(f"{ROBOTS}?limit=1&limit=2&status=succeeded&kind=echo",
                            headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["items"]) == 2
    assert {r["status"] for r in resp.json()["items"]} == {"succeeded"}
    none = await client.get(f"{ROBOTS}?kind=sleep", headers=AUTH)
    assert none.json() == {"items": [], "next_cursor": None}


async def test_batch_creates_every_robot_in_one_call(client: httpx.AsyncClient) -> None:
    items = [{"kind": "echo", "payload": {"i": i}} for i in range(5)]
    resp = await client.post(ROBOTS + ":batch", json={"robots": items}, headers=AUTH)
    assert resp.status_code == 202, resp.text
    robots = resp.json()["items"]
    assert [r["payload"] for r in robots] == [{"i": i} for i in range(5)]
    assert len({r["id"] for r in robots}) == 5
    assert all("lease_token" not in r for r in robots)
    for robot in robots:
        assert (await wait_for(client, robot["id"], {"succeeded"}))["result"] == {
            "echo": robot["payload"]}


@pytest.mark.parametrize(("item", "path"), [
    ({"kind": "echo", "payload": {"s": "a\x00b"}}, "$.robots[2].payload.s"),
    ({"kind": "nope", "payload": {}}, "$.robots[2].kind"),
    ({"kind": "echo", "payload": {}, "wait": 3}, "$.robots[2].wait"),
    ("echo", "$.robots[2]"),
])
async def test_batch_names_the_bad_item(client: httpx.AsyncClient, item: Any,
                                        path: str) -> None:
    good = {"kind": "echo", "payload": {}}
    resp = await client.post(ROBOTS + ":batch", json={"robots": [good, good, item]},
                             headers=AUTH)
    assert error_of(resp, 422, "validation_error")["path"] == path
    listed = await client.get(ROBOTS, headers=AUTH)
    assert listed.json()["items"] == []  # all or none


@pytest.mark.parametrize("body", [{"robots": []}, {"robots": "x"}, {}, {"robots": [],
                                                                         "extra": 1}])
async def test_batch_needs_a_list_of_robots(client: httpx.AsyncClient,
                                            body: dict[str, Any]) -> None:
    resp = await client.post(ROBOTS + ":batch", json=body, headers=AUTH)
    assert error_of(resp, 422, "validation_error")["path"].startswith("$.")


# -- modules and operations ---------------------------------------------------------------


async def test_modules_lists_echo_and_sleep(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/v1/modules", headers=AUTH)
    assert resp.status_code == 200, resp.text
    rows = {row["name"]: row for row in resp.json()["items"]}
    assert set(rows) == {"echo", "sleep"}
    assert rows["echo"]["kinds"] == ["echo"]
    assert rows["sleep"]["kinds"] == ["sleep"]
    for row in rows.values():
        assert {"health", "score", "circuit_state", "load"} <= set(row)
        assert row["circuit_state"] == "closed"
        assert row["load"] == 0


async def test_health_and_readiness_need_no_key(client: httpx.AsyncClient) -> None:
    resp = await client.get("/health")
    assert resp.status_code == 200, resp.text
    health = resp.json()
    assert health["status"] == "ok"
    assert health["components"]["store"]["status"] == "ok"
    assert {"store", "cache", "worker", "modules"} <= set(health["components"])
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ok"


async def test_metrics_in_prometheus_text_format(client: httpx.AsyncClient) -> None:
    await submit(client, wait=5)
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    # prometheus_client sorts labels, so `le` comes before `operation` in bucket lines.
    assert re.search(r'^rfmvp_step_duration_seconds_bucket\{[^}]*operation="security\.validate"'
                     r'[^}]*\} [1-9]', resp.text, re.MULTILINE)
    assert 'rfmvp_step_duration_seconds_count{operation="module.process"}' in resp.text


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/"), ("GET", "/nope"), ("GET", "/api/v1"), ("GET", "/api/v2/robots"),
    ("GET", ROBOTS + "/"), ("GET", ROBOTS + "/x/unknown"), ("POST", "/api/v1/robots:bulk"),
    ("GET", "/health/"), ("GET", "/api/v1/modules/echo"),
])
async def test_unknown_routes_are_404_json(client: httpx.AsyncClient, method: str,
                                           path: str) -> None:
    error_of(await client.request(method, path, headers=AUTH), 404, "not_found")


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", ROBOTS + "/x", {"GET"}), ("PUT", ROBOTS, {"GET", "POST"}),
    ("GET", ROBOTS + ":batch", {"POST"}), ("GET", ROBOTS + "/x/cancel", {"POST"}),
    ("POST", "/health", {"GET"}), ("DELETE", "/metrics", {"GET"}),
    ("POST", "/api/v1/modules", {"GET"}),
])
async def test_wrong_methods_are_405_json(client: httpx.AsyncClient, method: str, path: str,
                                          allowed: set[str]) -> None:
    resp = await client.request(method, path, headers=AUTH)
    error_of(resp, 405, "method_not_allowed")
    assert allowed <= {m.strip() for m in resp.headers["Allow"].split(",")}


async def test_a_robot_id_with_a_colon_is_not_the_batch_route(
        client: httpx.AsyncClient) -> None:
    error_of(await client.get(ROBOTS + "/abc:batch", headers=AUTH), 404, "not_found")


class ExplodingValidator:
    @hookimpl
    def validate_robot(self, kind: str, payload: dict[str, Any], principal: Any) -> None:
        raise RuntimeError("secret detail")


async def test_internal_errors_never_leak(serve: Any,
                                          caplog: pytest.LogCaptureFixture) -> None:
    async with serve(plugins=(ExplodingValidator(),)) as client:
        resp = await submit(client)
        error = error_of(resp, 500, "internal_error")
        assert "secret detail" not in resp.text
        assert "RuntimeError" not in resp.text
        assert error["message"] == "internal error"
        assert (await client.get("/health")).status_code == 200  # still serving
    assert "secret detail" in caplog.text  # ... but the operator sees it in the log


# -- served the way a real server runs it (lifespan starts the orchestrator) --------------


async def test_lifespan_runs_its_own_orchestrator(adapter: ModuleType, tmp_path: Any) -> None:
    from modules.demo import echo, sleep

    settings = test_settings(f"sqlite:///{tmp_path / 'robots.db'}")
    app = adapter.create_app(settings, modules=[echo, sleep])
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://test") as client:
        resp = await submit(client, payload={"a": 1}, wait=5)
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"] == {"echo": {"a": 1}}
        assert (await client.get("/health")).json()["status"] == "ok"


def test_fastapi_publishes_the_contract_in_openapi(tmp_path: Any) -> None:
    import fastapi_app

    app = fastapi_app.create_app(test_settings(f"sqlite:///{tmp_path / 'robots.db'}"))
    schema = app.openapi()
    paths = schema["paths"]
    assert set(paths) == {
        ROBOTS, ROBOTS + ":batch", ROBOTS + "/{robot_id}", ROBOTS + "/{robot_id}/cancel",
        ROBOTS + "/{robot_id}/retry", ROBOTS + "/{robot_id}/executions", "/api/v1/modules",
        "/api/v1/schedules", "/api/v1/schedules/{schedule_id}",
        "/api/v1/schedules/{schedule_id}/pause", "/api/v1/schedules/{schedule_id}/resume",
        "/health", "/health/ready", "/metrics", "/dashboard", "/dashboard/data"}
    submit_op = paths[ROBOTS]["post"]
    assert submit_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SubmitRobot"}
    assert {"200", "202", "401", "413", "422", "429", "503"} <= set(submit_op["responses"])
    assert {"404", "409"} <= set(paths[ROBOTS + "/{robot_id}/cancel"]["post"]["responses"])
    assert submit_op["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    assert "security" not in paths["/health"]["get"]
    components = schema["components"]
    assert {"SubmitRobot", "SubmitBatch", "RobotSpec", "Robot", "ErrorBody"} <= set(
        components["schemas"])
    assert components["securitySchemes"] == {
        "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "HTTPBearer": {"type": "http", "scheme": "bearer"}}
    assert "lease_token" not in components["schemas"]["Robot"]["properties"]
