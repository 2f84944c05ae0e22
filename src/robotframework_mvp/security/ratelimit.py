"""Rate limiting with GCRA, shared through the cache backend when it can be.

The cache backend runs check-and-count atomically (so a Redis cache gives one limit
across every process). When the backend cannot answer, the limiter falls back to an
in-process limit and says so in ``status``, rather than failing every request.
"""

from __future__ import annotations

from ..cache.backend import RateDecision
from ..cache.manager import CacheManager
from ..cache.memory import MemoryBackend
from ..config import RateLimit

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, cache: CacheManager) -> None:
        self.cache = cache
        self._local = MemoryBackend(max_entries=100_000)
        self.rejections = 0
        self.fallbacks = 0

    @property
    def status(self) -> str:
        return "shared" if self.cache.status == "ok" else "local"

    async def check(self, key: str, limit: RateLimit) -> RateDecision:
        decision = await self.cache.rate_limit(key, limit.count, limit.period)
        if decision is None:
            self.fallbacks += 1
            decision = await self._local.rate_limit(key, limit.count, limit.period)
        if not decision.allowed:
            self.rejections += 1
        return decision
