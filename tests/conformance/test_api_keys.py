"""Specification of a storage driver's API keys and audit retention: every driver passes.

Each test gets a fresh store (a new SQLite file, or a new PostgreSQL schema), built
through the built-in plugin from a URL, as in ``test_storage_driver.py``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread
import attrs
import psycopg
import pytest

from robotframework_mvp.config import RateLimit
from robotframework_mvp.errors import ConflictError
from robotframework_mvp.models import ApiKey, AuditEvent, new_id, utcnow
from robotframework_mvp.security.audit import verify_chain, verify_store
from robotframework_mvp.state.driver import StorageDriver
from robotframework_mvp.state.sqlite import sqlite_path

pytestmark = pytest.mark.anyio


def _raw_sql(url: str, statement: str, params: tuple[Any, ...]) -> None:
    if url.startswith("sqlite"):
        with contextlib.closing(sqlite3.connect(sqlite_path(url))) as conn:
            conn.execute(statement, params)
            conn.commit()
        return
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute(statement.replace("?", "%s"), params)


async def run_sql(url: str, statement: str, *params: Any) -> None:
    """Run ``statement`` behind the driver's back (``?`` placeholders)."""
    await anyio.to_thread.run_sync(_raw_sql, url, statement, params)


def make_key(prefix: str = "abcdefgh", **changes: Any) -> ApiKey:
    fields: dict[str, Any] = {
        "id": new_id(), "prefix": prefix, "digest": "d" * 64, "principal": "alice",
        "tenant": "acme", "scopes": frozenset({"robots:read", "robots:write"}),
        "created_at": utcnow().replace(microsecond=0), "description": "ci",
    }
    fields.update(changes)
    return ApiKey(**fields)


def audit_event(n: int, **changes: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "ts": utcnow(), "principal": "alice", "action": "robots.get", "target": f"r{n}",
        "outcome": "ok", "client": "127.0.0.1", "request_id": f"req-{n}",
    }
    fields.update(changes)
    return AuditEvent(**fields)


def same(a: ApiKey, b: ApiKey) -> bool:
    return attrs.asdict(a) == attrs.asdict(b)


# --- keys ---------------------------------------------------------------------------------


