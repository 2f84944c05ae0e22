"""A principal reads, lists, cancels and retries only its own tenant's robots; another
tenant's robot looks exactly like a missing one (404), and ids cannot be guessed."""

from __future__ import annotations

import uuid

import pytest
from secsite import Site

pytestmark = pytest.mark.anyio


async def test_another_tenants_robot_is_404_for_every_route(site: Site) -> None:
    robot = (await site.submit("alice", {"secret": "acme data"})).body
    bob = site.headers("bob")
    missing = await site.api.get_robot(str(uuid.uuid4()), bob, "c")
    for response in (
        await site.api.get_robot(robot["id"], bob, "c"),
        await site.api.cancel_robot(robot["id"], bob, "c"),
        await site.api.retry_robot(robot["id"], bob, "c"),
        await site.api.list_executions(robot["id"], bob, "c"),
    ):
        assert response.status == 404
        assert response.body["error"]["type"] == missing.body["error"]["type"]
        assert "acme" not in str(response.body)
    listed = await site.api.list_robots({}, bob, "c")
    assert listed.body["items"] == []
    # ... and the robot is untouched by bob's attempts.
    still = await site.api.get_robot(robot["id"], site.headers("alice"), "c")
    assert still.body["status"] != "cancelled"


async def test_principals_of_one_tenant_share_its_robots(site: Site) -> None:
    robot = (await site.submit("alice")).body
    carol = site.headers("carol")
    assert (await site.api.get_robot(robot["id"], carol, "c")).status == 200
    assert [r["id"] for r in (await site.api.list_robots({}, carol, "c")).body["items"]] == [
        robot["id"]]


async def test_an_admin_sees_and_cancels_every_tenants_robots(site: Site) -> None:
    a = (await site.submit("alice", delay=600)).body
    b = (await site.submit("bob", delay=600)).body
    admin = site.headers("admin")
    listed = {r["id"] for r in (await site.api.list_robots({}, admin, "c")).body["items"]}
    assert {a["id"], b["id"]} <= listed
    assert (await site.api.cancel_robot(b["id"], admin, "c")).body["status"] == "cancelled"


async def test_a_cursor_from_another_tenant_reveals_nothing(site: Site) -> None:
    for _ in range(3):
        await site.submit("alice")
    alice_page = await site.api.list_robots({"limit": "1"}, site.headers("alice"), "c")
    cursor = alice_page.body["next_cursor"]
    assert cursor is not None
    bob_page = await site.api.list_robots({"cursor": cursor}, site.headers("bob"), "c")
    assert bob_page.status == 200
    assert bob_page.body["items"] == []


async def test_idempotency_keys_never_return_another_tenants_robot(site: Site) -> None:
    mine = (await site.submit("alice", {"who": "alice"}, idempotency_key="order-1")).body
    theirs = (await site.submit("bob", {"who": "bob"}, idempotency_key="order-1")).body
    assert mine["id"] != theirs["id"]
    assert theirs["payload"] == {"who": "bob"}
    assert theirs["tenant"] == "globex"


async def test_robot_ids_are_not_guessable_from_a_known_one(site: Site) -> None:
    ids = [(await site.submit("alice")).body["id"] for _ in range(20)]
    # UUIDv7: 48 bits of time, then 74 random bits; neighbours of a known id are not ids.
    randoms = {i.replace("-", "")[13:] for i in ids}
    assert len(randoms) == 20
    known = ids[-1].replace("-", "")
    for delta in (1, -1, 2, 256):
        neighbour = f"{int(known, 16) + delta:032x}"
        guess = str(uuid.UUID(neighbour))
        assert guess not in ids
        assert (await site.api.get_robot(guess, site.headers("alice"), "c")).status == 404
