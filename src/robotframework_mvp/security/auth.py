"""Authentication: credentials from request headers, and the static API-key backend.

Keys are never kept in clear text: at startup each static key is replaced by its
HMAC-SHA-256 under a server pepper (``RFMVP_SECRET_KEY``, or random per process), and a
presented key is hashed the same way and compared against every stored digest with
``hmac.compare_digest`` (no early exit), so timing tells an attacker nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping

import attrs

from ..config import StaticKey
from ..errors import AuthenticationError
from ..models import Principal

__all__ = [
    "MalformedCredential",
    "StaticKeyBackend",
    "check_credential",
    "credential_from_headers",
    "hash_key",
    "request_credential",
]

_MAX_CREDENTIAL_LENGTH = 512


def hash_key(pepper: bytes, key: str) -> bytes:
    return hmac.new(pepper, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()


def credential_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key from ``X-API-Key`` or ``Authorization: Bearer`` (header names any case)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    key = lowered.get("x-api-key")
    if key is None:
        auth = lowered.get("authorization")
        if auth is not None:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError(
                    "the Authorization header must be 'Bearer <api key>'"
                )
            key = token
    if key is None:
        return None
    return check_credential(key.strip())


def check_credential(key: str) -> str:
    """``key``, or AuthenticationError when no backend could accept it (empty, over 512
    characters, or holding control characters such as CR, LF or NUL)."""
    if not key or len(key) > _MAX_CREDENTIAL_LENGTH or not key.isprintable():
        raise AuthenticationError("the API key is malformed")
    return key


class MalformedCredential(str):
    """Stands for a credential the request carried in a form no backend accepts.

    Its text is a fixed placeholder (the caller's input is not kept), and ``reason`` says
    what is wrong. The security layer refuses it like a wrong key: audited, and counted
    against the client address's failed-authentication limit.
    """

    reason: str

    def __new__(cls, reason: str) -> MalformedCredential:
        credential = super().__new__(cls, "<malformed credential>")
        credential.reason = reason
        return credential


def request_credential(headers: Mapping[str, str]) -> str | None:
    """``credential_from_headers``, with a malformed credential handed on as a
    ``MalformedCredential`` (for the security layer to refuse) instead of raised here."""
    try:
        return credential_from_headers(headers)
    except AuthenticationError as exc:
        return MalformedCredential(exc.message)


@attrs.frozen
class _StoredKey:
    digest: bytes = attrs.field(repr=False)
    principal: Principal


class StaticKeyBackend:
    """``RFMVP_API_KEYS``: each principal is its own tenant with read and write scopes."""

    def __init__(
        self,
        keys: Iterable[StaticKey],
        *,
        secret_key: str | None,
        admin_principals: Iterable[str] = (),
    ) -> None:
        self._pepper = (secret_key or secrets.token_hex(32)).encode()
        admins = set(admin_principals)
        self._keys = tuple(
            _StoredKey(
                digest=hash_key(self._pepper, key.key),
                principal=Principal(
                    id=key.principal,
                    tenant=key.principal,
                    scopes=frozenset({"robots:read", "robots:write"})
                    | ({"admin"} if key.principal in admins else set()),
                ),
            )
            for key in keys
        )

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, credential: str) -> Principal | None:
        digest = hash_key(self._pepper, credential)
        found: Principal | None = None
        for stored in self._keys:  # visit every key: timing does not depend on which matched
            if hmac.compare_digest(stored.digest, digest):
                found = stored.principal
        return found
