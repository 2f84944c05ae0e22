"""Store-backed API keys: created, listed, rotated and revoked with ``rfmvp keys``.

A key reads ``rfmvp_<prefix>_<secret>``. The prefix (8 base32 characters) is public: it
names the key in listings and the audit trail, and finds its row with one indexed read.
The secret (32 random bytes, URL-safe base64) is shown once, when the key is created,
and never stored: the store keeps only ``HMAC-SHA-256(pepper, prefix:secret)``, where
the pepper is derived from ``RFMVP_SECRET_KEY``, so a copy of the database alone lets
nobody use a key. A presented key is hashed the same way and compared with
``hmac.compare_digest``; an unknown prefix is compared against a dummy digest, so timing
does not tell whether a prefix exists.

No key is cached in process memory beyond one request: every request reads its key's
row, so a revocation (or an expiry) holds on the very next request in every process.
Only the last-used time is deferred: it is written at most once per
``RFMVP_API_KEY_TOUCH_INTERVAL`` per key, in batches, by a background task.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import anyio

from ..config import RateLimit
from ..errors import AuthenticationError, ConfigError, ConflictError, ValidationError
from ..group_commit import GroupCommitter
from ..models import ApiKey, Principal, new_id, utcnow
from ..state.driver import StorageDriver

__all__ = [
    "DEFAULT_SCOPES",
    "SCOPES",
    "StoredKeyBackend",
    "create_key",
    "key_digest",
    "parse_duration",
    "require_pepper",
    "rotate_key",
    "split_key",
]

log = logging.getLogger(__name__)

#: every scope a stored key may carry
SCOPES = frozenset({"robots:read", "robots:write", "admin"})
DEFAULT_SCOPES = frozenset({"robots:read", "robots:write"})

_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_PREFIX_LENGTH = 8
_SECRET_BYTES = 32
_KEY = re.compile(r"rfmvp_([a-z2-7]{8})_([A-Za-z0-9_-]{43})")
_DUMMY_DIGEST = "0" * 64
#: how often, at most, queued last-used times are written
_FLUSH_PERIOD = 5.0
_MAX_TRACKED_KEYS = 100_000
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def require_pepper(secret_key: str | None) -> bytes:
    """The key-hashing pepper derived from ``RFMVP_SECRET_KEY``; ConfigError without it.

    A random per-process pepper would make stored keys unverifiable after a restart (and
    by every other process), so stored keys need the secret key set, the same in every
    process.
    """
    if not secret_key:
        raise ConfigError(
            "RFMVP_SECRET_KEY is not set: stored API keys are kept as HMACs under it, so "
            "set it (a long random string, the same in every process, e.g. from "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`) and try again"
        )
    # A key of its own, so these digests never equal the static keys' digests.
    return hmac.new(secret_key.encode(), b"rfmvp stored api keys v1", hashlib.sha256).digest()


def key_digest(pepper: bytes, prefix: str, secret: str) -> str:
    """What the store keeps of a key: the hex HMAC-SHA-256 of ``prefix:secret``."""
    return hmac.new(pepper, f"{prefix}:{secret}".encode(), hashlib.sha256).hexdigest()


def split_key(credential: str) -> tuple[str, str] | None:
    """``(prefix, secret)`` of a well-formed stored key; None for anything else."""
    match = _KEY.fullmatch(credential)
    return None if match is None else (match.group(1), match.group(2))


def _new_prefix() -> str:
    return "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(_PREFIX_LENGTH))


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``15m``, ``90s``, ``2w`` (or ``1d12h``) as a timedelta."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValidationError(
            f"{text[:32]!r} is not a duration; write e.g. 90s, 15m, 12h, 30d or 2w")
    return timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))


def _check_scopes(scopes: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(scopes)
    unknown = sorted(chosen - SCOPES)
    if unknown:
        raise ValidationError(
            f"unknown scope {unknown[0][:32]!r}; use {', '.join(sorted(SCOPES))}")
    if not chosen:
        raise ValidationError("a key needs at least one scope")
    return chosen


def _check_name(value: str, what: str) -> str:
    if not 0 < len(value) <= 200 or not value.isprintable():
        raise ValidationError(f"{what} must be 1 to 200 printable characters")
    return value


async def create_key(
    driver: StorageDriver,
    secret_key: str | None,
    *,
    principal: str,
    tenant: str | None = None,
    scopes: Iterable[str] = DEFAULT_SCOPES,
    expires_at: datetime | None = None,
    rate_limit: RateLimit | None = None,
    description: str = "",
    now: datetime | None = None,
) -> tuple[str, ApiKey]:
    """Store a new key; return the key itself (show it once) and what is stored."""
    pepper = require_pepper(secret_key)
    record = _new_record(
        pepper, principal=_check_name(principal, "principal"),
        tenant=_check_name(tenant or principal, "tenant"), scopes=_check_scopes(scopes),
        expires_at=expires_at, rate_limit=rate_limit, description=description,
        now=now or utcnow(),
    )
    for _ in range(5):  # 40-bit prefixes: a collision is rare, two in a row rarer still
        key, stored = record()
        if await driver.create_api_key(stored):
            return key, stored
    raise ConfigError("could not find a free key prefix; try again")  # pragma: no cover


async def rotate_key(
    driver: StorageDriver,
    secret_key: str | None,
    prefix: str,
    *,
    grace: timedelta,
    now: datetime | None = None,
) -> tuple[str, ApiKey, ApiKey] | None:
    """Replace a key: a new one for the same principal, tenant, scopes, limit and
    description, while the old one keeps working for ``grace``, then expires.

    Returns ``(new key, new record, old record)``; None when the old key does not exist
    or was revoked. An expiry the old key had is kept for the new one only as a length
    of time: the new key lives as long as the old one was meant to.
    """
    pepper = require_pepper(secret_key)
    now = now or utcnow()
    old = await driver.get_api_key_by_prefix(prefix)
    if old is None or old.revoked_at is not None:
        return None
    expires_at = None if old.expires_at is None else now + (old.expires_at - old.created_at)
    record = _new_record(
        pepper, principal=old.principal, tenant=old.tenant, scopes=old.scopes,
        expires_at=expires_at, rate_limit=old.rate_limit, description=old.description,
        now=now,
    )
    for _ in range(5):
        key, stored = record()
        try:
            updated = await driver.replace_api_key(prefix, stored, now + grace)
        except ConflictError:  # the new prefix is taken: draw another
            continue
        return None if updated is None else (key, stored, updated)
    raise ConfigError("could not find a free key prefix; try again")  # pragma: no cover


def _new_record(pepper: bytes, *, principal: str, tenant: str, scopes: frozenset[str],
                expires_at: datetime | None, rate_limit: RateLimit | None, description: str,
                now: datetime) -> Callable[[], tuple[str, ApiKey]]:
    def make() -> tuple[str, ApiKey]:
        prefix, secret = _new_prefix(), secrets.token_urlsafe(_SECRET_BYTES)
        stored = ApiKey(
            id=new_id(), prefix=prefix, digest=key_digest(pepper, prefix, secret),
            principal=principal, tenant=tenant, scopes=scopes, created_at=now,
            expires_at=expires_at, rate_limit=rate_limit, description=description[:500],
        )
        return f"rfmvp_{prefix}_{secret}", stored

    return make


class StoredKeyBackend:
    """The ``authenticate`` backend for stored keys (a built-in plugin, see validator.py).

    Without ``RFMVP_SECRET_KEY`` it recognises no key (stored keys cannot be verified).
    """

    def __init__(self, driver: StorageDriver, secret_key: str | None,
                 touch_interval: float) -> None:
        self.driver = driver
        self.touch_interval = touch_interval
        self._pepper: bytes | None = None if not secret_key else require_pepper(secret_key)
        self._pending: dict[str, datetime] = {}
        self._queued_at: dict[str, float] = {}
        self._warned = False
        self.touch_errors = 0
        # Requests that arrive while a key is being read share the next read: its row is
        # still read after the request arrived (a revocation counts at once), but 32
        # requests at a time cost one round trip instead of 32.
        self._lookups: GroupCommitter[str, ApiKey | None] = GroupCommitter(
            self._read_keys, first_turn=False)

    async def authenticate(self, credential: str) -> Principal | None:
        parts = split_key(credential)
        if parts is None:
            return None  # not a stored key: other backends may know it
        if self._pepper is None:
            if not self._warned:
                self._warned = True
                log.warning("a stored API key was presented, but RFMVP_SECRET_KEY is not set, "
                            "so stored keys cannot be verified; refusing it")
            return None
        prefix, secret = parts
        stored = await self._lookups.write(prefix)
        digest = key_digest(self._pepper, prefix, secret)
        # Compare even when the prefix is unknown: the time taken does not say which.
        matches = hmac.compare_digest(_DUMMY_DIGEST if stored is None else stored.digest,
                                      digest)
        if stored is None or not matches:
            return None
        now = utcnow()
        state = stored.state(now)
        if state == "revoked":
            raise AuthenticationError("this API key has been revoked; ask for a new one")
        if state == "expired":
            raise AuthenticationError("this API key has expired; ask for a new one")
        self._record_use(prefix, now)
        return Principal(id=stored.principal, tenant=stored.tenant, scopes=stored.scopes,
                         key_prefix=prefix, rate_limit=stored.rate_limit)

    def group_commits(self) -> dict[str, GroupCommitter[Any, Any]]:
        """The key reads that share round trips, by name, for ``/metrics`` (as the
        StateManager's and the CacheManager's)."""
        return {"stored_key_reads": self._lookups}

    async def _read_keys(self, prefixes: Sequence[str]) -> list[ApiKey | None]:
        read_many = getattr(self.driver, "get_api_keys_by_prefixes", None)
        if read_many is None:  # a third-party driver without the batch read
            return [await self.driver.get_api_key_by_prefix(p) for p in prefixes]
        found: dict[str, ApiKey] = await read_many(sorted(set(prefixes)))
        return [found.get(p) for p in prefixes]

    # -- last used ---------------------------------------------------------------------

    def _record_use(self, prefix: str, now: datetime) -> None:
        tick = time.monotonic()
        queued = self._queued_at.get(prefix)
        if queued is not None and tick - queued < self.touch_interval:
            return
        if len(self._queued_at) >= _MAX_TRACKED_KEYS:
            cutoff = tick - self.touch_interval
            self._queued_at = {p: t for p, t in self._queued_at.items() if t >= cutoff}
        self._queued_at[prefix] = tick
        self._pending[prefix] = now

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Write the queued last-used times in one batch (best effort: a failure drops
        them, and the next use of each key queues it again)."""
        if not self._pending:
            return
        batch, self._pending = sorted(self._pending.items()), {}
        try:
            await self.driver.touch_api_keys(batch)
        except Exception as exc:
            self.touch_errors += 1
            for prefix, _ in batch:
                self._queued_at.pop(prefix, None)
            log.warning("recording when %d API keys were last used failed (%s)", len(batch),
                        type(exc).__name__)

    async def run(self) -> None:
        """Flush queued last-used times periodically until cancelled, and once at the end."""
        try:
            while True:
                await anyio.sleep(min(self.touch_interval, _FLUSH_PERIOD))
                with anyio.CancelScope(shield=True):  # a write under way finishes
                    await self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()
