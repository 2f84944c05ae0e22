"""Rate limits as an attacker meets them: per principal, per key, per failing address,
atomic under concurrency, and what happens while the shared limiter (Redis) is down."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from robotframework_mvp import (
    AuthenticationError,
    RateLimit,
    RateLimitedError,
    ServiceUnavailableError,
    StaticKey,
    hookimpl,
)
from robotframework_mvp.cache.backend import CacheBackend, RateDecision
from robotframework_mvp.cache.memory import MemoryBackend
from robotframework_mvp.config import Settings
from robotframework_mvp.http import HttpApi
from robotframework_mvp.security.keys import create_key
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator

pytestmark = pytest.mark.anyio

PEPPER = "rate-limit-tests-pepper-000000000"
OTHER_KEY = "other-principal-key-4242"


class FlakyBackend(MemoryBackend):
    """A "shared" cache whose server can be switched off (as if Redis went down)."""

    name = "flaky"

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def rate_limit(self, key: str, count: int, period: float, cost: int = 1
                         ) -> RateDecision:
        if self.down:
            raise ConnectionError("connection refused")
        return await super().rate_limit(key, count, period, cost)

    async def ping(self) -> None:
        if self.down:
            raise ConnectionError("connection refused")


class FlakyCachePlugin:
    def __init__(self) -> None:
        self.backend = FlakyBackend()

    @hookimpl
    def cache_backend(self, url: str, settings: Settings) -> CacheBackend | None:
        return self.backend if url.startswith("flaky://") else None


def limited(count: int, period: float = 60.0, **security: Any) -> dict[str, Any]:
    return {"security": {"rate_limit": RateLimit(count, period), "secret_key": PEPPER,
                         "api_keys": (StaticKey("tester", TEST_API_KEY),
                                      StaticKey("other", OTHER_KEY)), **security},
            "worker": {"enabled": False}}


async def attempt(orch: Any, key: str = TEST_API_KEY, client: str = "10.0.0.1") -> str:
    try:
        await orch.list(api_key=key, client=client)
    except RateLimitedError:
        return "limited"
    except ServiceUnavailableError:
        return "unavailable"
    return "ok"


# -- atomic check-and-count -----------------------------------------------------------------


@pytest.mark.parametrize("cache", ["memory", "redis"])
async def test_100_concurrent_requests_against_a_fresh_5_per_minute_limit_admit_exactly_5(
    request: pytest.FixtureRequest, cache: str, anyio_backend: str,
) -> None:
    changes = limited(5)
    if cache == "redis":
        changes["cache"] = {"url": request.getfixturevalue("redis_url"),
                            "key_prefix": request.getfixturevalue("redis_prefix")}
    async with running_orchestrator(**changes) as orch:
        outcomes: list[str] = []

        async def one() -> None:
            outcomes.append(await attempt(orch))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(one)
        assert outcomes.count("ok") == 5
        assert outcomes.count("limited") == 95


async def test_each_principal_has_its_own_budget(anyio_backend: str) -> None:
    async with running_orchestrator(**limited(3)) as orch:
        assert [await attempt(orch) for _ in range(4)] == ["ok", "ok", "ok", "limited"]
        assert await attempt(orch, OTHER_KEY) == "ok"


async def test_a_stored_key_with_its_own_limit_uses_it_instead_of_the_default(
    anyio_backend: str,
) -> None:
    async with running_orchestrator(**limited(2)) as orch:
        generous, _ = await create_key(orch.driver, PEPPER, principal="batch",
                                       rate_limit=RateLimit(10, 60.0))
        strict, _ = await create_key(orch.driver, PEPPER, principal="batch",
                                     rate_limit=RateLimit(1, 60.0))
        plain, _ = await create_key(orch.driver, PEPPER, principal="web")
        assert [await attempt(orch, generous) for _ in range(11)].count("ok") == 10
        assert [await attempt(orch, strict) for _ in range(3)] == ["ok", "limited", "limited"]
        assert [await attempt(orch, plain) for _ in range(3)] == ["ok", "ok", "limited"]


# -- headers --------------------------------------------------------------------------------


async def test_every_answer_carries_the_ratelimit_headers_and_429_a_retry_after(
    anyio_backend: str,
) -> None:
    async with running_orchestrator(**limited(3)) as orch:
        api = HttpApi(orch)
        headers = {"X-API-Key": TEST_API_KEY}
        seen = [await api.list_robots({}, headers, "10.0.0.1") for _ in range(4)]
        assert [r.status for r in seen] == [200, 200, 200, 429]
        assert [r.headers["RateLimit-Limit"] for r in seen] == ["3"] * 4
        assert [r.headers["RateLimit-Remaining"] for r in seen] == ["2", "1", "0", "0"]
        assert all(int(r.headers["RateLimit-Reset"]) >= 1 for r in seen)
        assert int(seen[3].headers["Retry-After"]) >= 1
        # Errors after the limit check carry them too; a request with no key does not.
        missing = await api.get_robot("nope", headers, "10.0.0.1")
        assert missing.status in (404, 429)
        assert "RateLimit-Limit" in missing.headers
        anonymous = await api.list_robots({}, {}, "10.0.0.1")
        assert anonymous.status == 401
        assert "RateLimit-Limit" not in anonymous.headers
        assert json.dumps(anonymous.body).count(TEST_API_KEY) == 0


# -- failed authentications -------------------------------------------------------------------


async def test_failed_authentications_are_limited_per_address_and_spare_other_addresses(
    anyio_backend: str,
) -> None:
    async with running_orchestrator(**limited(1000, auth_failure_limit=RateLimit(5, 60.0))) as orch:
        outcomes = []
        for n in range(8):
            try:
                await orch.list(api_key=f"guess-{n:04d}-xxxxxxxx", client="203.0.113.9")
                outcomes.append("ok")
            except RateLimitedError:
                outcomes.append("limited")
            except Exception as exc:
                outcomes.append(type(exc).__name__)
        assert outcomes == ["AuthenticationError"] * 5 + ["limited"] * 3
        assert await attempt(orch, client="198.51.100.7") == "ok"
        with pytest.raises(AuthenticationError):  # refused, but not rate limited
            await orch.list(api_key="guess-from-elsewhere-1", client="198.51.100.7")


# -- when the shared limiter is down ---------------------------------------------------------


async def run_with_flaky_cache(fallback: str, count: int = 3
                               ) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
    plugin = FlakyCachePlugin()
    changes = limited(count, rate_limit_fallback=fallback)
    changes["cache"] = {"url": "flaky://"}
    async with running_orchestrator(plugins=[plugin], **changes) as orch:
        healthy = (await orch.health())["components"]["rate_limiter"]
        plugin.backend.down = True
        outcomes = [await attempt(orch) for _ in range(count + 3)]
        report = await orch.health()
        return outcomes, healthy, report


async def test_while_redis_is_down_the_local_fallback_counts_in_process(
    anyio_backend: str,
) -> None:
    outcomes, healthy, report = await run_with_flaky_cache("local")
    assert healthy == {"status": "ok", "mode": "shared", "fallback": "local", "fallbacks": 0}
    assert outcomes == ["ok", "ok", "ok", "limited", "limited", "limited"]
    limiter = report["components"]["rate_limiter"]
    assert (limiter["status"], limiter["mode"], limiter["fallback"]) == ("degraded", "local",
                                                                         "local")
    assert report["status"] == "degraded"


async def test_while_redis_is_down_the_open_fallback_admits_everything(
    anyio_backend: str,
) -> None:
    outcomes, _, report = await run_with_flaky_cache("open")
    assert outcomes == ["ok"] * 6
    assert report["components"]["rate_limiter"]["mode"] == "open"


async def test_while_redis_is_down_the_closed_fallback_refuses_with_503(
    anyio_backend: str,
) -> None:
    outcomes, _, report = await run_with_flaky_cache("closed")
    assert outcomes == ["unavailable"] * 6
    assert report["components"]["rate_limiter"]["mode"] == "closed"
    plugin = FlakyCachePlugin()
    changes = limited(3, rate_limit_fallback="closed")
    changes["cache"] = {"url": "flaky://"}
    async with running_orchestrator(plugins=[plugin], **changes) as orch:
        plugin.backend.down = True
        response = await HttpApi(orch).list_robots({}, {"X-API-Key": TEST_API_KEY}, "c")
        assert response.status == 503
        assert "RFMVP_RATE_LIMIT_FALLBACK" in response.body["error"]["message"]


async def test_a_real_redis_reports_the_shared_mode(
    redis_url: str, redis_prefix: str, anyio_backend: str,
) -> None:
    changes = limited(3)
    changes["cache"] = {"url": redis_url, "key_prefix": redis_prefix}
    async with running_orchestrator(**changes) as orch:
        limiter = (await orch.health())["components"]["rate_limiter"]
        assert (limiter["status"], limiter["mode"]) == ("ok", "shared")


async def test_the_memory_cache_reports_the_local_mode(anyio_backend: str) -> None:
    async with running_orchestrator(**limited(3)) as orch:
        limiter = (await orch.health())["components"]["rate_limiter"]
        assert (limiter["status"], limiter["mode"]) == ("ok", "local")
