"""Specification of stored API keys: their format, creation, rotation and verification."""

from __future__ import annotations

import hmac
import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import pytest

from robotframework_mvp import AuthenticationError, ConfigError, RateLimit, ValidationError
from robotframework_mvp.models import utcnow
from robotframework_mvp.orchestrator import Orchestrator
from robotframework_mvp.security import keys as keys_module
from robotframework_mvp.security.keys import (
    StoredKeyBackend,
    create_key,
    key_digest,
    parse_duration,
    require_pepper,
    rotate_key,
    split_key,
)
from robotframework_mvp.state.driver import StorageDriver
from robotframework_mvp.testing import running_orchestrator

pytestmark = pytest.mark.anyio

PEPPER = "unit-test-pepper-0123456789abcdef"
KEY_FORMAT = re.compile(r"rfmvp_[a-z2-7]{8}_[A-Za-z0-9_-]{43}")


@pytest.fixture
async def orch(anyio_backend: str) -> AsyncIterator[Orchestrator]:
    async with running_orchestrator(security={"secret_key": PEPPER},
                                    worker={"enabled": False}) as running:
        yield running


async def backend_for(driver: StorageDriver, secret_key: str | None = PEPPER,
                      touch_interval: float = 60.0) -> StoredKeyBackend:
    return StoredKeyBackend(driver, secret_key, touch_interval)


# -- format ------------------------------------------------------------------------------


async def test_a_new_key_has_the_documented_format_and_only_its_digest_is_stored(
    orch: Orchestrator,
) -> None:
    key, stored = await create_key(orch.driver, PEPPER, principal="alice")
    assert KEY_FORMAT.fullmatch(key)
    prefix, secret = key.split("_", 2)[1:]
    assert stored.prefix == prefix
    assert stored.digest == key_digest(require_pepper(PEPPER), prefix, secret)
    assert secret not in repr(stored)
    assert stored.digest not in repr(stored)
    found = await orch.driver.get_api_key_by_prefix(prefix)
    assert found is not None
    assert secret not in str(found.__dict__ if hasattr(found, "__dict__") else found)
    assert (found.principal, found.tenant) == ("alice", "alice")
    assert found.scopes == {"robots:read", "robots:write"}


async def test_two_keys_never_share_a_prefix_or_a_secret(orch: Orchestrator) -> None:
    made = [await create_key(orch.driver, PEPPER, principal="p") for _ in range(30)]
    assert len({k for k, _ in made}) == 30
    assert len({s.prefix for _, s in made}) == 30


@pytest.mark.parametrize("credential", [
    "rfmvp_abcdefgh_" + "A" * 43,
    "rfmvp_22222222_" + "-_" * 21 + "x",
])
def test_split_key_reads_well_formed_keys(credential: str) -> None:
    assert split_key(credential) == (credential[6:14], credential[15:])


@pytest.mark.parametrize("credential", [
    "", "rfmvp_", "rfmvp_abcdefgh_", "rfmvp_ABCDEFGH_" + "A" * 43, "rfmvp_abcdefg_" + "A" * 43,
    "rfmvp_abcdefgh_" + "A" * 42, "rfmvp_abcdefgh_" + "A" * 44, "rfmvp_abcdefgh_" + "A" * 42 + "=",
    "xrfmvp_abcdefgh_" + "A" * 43, "rfmvp_abcdefgh_" + "A" * 43 + "\n", "static-key-123",
])
def test_split_key_refuses_anything_else(credential: str) -> None:
    assert split_key(credential) is None


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600),
    ("1d12h", 129600), ("0s", 0), (" 1.5h ", 5400),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "d", "10 years", "1x", "-5m", "5m3"])
def test_bad_durations_say_what_to_write(text: str) -> None:
    with pytest.raises(ValidationError, match="duration"):
        parse_duration(text)


# -- creating and rotating ----------------------------------------------------------------


