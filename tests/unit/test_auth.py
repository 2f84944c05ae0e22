"""Specification of API-key authentication: the static key backend and header parsing."""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import pytest

from robotframework_mvp import AuthenticationError, Principal, StaticKey
from robotframework_mvp.security.auth import StaticKeyBackend, credential_from_headers, hash_key

ALICE_KEY = "alice-Secret-Key-1f9c2e"
BOB_KEY = "bob-Secret-Key-77aa03"
ROOT_KEY = "root-Secret-Key-0c4f1d"


PEPPER = "pepper-for-tests"


def _backend(secret_key: str | None = PEPPER) -> StaticKeyBackend:
    return StaticKeyBackend(
        [StaticKey("alice", ALICE_KEY), StaticKey("bob", BOB_KEY), StaticKey("root", ROOT_KEY)],
        secret_key=secret_key, admin_principals=["root"],
    )


# -- StaticKeyBackend --------------------------------------------------------------------


def test_the_right_key_gives_its_principal_who_is_its_own_tenant() -> None:
    backend = _backend()
    alice = backend.authenticate(ALICE_KEY)
    assert isinstance(alice, Principal)
    assert (alice.id, alice.tenant) == ("alice", "alice")
    assert {"robots:read", "robots:write"} <= alice.scopes
    assert not alice.is_admin
    bob = backend.authenticate(BOB_KEY)
    assert bob is not None
    assert bob.id == "bob"


def test_an_admin_principal_gets_the_admin_scope() -> None:
    root = _backend().authenticate(ROOT_KEY)
    assert root is not None
    assert root.is_admin


@pytest.mark.parametrize(
    "wrong",
    ["", "nope", ALICE_KEY[:-1], ALICE_KEY + "x", ALICE_KEY.upper(), " " + ALICE_KEY,
     "alice", hashlib.sha256(ALICE_KEY.encode()).hexdigest()],
)
def test_a_wrong_key_gives_no_principal(wrong: str) -> None:
    assert _backend().authenticate(wrong) is None


def test_a_key_works_whatever_the_pepper_and_without_one() -> None:
    for pepper in ("one", "two", None):
        backend = _backend(pepper)
        principal = backend.authenticate(BOB_KEY)
        assert principal is not None
        assert principal.id == "bob"


def _every_value(obj: Any, seen: set[int] | None = None) -> list[Any]:
    """Everything reachable from ``obj`` through attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = [obj]
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _every_value(k, seen) + _every_value(v, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            found += _every_value(item, seen)
    elif attrs.has(type(obj)):
        for field in attrs.fields(type(obj)):
            found += _every_value(getattr(obj, field.name), seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        found += _every_value(vars(obj), seen)
    return found


def test_the_backend_keeps_only_digests_of_the_keys() -> None:
    backend = _backend()
    values = _every_value(backend)
    digests = [v for v in values if isinstance(v, bytes) and len(v) == 32]
    assert len(digests) == 3  # one per key, and nothing else that looks like one
    for key in (ALICE_KEY, BOB_KEY, ROOT_KEY):
        for value in values:
            if isinstance(value, str):
                assert key not in value
            if isinstance(value, (bytes, bytearray)):
                assert key.encode() not in value
                assert value != hashlib.sha256(key.encode()).digest()  # peppered, not bare
    assert all(key not in repr(backend) for key in (ALICE_KEY, BOB_KEY, ROOT_KEY))


def test_digests_are_keyed_by_the_pepper() -> None:
    assert hash_key(b"one", ALICE_KEY) == hash_key(b"one", ALICE_KEY)
    assert hash_key(b"one", ALICE_KEY) != hash_key(b"two", ALICE_KEY)
    assert hash_key(b"one", ALICE_KEY) != hash_key(b"one", BOB_KEY)


# -- credential_from_headers -------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": ALICE_KEY},
        {"x-api-key": ALICE_KEY},
        {"X-Api-Key": f"  {ALICE_KEY}  "},
        {"Authorization": f"Bearer {ALICE_KEY}"},
        {"authorization": f"bearer {ALICE_KEY}"},
        {"AUTHORIZATION": f"BEARER {ALICE_KEY}"},
        {"Accept": "application/json", "Authorization": f"Bearer   {ALICE_KEY}"},
    ],
)
def test_the_key_is_read_from_x_api_key_or_a_bearer_token_whatever_the_header_case(
    headers: dict[str, str],
) -> None:
    assert credential_from_headers(headers) == ALICE_KEY


def test_x_api_key_wins_over_authorization() -> None:
    headers = {"Authorization": f"Bearer {BOB_KEY}", "X-API-Key": ALICE_KEY}
    assert credential_from_headers(headers) == ALICE_KEY


def test_no_credential_header_means_no_credential() -> None:
    assert credential_from_headers({}) is None
    assert credential_from_headers({"Accept": "*/*", "Cookie": "a=b"}) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Basic {ALICE_KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": ALICE_KEY},
        {"Authorization": ""},
        {"X-API-Key": ""},
        {"X-API-Key": "   "},
        {"X-API-Key": "k" * 513},
        {"X-API-Key": "abc\x00def"},
        {"X-API-Key": "abc\ndef"},
        {"Authorization": "Bearer abc\x7fdef"},
    ],
)
def test_a_malformed_credential_is_refused_without_echoing_it(headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationError) as caught:
        credential_from_headers(headers)
    assert caught.value.status == 401
    assert ALICE_KEY not in str(caught.value)
    assert ALICE_KEY not in repr(caught.value.to_dict())
    assert "WWW-Authenticate" in caught.value.headers()