async def test_a_created_key_is_found_by_its_prefix_with_every_field(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    key = make_key(expires_at=now + timedelta(days=30), rate_limit=RateLimit(100, 60.0),
                   scopes=frozenset({"admin"}))
    assert await driver.create_api_key(key)
    found = await driver.get_api_key_by_prefix("abcdefgh")
    assert found is not None
    assert same(found, key)
    assert found.rate_limit == RateLimit(100, 60.0)
    assert await driver.get_api_key_by_prefix("zzzzzzzz") is None


async def test_keys_read_together_are_the_keys_read_one_by_one(driver: StorageDriver) -> None:
    # The read that requests arriving together share (StoredKeyBackend).
    await driver.create_api_key(make_key("aaaaaaaa"))
    await driver.create_api_key(make_key("bbbbbbbb", principal="bob"))
    await driver.revoke_api_key("bbbbbbbb", utcnow())
    await driver.create_api_key(make_key("cccccccc"))
    read_many = getattr(driver, "get_api_keys_by_prefixes")  # noqa: B009 - not in the protocol
    found = await read_many(["aaaaaaaa", "bbbbbbbb", "unknown0", "x' OR '1'='1"])
    assert sorted(found) == ["aaaaaaaa", "bbbbbbbb"]
    for prefix, key in found.items():
        alone = await driver.get_api_key_by_prefix(prefix)
        assert alone is not None
        assert same(key, alone)
    assert await read_many([]) == {}


async def test_a_taken_prefix_stores_nothing(driver: StorageDriver) -> None:
    first = make_key()
    assert await driver.create_api_key(first)
    assert not await driver.create_api_key(make_key(principal="mallory", digest="e" * 64))
    found = await driver.get_api_key_by_prefix("abcdefgh")
    assert found is not None
    assert same(found, first)


async def test_keys_are_listed_oldest_first_and_by_principal(driver: StorageDriver) -> None:
    now = utcnow()
    for n, (prefix, principal) in enumerate([("aaaaaaaa", "alice"), ("bbbbbbbb", "bob"),
                                             ("cccccccc", "alice")]):
        await driver.create_api_key(make_key(prefix, principal=principal,
                                             created_at=now + timedelta(seconds=n)))
    assert [k.prefix for k in await driver.list_api_keys(principal=None)] == [
        "aaaaaaaa", "bbbbbbbb", "cccccccc"]
    assert [k.prefix for k in await driver.list_api_keys(principal="alice")] == [
        "aaaaaaaa", "cccccccc"]
    assert await driver.list_api_keys(principal="nobody") == []


async def test_a_key_is_revoked_once(driver: StorageDriver) -> None:
    await driver.create_api_key(make_key())
    now = utcnow()
    revoked = await driver.revoke_api_key("abcdefgh", now)
    assert revoked is not None
    assert revoked.revoked_at is not None
    assert abs((revoked.revoked_at - now).total_seconds()) < 0.01
    assert revoked.state(utcnow()) == "revoked"
    assert await driver.revoke_api_key("abcdefgh", utcnow()) is None
    assert await driver.revoke_api_key("unknown0", utcnow()) is None
    stored = await driver.get_api_key_by_prefix("abcdefgh")
    assert stored is not None
    assert stored.state(utcnow()) == "revoked"


async def test_replacing_a_key_stores_the_new_one_and_expires_the_old_one(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    await driver.create_api_key(make_key())
    new = make_key("newnewne", digest="f" * 64)
    old = await driver.replace_api_key("abcdefgh", new, now + timedelta(hours=1))
    assert old is not None
    assert old.expires_at is not None
    assert abs((old.expires_at - (now + timedelta(hours=1))).total_seconds()) < 0.01
    stored_new = await driver.get_api_key_by_prefix("newnewne")
    assert stored_new is not None
    assert same(stored_new, new)


async def test_replacing_never_extends_an_earlier_expiry(driver: StorageDriver) -> None:
    now = utcnow()
    soon = now + timedelta(minutes=5)
    await driver.create_api_key(make_key(expires_at=soon))
    old = await driver.replace_api_key("abcdefgh", make_key("newnewne"), now + timedelta(days=1))
    assert old is not None
    assert old.expires_at is not None
    assert abs((old.expires_at - soon).total_seconds()) < 0.01


async def test_a_revoked_or_unknown_key_is_not_replaced(driver: StorageDriver) -> None:
    await driver.create_api_key(make_key())
    await driver.revoke_api_key("abcdefgh", utcnow())
    later = utcnow() + timedelta(hours=1)
    assert await driver.replace_api_key("abcdefgh", make_key("newnewne"), later) is None
    assert await driver.replace_api_key("unknown0", make_key("newnewn2"), later) is None
    assert await driver.get_api_key_by_prefix("newnewne") is None
    assert await driver.get_api_key_by_prefix("newnewn2") is None


async def test_a_replacement_with_a_taken_prefix_changes_nothing(driver: StorageDriver) -> None:
    await driver.create_api_key(make_key())
    await driver.create_api_key(make_key("takentak", principal="bob"))
    with pytest.raises(ConflictError):
        await driver.replace_api_key("abcdefgh", make_key("takentak"),
                                     utcnow() + timedelta(hours=1))
    old = await driver.get_api_key_by_prefix("abcdefgh")
    assert old is not None
    assert old.expires_at is None  # the expiry was rolled back with the failed insert


async def test_last_use_is_recorded_in_batches_and_never_moves_back(
    driver: StorageDriver,
) -> None:
    await driver.create_api_key(make_key("aaaaaaaa"))
    await driver.create_api_key(make_key("bbbbbbbb"))
    now = utcnow()
    await driver.touch_api_keys([("aaaaaaaa", now), ("bbbbbbbb", now - timedelta(hours=1)),
                                 ("unknown0", now)])
    await driver.touch_api_keys([("aaaaaaaa", now - timedelta(minutes=5))])
    await driver.touch_api_keys([])
    a = await driver.get_api_key_by_prefix("aaaaaaaa")
    b = await driver.get_api_key_by_prefix("bbbbbbbb")
    assert a is not None
    assert b is not None
    assert a.last_used_at is not None
    assert b.last_used_at is not None
    assert abs((a.last_used_at - now).total_seconds()) < 0.01
    assert abs((b.last_used_at - (now - timedelta(hours=1))).total_seconds()) < 0.01


@pytest.mark.parametrize("hostile", ["x' OR '1'='1", "'; DROP TABLE api_keys; --",
                                     "abcdefgh' --", "%", "_", "\\"])
async def test_hostile_prefixes_are_plain_values(driver: StorageDriver, hostile: str) -> None:
    await driver.create_api_key(make_key())
    assert await driver.get_api_key_by_prefix(hostile) is None
    assert await driver.revoke_api_key(hostile, utcnow()) is None
    assert [k.prefix for k in await driver.list_api_keys(principal=hostile)] == []
    assert len(await driver.list_api_keys(principal=None)) == 1


# --- audit retention ----------------------------------------------------------------------


async def test_purge_audit_deletes_the_oldest_records_and_the_rest_still_verifies(
    driver: StorageDriver,
) -> None:
    now = utcnow()
    await driver.append_audit([audit_event(n, ts=now - timedelta(days=40 - n))
                               for n in range(5)])
    await driver.append_audit([audit_event(n, ts=now) for n in range(5, 8)])
    assert await driver.purge_audit(now - timedelta(days=30)) == 5
    remaining = await driver.list_audit(after_seq=0, limit=100)
    assert [e.request_id for _, e in remaining] == ["req-5", "req-6", "req-7"]
    assert verify_chain(remaining, anchor=remaining[0][1].prev_hash) is None
    assert await driver.purge_audit(now - timedelta(days=30)) == 0


async def test_purge_audit_never_opens_a_hole_in_the_chain(driver: StorageDriver) -> None:
    # Batching processes may write a record after a newer one: only the run of records
    # before the first recent one may go.
    now = utcnow()
    old, new = now - timedelta(days=40), now
    await driver.append_audit([audit_event(1, ts=old), audit_event(2, ts=new),
                               audit_event(3, ts=old), audit_event(4, ts=new)])
    assert await driver.purge_audit(now - timedelta(days=30)) == 1
    remaining = await driver.list_audit(after_seq=0, limit=100)
    assert [e.request_id for _, e in remaining] == ["req-2", "req-3", "req-4"]
    assert verify_chain(remaining, anchor=remaining[0][1].prev_hash) is None


async def test_purge_audit_keeps_the_newest_record_so_the_chain_goes_on(
    driver: StorageDriver,
) -> None:
    old = utcnow() - timedelta(days=400)
    await driver.append_audit([audit_event(n, ts=old) for n in range(3)])
    assert await driver.purge_audit(utcnow()) == 2
    await driver.append_audit([audit_event(9)])
    remaining = await driver.list_audit(after_seq=0, limit=100)
    assert [e.request_id for _, e in remaining] == ["req-2", "req-9"]
    assert verify_chain(remaining, anchor=remaining[0][1].prev_hash) is None


async def test_purge_keeps_audit_records_for_their_own_retention(driver: StorageDriver) -> None:
    now = utcnow()
    await driver.append_audit([audit_event(1, ts=now - timedelta(days=40))])
    await driver.purge(now - timedelta(days=30))
    assert len(await driver.list_audit(after_seq=0, limit=10)) == 1


async def test_tail_audit_gives_the_newest_records_in_chain_order(
    driver: StorageDriver,
) -> None:
    assert await driver.tail_audit(5) == []
    await driver.append_audit([audit_event(n) for n in range(10)])
    tail = await driver.tail_audit(3)
    assert [e.request_id for _, e in tail] == ["req-7", "req-8", "req-9"]
    assert [s for s, _ in tail] == sorted(s for s, _ in tail)


async def test_an_audit_record_deleted_from_the_middle_is_detected(
    driver: StorageDriver, storage_url: str,
) -> None:
    await driver.append_audit([audit_event(n) for n in range(7)])
    records = await driver.list_audit(after_seq=0, limit=100)
    assert (await verify_store(driver, page_size=2)).intact
    victim = records[3][0]
    await run_sql(storage_url, "DELETE FROM audit_log WHERE seq = ?", victim)
    report = await verify_store(driver, page_size=2)
    assert report.first_bad_seq == records[4][0]