async def test_creating_a_key_needs_the_secret_key(orch: Orchestrator) -> None:
    for missing in (None, ""):
        with pytest.raises(ConfigError, match="RFMVP_SECRET_KEY"):
            await create_key(orch.driver, missing, principal="alice")
    assert await orch.driver.list_api_keys(principal=None) == []


@pytest.mark.parametrize("changes", [
    {"scopes": ["robots:read", "root"]}, {"scopes": []}, {"principal": ""},
    {"principal": "x" * 201}, {"tenant": "a\nb"},
])
async def test_bad_key_fields_are_refused(orch: Orchestrator, changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"principal": "alice", **changes}
    with pytest.raises(ValidationError):
        await create_key(orch.driver, PEPPER, **fields)


async def test_rotation_replaces_a_key_and_the_old_one_works_for_the_grace(
    orch: Orchestrator,
) -> None:
    old_key, old = await create_key(orch.driver, PEPPER, principal="alice", tenant="acme",
                                    scopes={"robots:read"}, rate_limit=RateLimit(7, 60.0),
                                    description="billing")
    now = utcnow()
    rotated = await rotate_key(orch.driver, PEPPER, old.prefix, grace=timedelta(hours=1),
                               now=now)
    assert rotated is not None
    new_key, new, old_after = rotated
    assert new_key != old_key
    assert (new.principal, new.tenant, new.scopes, new.rate_limit, new.description) == (
        "alice", "acme", frozenset({"robots:read"}), RateLimit(7, 60.0), "billing")
    assert old_after.expires_at is not None
    assert abs((old_after.expires_at - (now + timedelta(hours=1))).total_seconds()) < 0.01
    backend = await backend_for(orch.driver)
    assert (await backend.authenticate(old_key)) is not None  # within the grace
    assert (await backend.authenticate(new_key)) is not None


async def test_rotation_without_grace_stops_the_old_key_at_once(orch: Orchestrator) -> None:
    old_key, old = await create_key(orch.driver, PEPPER, principal="alice")
    rotated = await rotate_key(orch.driver, PEPPER, old.prefix, grace=timedelta(0))
    assert rotated is not None
    backend = await backend_for(orch.driver)
    with pytest.raises(AuthenticationError, match="expired"):
        await backend.authenticate(old_key)
    assert (await backend.authenticate(rotated[0])) is not None


async def test_a_rotated_key_keeps_the_lifetime_of_the_old_one(orch: Orchestrator) -> None:
    start = utcnow()
    _, old = await create_key(orch.driver, PEPPER, principal="a", now=start,
                              expires_at=start + timedelta(days=30))
    later = start + timedelta(days=10)
    rotated = await rotate_key(orch.driver, PEPPER, old.prefix, grace=timedelta(hours=1),
                               now=later)
    assert rotated is not None
    assert rotated[1].expires_at == later + timedelta(days=30)


async def test_revoked_and_unknown_keys_are_not_rotated(orch: Orchestrator) -> None:
    _, old = await create_key(orch.driver, PEPPER, principal="alice")
    await orch.driver.revoke_api_key(old.prefix, utcnow())
    assert await rotate_key(orch.driver, PEPPER, old.prefix, grace=timedelta(hours=1)) is None
    assert await rotate_key(orch.driver, PEPPER, "zzzzzzzz", grace=timedelta(hours=1)) is None
    assert len(await orch.driver.list_api_keys(principal=None)) == 1


# -- verifying ----------------------------------------------------------------------------


async def test_the_right_key_gives_its_principal_tenant_scopes_and_limit(
    orch: Orchestrator,
) -> None:
    key, stored = await create_key(orch.driver, PEPPER, principal="svc", tenant="acme",
                                   scopes={"admin"}, rate_limit=RateLimit(5, 1.0))
    principal = await (await backend_for(orch.driver)).authenticate(key)
    assert principal is not None
    assert (principal.id, principal.tenant, principal.key_prefix) == ("svc", "acme",
                                                                      stored.prefix)
    assert principal.is_admin
    assert principal.rate_limit == RateLimit(5, 1.0)


