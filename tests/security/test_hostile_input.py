"""Hostile input: SQL injection strings in every field, oversized, deeply nested and
Hypothesis-generated bodies. Nothing gets a 5xx, nothing reaches the store unchecked, and
the tables are intact afterwards."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secsite import PEPPER, Site, build_site

from robotframework_mvp import RateLimit
from robotframework_mvp.security.sanitize import _FORBIDDEN_CHAR
from robotframework_mvp.testing import running_orchestrator

pytestmark = pytest.mark.anyio

INJECTIONS = [
    "'; DROP TABLE robots; --",
    "' OR '1'='1",
    "\" OR \"\"=\"",
    "1; DELETE FROM audit_log",
    "robots WHERE 1=1 --",
    "') UNION SELECT digest FROM api_keys --",
    "%' AND 1=0 UNION SELECT NULL --",
    "\\'; SELECT pg_sleep(5); --",
    "$1",
    "%(tenant)s",
    ":tenant",
]


async def table_counts(site: Site) -> tuple[int, int, int]:
    robots = sum((await site.orch.driver.count_robots()).values())
    keys = len(await site.orch.driver.list_api_keys(principal=None))
    await site.orch.audit.flush()
    audit = len(await site.orch.driver.list_audit(after_seq=0, limit=100_000))
    return robots, keys, audit


@pytest.mark.parametrize("injection", INJECTIONS)
async def test_sql_injection_strings_are_refused_or_stored_as_plain_text(
    site: Site, injection: str,
) -> None:
    alice, headers = "alice", site.headers("alice")
    known = (await site.submit(alice, {"n": 1})).body
    robots_before, keys_before, _ = await table_counts(site)

    kind = await site.api.submit_robot(
        json.dumps({"kind": injection, "payload": {}}).encode(), headers, "c")
    assert kind.status == 422
    assert kind.body["error"]["path"] == "$.kind"

    stored = await site.submit(alice, {injection: injection, "nested": [injection]},
                               idempotency_key=injection)
    assert stored.status == 202
    assert stored.body["payload"] == {injection: injection, "nested": [injection]}
    assert stored.body["idempotency_key"] == injection
    again = await site.submit(alice, {"other": 1}, idempotency_key=injection)
    assert again.body["id"] == stored.body["id"]

    assert (await site.api.list_robots({"status": injection}, headers, "c")).status == 422
    by_kind = await site.api.list_robots({"kind": injection}, headers, "c")
    assert by_kind.status == 200
    assert by_kind.body["items"] == []
    by_cursor = await site.api.list_robots({"cursor": injection}, headers, "c")
    assert by_cursor.status in (200, 422)
    assert (await site.api.list_robots({"limit": injection}, headers, "c")).status == 422
    assert (await site.api.get_robot(injection, headers, "c")).status == 404
    assert (await site.api.cancel_robot(injection, headers, "c")).status == 404
    assert (await site.api.list_robots({injection: "1"}, headers, "c")).status == 422

    robots_after, keys_after, audit_after = await table_counts(site)
    assert robots_after == robots_before + 1
    assert keys_after == keys_before
    assert audit_after > 0
    assert (await site.api.get_robot(known["id"], headers, "c")).status == 200


async def test_an_oversized_body_is_413_before_it_is_parsed(site: Site) -> None:
    limit = site.api.max_body_bytes
    body = b'{"kind": "echo", "payload": {"x": "' + b"a" * limit + b'"}}'
    response = await site.api.submit_robot(body, site.headers("alice"), "c")
    assert response.status == 413


@pytest.mark.parametrize("depth", [33, 200, 5000, 100_000])
async def test_deep_nesting_is_422_with_a_path(site: Site, depth: int) -> None:
    body = '{"kind": "echo", "payload": ' + '{"a": [' * depth + "1" + "]}" * depth + "}"
    response = await site.api.submit_robot(body.encode(), site.headers("alice"), "c")
    assert response.status in (413, 422)
    if response.status == 422:
        assert response.body["error"]["path"].startswith("$")


@pytest.mark.parametrize(("payload", "path"), [
    ({"n": 2**60}, "$.payload.n"),
    ({"s": "x" * 20_000}, "$.payload.s"),
    ({"s": "nul\x00byte"}, "$.payload.s"),
    ({"s": "bell\x07"}, "$.payload.s"),
    ({"k" * 300: 1}, "$.payload"),
    ({"list": list(range(1001))}, "$.payload.list"),
])
async def test_out_of_range_payloads_are_422_naming_the_place(
    site: Site, payload: dict[str, Any], path: str,
) -> None:
    response = await site.submit("alice", payload)
    assert response.status == 422, response.body
    assert response.body["error"]["path"].startswith(path)


@pytest.mark.parametrize("body", [
    b"[]", b'"robot"', b"null", b"42", b"not json", b'{"kind": "echo"}',
    b'{"kind": "echo", "payload": []}', b'{"kind": "echo", "payload": {}, "admin": true}',
    b'{"kind": "echo", "payload": {}, "priority": 10000}',
    b'{"kind": "echo", "payload": {}, "wait": 1e9}',
    b'{"kind": "echo", "payload": {}, "priority": true}',
    b'{"kind": "echo", "payload": {"a": NaN}}',
    b'{"kind": "echo", "payload": {"a": 1, "a": 2}}',
    b"\xff\xfe{}", b'{"kind": "\xed\xa0\x80", "payload": {}}',
])
async def test_malformed_bodies_are_422(site: Site, body: bytes) -> None:
    response = await site.api.submit_robot(body, site.headers("alice"), "c")
    assert response.status == 422, response.body


JSON_SCALARS = (st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=True, allow_infinity=True) | st.text())
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=30,
)


def _clean(value: Any) -> bool:
    """No forbidden character, and NFC, anywhere in a stored payload."""
    if isinstance(value, str):
        return not _FORBIDDEN_CHAR.search(value) and unicodedata.is_normalized("NFC", value)
    if isinstance(value, dict):
        return all(_clean(k) and _clean(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_clean(v) for v in value)
    return True


@pytest.fixture
def portal_site() -> Iterator[tuple[BlockingPortal, Site]]:
    """A site run by an event loop in a portal thread, for the (sync) Hypothesis test."""
    from modules.demo import echo, sleep

    with start_blocking_portal() as portal, portal.wrap_async_context_manager(
        running_orchestrator(echo, sleep, worker={"enabled": False}, security={
            "secret_key": PEPPER, "rate_limit": RateLimit(10**6, 1.0)})
    ) as orch:
        yield portal, portal.call(build_site, orch)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(
    st.sampled_from(["kind", "payload", "priority", "idempotency_key", "wait", "delay",
                     "extra"]) | st.text(max_size=5),
    JSON_VALUES, max_size=6))
def test_generated_bodies_never_get_a_5xx_and_stored_payloads_are_clean(
    portal_site: tuple[BlockingPortal, Site], fields: dict[str, Any],
) -> None:
    portal, site = portal_site
    if not isinstance(fields.get("kind"), str):
        fields["kind"] = "echo"
    body = json.dumps(fields, allow_nan=True).encode("utf-8", "surrogatepass")
    response = portal.call(site.api.submit_robot, body, site.headers("alice"), "c")
    assert response.status in (200, 202, 413, 422), response.body
    if response.status == 422:
        assert response.body["error"]["path"].startswith("$")
    if response.status in (200, 202):
        assert _clean(response.body["payload"])
