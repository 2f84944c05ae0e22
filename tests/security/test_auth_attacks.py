"""What an attacker tries with keys: none, malformed, forged, revoked, expired, the wrong
scope, header injection, a flood of guesses; and where a key could leak (logs, errors,
audit records, metrics)."""

from __future__ import annotations

import json
import logging
import secrets

import pytest
from secsite import PEPPER, Site

from robotframework_mvp.security.keys import create_key

pytestmark = pytest.mark.anyio

ATTACKER = "203.0.113.66"
BYSTANDER = "198.51.100.20"


async def assert_refused(site: Site, headers: dict[str, str], status: int = 401,
                         client: str = ATTACKER) -> dict[str, object]:
    response = await site.api.list_robots({}, headers, client)
    assert response.status == status, response.body
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = json.dumps(response.body)
    for value in headers.values():
        stripped = value.strip()
        if len(stripped) > 12:
            assert stripped not in body  # never echoed
            assert stripped[-12:] not in body
    assert set(response.body) == {"error"}
    error: dict[str, object] = response.body["error"]
    return error


async def test_no_key_is_401(site: Site) -> None:
    error = await assert_refused(site, {})
    assert "X-API-Key" in str(error["message"])


@pytest.mark.parametrize("headers", [
    {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
    {"Authorization": "Bearer"},
    {"Authorization": "Token abcdefghijkl"},
    {"X-API-Key": ""},
    {"X-API-Key": "      "},
    {"X-API-Key": "rfmvp_abcdefgh_" + "A" * 43 + "\r\nX-Admin: yes"},
    {"X-API-Key": "key-with-a-newline\nSet-Cookie: session=attacker"},
    {"X-API-Key": "key\x00with\x00nul-bytes-0000"},
    {"X-API-Key": "key-with-\x1b[31m-escape-0000"},
    {"Authorization": "Bearer key\r\nInjected: header-value-0000"},
    {"X-API-Key": "k" * 100_000},
    {"X-API-Key": "rfmvp_" + "a" * 5000},
])
async def test_malformed_keys_and_header_injection_are_401_and_nothing_is_echoed(
    site: Site, headers: dict[str, str],
) -> None:
    error = await assert_refused(site, headers)
    assert error["type"] == "unauthenticated"
    assert len(str(error["message"])) < 120


@pytest.mark.parametrize("forge", [
    "wrong-secret", "unknown-prefix", "other-pepper", "static-looking", "truncated",
])
async def test_forged_keys_are_401(site: Site, forge: str) -> None:
    real = site.keys["alice"]
    forged = {
        "wrong-secret": real[:15] + secrets.token_urlsafe(32),
        "unknown-prefix": "rfmvp_zzzzzzzz_" + real[15:],
        "other-pepper": (await create_key(site.orch.driver, PEPPER + "x", principal="alice"))[0],
        "static-looking": "alice:" + real,
        "truncated": real[:-1],
    }[forge]
    error = await assert_refused(site, {"X-API-Key": forged})
    assert error["message"] == "the API key is not valid"


async def test_a_revoked_key_is_401(site: Site) -> None:
    error = await assert_refused(site, site.headers("revoked"))
    assert "revoked" in str(error["message"])


async def test_an_expired_key_is_401(site: Site) -> None:
    error = await assert_refused(site, site.headers("expired"))
    assert "expired" in str(error["message"])


async def test_the_same_key_as_a_bearer_token_works(site: Site) -> None:
    response = await site.api.list_robots(
        {}, {"Authorization": f"Bearer {site.keys['alice']}"}, BYSTANDER)
    assert response.status == 200


async def test_a_key_without_the_scope_is_403(site: Site) -> None:
    robot = (await site.submit("alice")).body
    submitted = await site.submit("reader")
    assert submitted.status == 403
    assert "robots:write" in submitted.body["error"]["message"]
    assert (await site.api.cancel_robot(robot["id"], site.headers("reader"), BYSTANDER)
            ).status == 403
    assert (await site.api.retry_robot(robot["id"], site.headers("reader"), BYSTANDER)
            ).status == 403
    assert (await site.api.list_robots({}, site.headers("writer"), BYSTANDER)).status == 403
    assert (await site.api.get_robot(robot["id"], site.headers("writer"), BYSTANDER)
            ).status == 403
    assert (await site.api.list_modules(site.headers("writer"), BYSTANDER)).status == 403
    assert (await site.api.get_robot(robot["id"], site.headers("reader"), BYSTANDER)
            ).status == 200
    assert (await site.submit("writer")).status == 202


async def test_a_burst_of_1000_bad_keys_from_one_address_is_cut_off_and_spares_others(
    site: Site,
) -> None:
    statuses: list[int] = []
    bystander: list[int] = []
    for n in range(1000):
        guess = (f"rfmvp_{secrets.choice('abcdefgh') * 8}_{secrets.token_urlsafe(32)}"
                 if n % 2 else secrets.token_urlsafe(24))
        statuses.append((await site.api.list_robots({}, {"X-API-Key": guess}, ATTACKER)).status)
        if n % 100 == 0:
            bystander.append(
                (await site.api.list_robots({}, site.headers("bob"), BYSTANDER)).status)
    limit = site.orch.settings.security.auth_failure_limit
    assert limit is not None
    first_429 = statuses.index(429)
    assert first_429 <= limit.count  # cut off well before 1,000
    assert statuses.count(401) <= limit.count + 1
    assert set(statuses[first_429:]) == {429}
    assert bystander == [200] * 10
    # The attacker's address still cannot use a guess, and a bystander's key still works.
    assert (await site.api.list_robots({}, site.headers("alice"), BYSTANDER)).status == 200
    limited = await site.api.list_robots({}, {"X-API-Key": "another-guess-123"}, ATTACKER)
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["RateLimit-Remaining"] == "0"


async def test_malformed_credentials_count_as_failures_and_are_audited(site: Site) -> None:
    limit = site.orch.settings.security.auth_failure_limit
    assert limit is not None
    statuses = [
        (await site.api.list_robots({}, {"X-API-Key": f"bad\r\nkey-{n}"}, ATTACKER)).status
        for n in range(limit.count + 3)
    ]
    assert statuses.count(429) >= 2
    await site.orch.audit.flush()
    records = await site.orch.driver.list_audit(after_seq=0, limit=1000)
    refused = [e for _, e in records if e.client == ATTACKER]
    assert len(refused) == len(statuses)
    assert {e.outcome for e in refused} == {"refused:unauthenticated", "refused:rate_limited"}


async def test_a_key_never_reaches_a_log_an_error_an_audit_record_or_a_metric(
    site: Site, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets_used = [site.keys[n] for n in ("alice", "bob", "revoked", "expired", "reader")]
    wrong = site.keys["alice"][:15] + secrets.token_urlsafe(32)
    secrets_used.append(wrong)
    bodies = []
    for key in secrets_used:
        for headers in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}):
            responses = [
                await site.api.list_robots({}, headers, ATTACKER),
                await site.api.submit_robot(b'{"kind": "echo", "payload": {}}', headers,
                                            ATTACKER),
                await site.api.get_robot("no-such-robot", headers, ATTACKER),
                await site.api.submit_robot(b'{"kind": "nope", "payload": []}', headers,
                                            ATTACKER),
            ]
            bodies += [json.dumps(r.body) + json.dumps(dict(r.headers)) for r in responses]
    await site.orch.audit.flush()
    audit = json.dumps([[e.principal, e.action, e.target, e.outcome, e.client, e.request_id,
                         e.details] for _, e in
                        await site.orch.driver.list_audit(after_seq=0, limit=10_000)])
    metrics = (await site.api.metrics()).body
    health = json.dumps((await site.api.health()).body)
    everything = "\n".join([*bodies, audit, str(metrics), health, caplog.text])
    for key in secrets_used:
        secret = key.split("_", 2)[2]
        assert key not in everything
        assert secret not in everything
        assert secret[:16] not in everything
    stored = await site.orch.driver.list_api_keys(principal=None)
    for record in stored:
        assert record.digest not in everything