async def test_a_wrong_secret_an_unknown_prefix_or_another_pepper_gives_nothing(
    orch: Orchestrator,
) -> None:
    key, stored = await create_key(orch.driver, PEPPER, principal="alice")
    backend = await backend_for(orch.driver)
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert await backend.authenticate(flipped) is None
    assert await backend.authenticate(key.replace(stored.prefix, "zzzzzzzz")) is None
    other = await backend_for(orch.driver, secret_key="another-pepper-entirely-0000")
    assert await other.authenticate(key) is None
    assert await backend.authenticate("not-a-stored-key") is None


async def test_without_the_secret_key_no_stored_key_is_accepted(
    orch: Orchestrator, caplog: pytest.LogCaptureFixture,
) -> None:
    key, _ = await create_key(orch.driver, PEPPER, principal="alice")
    backend = await backend_for(orch.driver, secret_key=None)
    assert await backend.authenticate(key) is None
    assert await backend.authenticate(key) is None
    warnings = [r for r in caplog.records if "RFMVP_SECRET_KEY" in r.getMessage()]
    assert len(warnings) == 1
    assert key not in caplog.text


async def test_an_unknown_prefix_still_costs_one_constant_time_comparison(
    orch: Orchestrator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, stored = await create_key(orch.driver, PEPPER, principal="alice")
    compared: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    backend = await backend_for(orch.driver)
    await backend.authenticate(key.replace(stored.prefix, "zzzzzzzz"))
    await backend.authenticate(key)
    assert len(compared) == 2
    assert all(len(a) == len(b) == 64 for a, b in compared)


async def test_revoked_and_expired_keys_are_refused_with_a_clear_message(
    orch: Orchestrator,
) -> None:
    revoked_key, revoked = await create_key(orch.driver, PEPPER, principal="a")
    await orch.driver.revoke_api_key(revoked.prefix, utcnow())
    expired_key, _ = await create_key(orch.driver, PEPPER, principal="b",
                                      expires_at=utcnow() - timedelta(seconds=1))
    backend = await backend_for(orch.driver)
    with pytest.raises(AuthenticationError, match="revoked") as caught:
        await backend.authenticate(revoked_key)
    assert revoked_key not in str(caught.value.to_dict())
    with pytest.raises(AuthenticationError, match="expired"):
        await backend.authenticate(expired_key)


async def test_last_use_is_written_in_batches_at_most_once_per_interval(
    orch: Orchestrator, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_a, a = await create_key(orch.driver, PEPPER, principal="a")
    key_b, b = await create_key(orch.driver, PEPPER, principal="b")
    batches: list[list[str]] = []
    touch = orch.driver.touch_api_keys

    async def counting(used: Any) -> None:
        batches.append([p for p, _ in used])
        await touch(used)

    monkeypatch.setattr(orch.driver, "touch_api_keys", counting)
    backend = await backend_for(orch.driver, touch_interval=3600)
    for _ in range(20):
        await backend.authenticate(key_a)
        await backend.authenticate(key_b)
    assert batches == []  # nothing on the request path
    await backend.flush()
    await backend.flush()
    assert batches == [sorted([a.prefix, b.prefix])]
    for _ in range(5):
        await backend.authenticate(key_a)
    await backend.flush()
    assert len(batches) == 1  # within the interval: not written again
    stored = await orch.driver.get_api_key_by_prefix(a.prefix)
    assert stored is not None
    assert stored.last_used_at is not None


async def test_the_orchestrator_records_last_use_in_the_background(anyio_backend: str) -> None:
    async with running_orchestrator(security={"secret_key": PEPPER,
                                              "api_key_touch_interval": 0.05},
                                    worker={"enabled": False}) as orch:
        key, stored = await create_key(orch.driver, PEPPER, principal="alice")
        await orch.list(api_key=key)
        with anyio.fail_after(5):
            while True:
                found = await orch.driver.get_api_key_by_prefix(stored.prefix)
                assert found is not None
                if found.last_used_at is not None:
                    break
                await anyio.sleep(0.02)
