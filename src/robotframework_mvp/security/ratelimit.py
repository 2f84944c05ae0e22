"""Rate limiting with GCRA, shared through the cache backend when it can be.

The cache backend runs check-and-count atomically (so a Redis cache gives one limit
across every process). When a shared backend cannot answer, the limiter does what
``RFMVP_RATE_LIMIT_FALLBACK`` says: count in this process (``local``, the default),
admit everything (``open``), or refuse with 503 (``closed``); ``health()`` says which
mode it is in, for ``/health``.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from ..cache.backend import RateDecision
from ..cache.manager import CacheManager
from ..cache.memory import MemoryBackend
from ..config import RateLimit
from ..errors import ServiceUnavailableError

__all__ = ["FALLBACK_MODES", "RATE_DECISION", "RateLimiter"]

FALLBACK_MODES = ("local", "open", "closed")

#: the principal's rate-limit decision of the request being served (None before one is
#: taken): the HTTP layer turns it into RateLimit-* headers on every response
RATE_DECISION: ContextVar[RateDecision | None] = ContextVar("rfmvp_rate_decision",
                                                            default=None)


class RateLimiter:
    def __init__(self, cache: CacheManager, fallback: str = "local") -> None:
        if fallback not in FALLBACK_MODES:
            raise ValueError(f"fallback must be one of {FALLBACK_MODES}, not {fallback!r}")
        self.cache = cache
        self.fallback = fallback
        self._local = MemoryBackend(max_entries=100_000)
        self.rejections = 0
        #: checks the shared backend could not answer (each handled by ``fallback``)
        self.fallbacks = 0

    @property
    def shared(self) -> bool:
        """Whether the backend is shared by processes (not the in-process memory cache)."""
        return self.cache.backend.name != "memory"

    @property
    def status(self) -> str:
        """The mode right now: ``shared``, ``local`` (this process counts), ``open`` or
        ``closed`` (the last three while a shared backend is down, per the fallback)."""
        if not self.shared:
            return "local"
        return "shared" if self.cache.status == "ok" else self.fallback

    def health(self) -> dict[str, Any]:
        """The ``rate_limiter`` component of ``/health``."""
        degraded = self.shared and self.cache.status != "ok"
        return {"status": "degraded" if degraded else "ok", "mode": self.status,
                "fallback": self.fallback, "fallbacks": self.fallbacks}

    async def check(self, key: str, limit: RateLimit) -> RateDecision | None:
        """Count one request against ``limit``; None when admitted unchecked (``open``).

        Raises ServiceUnavailableError when the shared backend is down and the fallback
        is ``closed``.
        """
        decision = await self.cache.rate_limit(key, limit.count, limit.period)
        if decision is None:
            self.fallbacks += 1
            if self.fallback == "open":
                return None
            if self.fallback == "closed":
                raise ServiceUnavailableError(
                    "rate limits cannot be checked: the shared cache is unreachable and "
                    "RFMVP_RATE_LIMIT_FALLBACK is closed; retry later")
            decision = await self._local.rate_limit(key, limit.count, limit.period)
        if not decision.allowed:
            self.rejections += 1
        return decision
