"""Delayed robots, chains and schedules over HTTP, against every adapter in ``examples/``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest

from robotframework_mvp import StaticKey
from robotframework_mvp.models import utcnow
from robotframework_mvp.testing import TEST_API_KEY, TEST_PRINCIPAL

pytestmark = pytest.mark.anyio

AUTH = {"X-API-Key": TEST_API_KEY}
OTHER_KEY = "other-tenant-key-0123456789"
OTHER = {"X-API-Key": OTHER_KEY}
ROBOTS = "/api/v1/robots"
SCHEDULES = "/api/v1/schedules"
KEYS = (StaticKey(TEST_PRINCIPAL, TEST_API_KEY), StaticKey("other", OTHER_KEY))


def error_path(resp: httpx.Response, status: int) -> str | None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    path: str | None = body["error"].get("path")
    return path


async def test_run_at_over_http_needs_an_offset(client: httpx.AsyncClient) -> None:
    run_at = (utcnow() + timedelta(hours=1)).isoformat()
    resp = await client.post(ROBOTS, headers=AUTH,
                             json={"kind": "echo", "payload": {}, "run_at": run_at})
    assert resp.status_code == 202, resp.text
    robot = resp.json()
    assert robot["status"] == "queued"
    assert datetime.fromisoformat(robot["scheduled_at"]) == datetime.fromisoformat(run_at)
    naive = await client.post(ROBOTS, headers=AUTH, json={
        "kind": "echo", "payload": {}, "run_at": "2031-01-01T09:00:00"})
    assert error_path(naive, 422) == "$.run_at"
    both = await client.post(ROBOTS, headers=AUTH, json={
        "kind": "echo", "payload": {}, "run_at": run_at, "delay": 5})
    assert error_path(both, 422) == "$.run_at"
    batch = await client.post(ROBOTS + ":batch", headers=AUTH, json={"robots": [
        {"kind": "echo", "payload": {}}, {"kind": "echo", "payload": {}, "run_at": "soon"}]})
    assert error_path(batch, 422) == "$.robots[1].run_at"


async def test_robots_list_by_due_time_over_http(client: httpx.AsyncClient) -> None:
    base = utcnow() + timedelta(hours=1)
    for minutes in (30, 10, 20):
        resp = await client.post(ROBOTS, headers=AUTH, json={
            "kind": "echo", "payload": {}, "run_at": (base + timedelta(minutes=minutes))
            .isoformat()})
        assert resp.status_code == 202
    first = (await client.get(ROBOTS, params={"order": "due", "limit": 2}, headers=AUTH)).json()
    rest = (await client.get(ROBOTS, params={"order": "due", "cursor": first["next_cursor"]},
                             headers=AUTH)).json()
    due = [r["scheduled_at"] for r in first["items"] + rest["items"]]
    assert [datetime.fromisoformat(d) for d in due] == \
        [base + timedelta(minutes=m) for m in (10, 20, 30)]
    assert rest["next_cursor"] is None
    bad = await client.get(ROBOTS, params={"order": "sideways"}, headers=AUTH)
    assert error_path(bad, 422) == "$.order"


async def test_a_chain_over_http(client: httpx.AsyncClient) -> None:
    resp = await client.post(ROBOTS, headers=AUTH, json={
        "kind": "echo", "payload": {"n": 1}, "wait": 5,
        "on_success": {"kind": "echo", "payload": {"parent": "$parent.id"}}})
    assert resp.status_code == 200, resp.text
    parent = resp.json()
    assert parent["on_success"] == {"kind": "echo", "payload": {"parent": "$parent.id"}}
    with anyio.fail_after(10):
        while True:
            items = (await client.get(ROBOTS, headers=AUTH)).json()["items"]
            children = [r for r in items if r["parent_id"] == parent["id"]]
            if children:
                break
            await anyio.sleep(0.05)
    assert children[0]["payload"] == {"parent": parent["id"]}
    assert children[0]["parent_trigger"] == "on_success"
    bad = await client.post(ROBOTS, headers=AUTH, json={
        "kind": "echo", "payload": {}, "on_failure": {"kind": "echo", "payload": [], "x": 1}})
    assert error_path(bad, 422) is not None


async def test_schedule_routes_and_tenant_isolation(serve: Any) -> None:
    async with serve(security={"api_keys": KEYS, "rate_limit": None}) as client:
        resp = await client.post(SCHEDULES, headers=AUTH, json={
            "kind": "echo", "payload": {"a": 1}, "cron": "0 9 * * *",
            "timezone": "Europe/Paris", "misfire_policy": "run_all", "misfire_limit": 5})
        assert resp.status_code == 201, resp.text
        schedule = resp.json()
        assert {k: schedule[k] for k in ("kind", "payload", "cron", "timezone",
                                         "misfire_policy", "misfire_limit", "paused",
                                         "owner")} == {
            "kind": "echo", "payload": {"a": 1}, "cron": "0 9 * * *",
            "timezone": "Europe/Paris", "misfire_policy": "run_all", "misfire_limit": 5,
            "paused": False, "owner": TEST_PRINCIPAL}
        one = f"{SCHEDULES}/{schedule['id']}"
        assert (await client.get(one, headers=AUTH)).json()["id"] == schedule["id"]
        listed = (await client.get(SCHEDULES, headers=AUTH)).json()
        assert [s["id"] for s in listed["items"]] == [schedule["id"]]
        assert listed["next_cursor"] is None
        # Another tenant's schedule is exactly like a missing one.
        for method, path in (("GET", one), ("POST", one + "/pause"), ("POST", one + "/resume"),
                             ("DELETE", one)):
            resp = await client.request(method, path, headers=OTHER)
            assert resp.status_code == 404, (method, path, resp.text)
        assert (await client.get(SCHEDULES, headers=OTHER)).json()["items"] == []
        paused = await client.post(one + "/pause", headers=AUTH)
        assert (paused.status_code, paused.json()["paused"]) == (200, True)
        resumed = await client.post(one + "/resume", headers=AUTH)
        assert (resumed.status_code, resumed.json()["paused"]) == (200, False)
        assert (await client.delete(one, headers=AUTH)).status_code == 200
        assert (await client.get(one, headers=AUTH)).status_code == 404
        assert (await client.get(SCHEDULES)).status_code == 401


@pytest.mark.parametrize(("body", "path"), [
    ({"kind": "echo", "payload": {}}, "$.cron"),
    ({"kind": "echo", "payload": {}, "cron": "* *"}, "$.cron"),
    ({"kind": "echo", "payload": {}, "cron": "* * * * *", "timezone": "Moon/Base"},
     "$.timezone"),
    ({"kind": "echo", "payload": {}, "cron": "* * * * *", "every": "day"}, "$.every"),
    ({"kind": "nope", "payload": {}, "cron": "* * * * *"}, "$.kind"),
    ({"kind": "echo", "payload": 3, "cron": "* * * * *"}, "$.payload"),
])
async def test_a_bad_schedule_is_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], path: str,
) -> None:
    assert error_path(await client.post(SCHEDULES, headers=AUTH, json=body), 422) == path
