"""Specification of a cache backend: every backend (memory, Redis) passes this one suite.

Each test gets its own key prefix, so runs against a shared Redis never collide. The
GCRA rule itself (``gcra()``) is specified with Hypothesis on an explicit clock, and the
Redis Lua script is checked against it call for call.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable

import anyio
import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from robotframework_mvp.cache.backend import (
    CacheBackend,
    RateDecision,
    gcra,
    rate_limit_many,
)
from robotframework_mvp.cache.redis import RedisBackend
from robotframework_mvp.config import Settings
from robotframework_mvp.plugins import BuiltinPlugin

pytestmark = pytest.mark.anyio

Keys = Callable[[str], str]


@pytest.fixture
async def backend(
    cache_url: str, redis_prefix: str, anyio_backend: str
) -> AsyncIterator[CacheBackend]:
    built = BuiltinPlugin().cache_backend(cache_url, Settings())
    assert built is not None, f"no built-in backend serves {cache_url}"
    await built.open()
    try:
        yield built
    finally:
        await built.close()


@pytest.fixture
def key(redis_prefix: str) -> Keys:
    """Names a key under this test's own prefix."""
    return lambda name: f"{redis_prefix}{name}"


async def wait_until_gone(backend: CacheBackend, name: str) -> None:
    """Poll until ``name`` has expired; fail if that takes more than 2 seconds."""
    with anyio.fail_after(2):
        while True:
            if await backend.get(name) is None:
                return
            await anyio.sleep(0.01)


# --- entries --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"hello", b"", bytes(range(256)), b"\xff\xfe\x80 not utf-8 \xc3\x28"],
    ids=["ascii", "empty", "every-byte", "invalid-utf8"],
)
async def test_a_stored_value_comes_back_byte_for_byte(
    backend: CacheBackend, key: Keys, value: bytes
) -> None:
    await backend.set(key("k"), value, 60)
    assert await backend.get(key("k")) == value


async def test_a_key_never_set_reads_as_none(backend: CacheBackend, key: Keys) -> None:
    assert await backend.get(key("never-set")) is None


async def test_delete_removes_every_named_key_and_ignores_missing_ones(
    backend: CacheBackend, key: Keys
) -> None:
    for name in ("a", "b", "c"):
        await backend.set(key(name), name.encode(), 60)
    await backend.delete(key("a"), key("b"), key("missing"))
    await backend.delete()  # nothing to delete is not an error
    assert await backend.get(key("a")) is None
    assert await backend.get(key("b")) is None
    assert await backend.get(key("c")) == b"c"


async def test_an_entry_disappears_after_its_ttl_while_a_longer_lived_one_stays(
    backend: CacheBackend, key: Keys
) -> None:
    await backend.set(key("long"), b"stays", 60)
    await backend.set(key("short"), b"goes", 0.05)
    await wait_until_gone(backend, key("short"))
    assert await backend.get(key("long")) == b"stays"


async def test_setting_a_key_again_replaces_its_value_and_its_ttl(
    backend: CacheBackend, key: Keys
) -> None:
    await backend.set(key("k"), b"first", 0.05)
    await backend.set(key("k"), b"second", 60)
    assert await backend.get(key("k")) == b"second"
    # The first TTL is over once a marker set after it has expired: the new TTL holds.
    await backend.set(key("marker"), b"", 0.05)
    await wait_until_gone(backend, key("marker"))
    assert await backend.get(key("k")) == b"second"


async def test_ping_succeeds_on_a_reachable_backend(backend: CacheBackend) -> None:
    await backend.ping()


# --- rate limits (GCRA) ---------------------------------------------------------------


async def test_a_fresh_limit_admits_exactly_count_of_many_concurrent_checks(
    backend: CacheBackend, key: Keys
) -> None:
    decisions: list[RateDecision] = []

    async def check() -> None:
        decisions.append(await backend.rate_limit(key("burst"), 5, 60))

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(check)

    admitted = [d for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    assert len(decisions) == 100
    assert len(admitted) == 5
    assert sorted(d.remaining for d in admitted) == [0, 1, 2, 3, 4]
    # The next one is allowed one emission interval (60 s / 5 = 12 s) after the burst.
    assert all(11 < d.retry_after <= 12.5 for d in refused), refused[:3]
    assert all(d.remaining == 0 and d.limit == 5 for d in refused)


async def test_remaining_counts_down_then_the_next_check_is_refused(
    backend: CacheBackend, key: Keys
) -> None:
    admitted = [await backend.rate_limit(key("k"), 5, 60) for _ in range(5)]
    assert [d.allowed for d in admitted] == [True] * 5
    assert [d.remaining for d in admitted] == [4, 3, 2, 1, 0]
    assert all(d.retry_after == 0 and d.limit == 5 for d in admitted)
    # reset_after grows by one interval (12 s) per admitted request.
    for n, d in enumerate(admitted, start=1):
        assert 12 * n - 1 < d.reset_after <= 12 * n
    sixth = await backend.rate_limit(key("k"), 5, 60)
    assert not sixth.allowed
    assert sixth.remaining == 0
    assert 11 < sixth.retry_after <= 12
    assert 59 < sixth.reset_after <= 60


async def test_a_costly_request_uses_several_slots(backend: CacheBackend, key: Keys) -> None:
    first = await backend.rate_limit(key("k"), 5, 60, cost=3)
    assert (first.allowed, first.remaining) == (True, 2)
    too_big = await backend.rate_limit(key("k"), 5, 60, cost=3)
    assert not too_big.allowed
    assert 11 < too_big.retry_after <= 12  # one more interval frees the third slot
    fits = await backend.rate_limit(key("k"), 5, 60, cost=2)
    assert (fits.allowed, fits.remaining) == (True, 0)


async def test_different_keys_are_limited_independently(backend: CacheBackend, key: Keys) -> None:
    for _ in range(5):
        assert (await backend.rate_limit(key("a"), 5, 60)).allowed
    assert not (await backend.rate_limit(key("a"), 5, 60)).allowed
    other = await backend.rate_limit(key("b"), 5, 60)
    assert (other.allowed, other.remaining) == (True, 4)


async def test_a_refused_check_does_not_count(backend: CacheBackend, key: Keys) -> None:
    for _ in range(2):
        assert (await backend.rate_limit(key("k"), 2, 60)).allowed
    refused = [await backend.rate_limit(key("k"), 2, 60) for _ in range(5)]
    assert not any(d.allowed for d in refused)
    # Refusals did not push the theoretical arrival time: the wait stays one interval.
    assert all(29 < d.retry_after <= 30 for d in refused)


async def test_a_slot_comes_back_after_one_interval(backend: CacheBackend, key: Keys) -> None:
    # 20 per second: one interval is 50 ms.
    for _ in range(20):
        assert (await backend.rate_limit(key("k"), 20, 1.0)).allowed
    refused = await backend.rate_limit(key("k"), 20, 1.0)
    assert not refused.allowed
    with anyio.fail_after(2):
        while True:
            decision = await backend.rate_limit(key("k"), 20, 1.0)
            if decision.allowed:
                break
            await anyio.sleep(0.01)
    assert decision.remaining == 0


# --- the GCRA rule itself, on an explicit clock -------------------------------------------

limits = st.tuples(st.integers(1, 10), st.floats(0.5, 100.0))  # (count, period)
steps = st.lists(
    st.tuples(st.floats(0.0, 30.0), st.integers(1, 3)),  # (seconds since last, cost)
    max_size=60,
)


def run_gcra(
    count: int, period: float, history: list[tuple[float, int]]
) -> tuple[list[tuple[float, int]], float | None]:
    """Feed ``history`` to ``gcra``; the admitted (time, cost) pairs and the final TAT."""
    tat: float | None = None
    now = 1000.0
    admitted: list[tuple[float, int]] = []
    for delta, cost in history:
        now += delta
        decision, new_tat = gcra(tat, now, count, period, cost)
        assert decision.allowed == (new_tat is not None)
        if new_tat is not None:
            tat = new_tat
            admitted.append((now, cost))
    return admitted, tat


@given(limits, steps)
def test_gcra_admits_a_burst_of_count_plus_one_slot_per_interval_in_any_window(
    limit: tuple[int, float], history: list[tuple[float, int]]
) -> None:
    """In any window of length W the admitted cost is at most count + W / interval.

    GCRA is a rate with a burst allowance, not a fixed window: a full burst at the
    start of a window plus the steady rate afterwards can admit up to 2*count - 1 in
    one period (see the next test). Within less than one interval, never more than
    ``count``.
    """
    count, period = limit
    interval = period / count
    admitted, _ = run_gcra(count, period, history)
    for i, (start, _) in enumerate(admitted):
        total = 0
        for at, cost in admitted[i:]:
            total += cost
            width = at - start
            assert total <= count + width / interval + 1e-6
            if width < interval - 1e-6:  # (clear of float rounding at the edge)
                assert total <= count


def test_gcra_is_not_a_fixed_window_a_burst_then_the_steady_rate_fit_one_period() -> None:
    count, period = 5, 60.0
    history = [(0.0, 1)] * 5 + [(12.0, 1)] * 4  # a burst at 0, then one per 12 s
    admitted, _ = run_gcra(count, period, history)
    assert len(admitted) == 9
    assert admitted[-1][0] - admitted[0][0] < period


@given(limits, steps)
def test_gcra_always_admits_a_request_one_interval_after_the_last_admitted_one(
    limit: tuple[int, float], history: list[tuple[float, int]]
) -> None:
    count, period = limit
    admitted, tat = run_gcra(count, period, history)
    if not admitted:
        return
    last_at, _ = admitted[-1]
    decision, _ = gcra(tat, last_at + period / count, count, period, 1)
    assert decision.allowed


def test_gcra_admits_a_request_arriving_exactly_at_its_allow_time() -> None:
    count, period = 2, 2.00001
    admitted, tat = run_gcra(count, period, [(21.0, 2)])
    decision, _ = gcra(tat, admitted[-1][0] + period / count, count, period, 1)
    assert decision.allowed


@given(limits, steps)
def test_gcra_decisions_are_consistent(
    limit: tuple[int, float], history: list[tuple[float, int]]
) -> None:
    count, period = limit
    tat: float | None = None
    now = 1000.0
    for delta, cost in history:
        now += delta
        decision, new_tat = gcra(tat, now, count, period, cost)
        assert decision.limit == count
        assert 0 <= decision.remaining < count
        assert decision.reset_after <= period + 1e-6
        if decision.allowed:
            assert decision.retry_after == 0
            assert new_tat is not None
            assert new_tat > now
            tat = new_tat
        else:
            assert decision.remaining == 0
            # Never longer than the request's own share of the period.
            assert 0 < decision.retry_after <= period / count * cost + 1e-6
            assert new_tat is None


# --- the Redis script agrees with gcra() -----------------------------------------------


async def test_the_redis_script_takes_the_same_decisions_as_gcra(
    redis_url: str, redis_prefix: str
) -> None:
    from robotframework_mvp.cache.redis import RedisBackend

    backend = RedisBackend(redis_url)
    await backend.open()
    try:
        k = f"{redis_prefix}agree"
        count, period = 4, 10.0
        costs = [1, 2, 1, 1, 3, 1, 2, 1, 1, 1]
        tat: float | None = None
        # The script reports the server time it decided at as a fifth element, so the
        # reference can be run at the very same instant.
        script = backend._gcra
        assert script is not None
        for cost in costs:
            [reply] = await script(keys=[k], args=[count, repr(period), cost])
            now = float(reply[4])
            expected, new_tat = gcra(tat, now, count, period, cost)
            got = RateDecision(
                bool(int(reply[0])), count, int(reply[1]), float(reply[2]), float(reply[3])
            )
            assert (got.allowed, got.remaining) == (expected.allowed, expected.remaining)
            assert math.isclose(got.retry_after, expected.retry_after, abs_tol=1e-6)
            assert math.isclose(got.reset_after, expected.reset_after, abs_tol=1e-6)
            if new_tat is not None:
                tat = new_tat
                stored = await backend.client.get(k)
                assert stored is not None
                assert math.isclose(float(stored), new_tat, abs_tol=1e-6)
                # The key lives exactly as long as the limit needs it.
                pttl = await backend.client.pttl(k)
                assert 0 < pttl <= math.ceil((new_tat - now) * 1000)

        # And the public method builds its RateDecision from the same reply.
        decision = await backend.rate_limit(f"{redis_prefix}fresh", count, period, 2)
        assert decision == RateDecision(True, count, 2, 0.0, decision.reset_after)
        assert math.isclose(decision.reset_after, 5.0, abs_tol=0.05)
    finally:
        await backend.close()


Check = tuple[int, int, float]  # (key number, count, period)


# The fixtures give a URL and a prefix: each example makes its own keys under it.
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from([1, 2, 3, 5]),
                          st.sampled_from([1.0, 10.0, 60.0])), min_size=1, max_size=30),
       st.lists(st.tuples(st.integers(0, 2), st.sampled_from([1, 2, 3, 5]),
                          st.sampled_from([1.0, 10.0, 60.0])), max_size=10))
def test_the_redis_script_decides_a_batch_as_gcra_would_one_check_after_another(
    redis_url: str, redis_prefix: str, before: list[Check], batch: list[Check],
) -> None:
    # Checks of one batch (keys named again, limits mixed) get the decisions that gcra()
    # gives the same checks in order at the script's instant, after what came before.
    from robotframework_mvp.cache.redis import RedisBackend

    async def run() -> None:
        backend = RedisBackend(redis_url)
        await backend.open()
        prefix = f"{redis_prefix}{uuid.uuid4().hex}:"
        script = backend._gcra
        assert script is not None
        tats: dict[str, float] = {}
        try:
            for checks in (before, batch):
                if not checks:
                    continue
                keys = [f"{prefix}{n}" for n, _, _ in checks]
                args: list[object] = []
                for _, count, period in checks:
                    args += [count, repr(period), 1]
                replies = await script(keys=keys, args=args)
                now = float(replies[0][4])
                for key_, (_, count, period), reply in zip(keys, checks, replies,
                                                           strict=True):
                    assert float(reply[4]) == now  # one instant for the whole batch
                    expected, new_tat = gcra(tats.get(key_), now, count, period)
                    assert (bool(int(reply[0])), int(reply[1])) == (
                        expected.allowed, expected.remaining)
                    assert math.isclose(float(reply[2]), expected.retry_after, abs_tol=1e-6)
                    assert math.isclose(float(reply[3]), expected.reset_after, abs_tol=1e-6)
                    if new_tat is not None:
                        tats[key_] = new_tat
            # The public method gives the same decisions as the script.
            decisions = await backend.rate_limit_many(
                [(f"{prefix}public", 2, 60.0)] * 3)
            assert [(d.allowed, d.remaining) for d in decisions] == [
                (True, 1), (True, 0), (False, 0)]
        finally:
            await backend.close()

    anyio.run(run)


async def test_rate_limit_many_decides_as_rate_limit_one_after_another(
    backend: CacheBackend, key: Keys
) -> None:
    # Every backend, with or without a rate_limit_many of its own.
    decisions = await rate_limit_many(
        backend, [(key("a"), 2, 60.0), (key("b"), 1, 60.0), (key("a"), 2, 60.0),
                  (key("a"), 2, 60.0), (key("b"), 1, 60.0)])
    assert [(d.allowed, d.remaining) for d in decisions] == [
        (True, 1), (True, 0), (True, 0), (False, 0), (False, 0)]
    assert (await backend.rate_limit(key("a"), 2, 60.0)).allowed is False


# --- writes that other processes hear (Redis) ---------------------------------------------


@pytest.fixture
async def redis_backend(redis_url: str, anyio_backend: str) -> AsyncIterator[RedisBackend]:
    built = RedisBackend(redis_url)
    await built.open()
    try:
        yield built
    finally:
        await built.close()


async def test_write_many_keeps_existing_keys_of_only_new_and_replaces_the_others(
    redis_backend: RedisBackend, key: Keys,
) -> None:
    await redis_backend.set_many([(key("kept"), b"newer"), (key("replaced"), b"old")], 60)
    await redis_backend.write_many([(key("replaced"), b"new", 60)],
                                   [(key("kept"), b"first", 60), (key("fresh"), b"first", 60)])
    assert await redis_backend.get(key("kept")) == b"newer"
    assert await redis_backend.get(key("replaced")) == b"new"
    assert await redis_backend.get(key("fresh")) == b"first"


#: one write_many entry: (its TTL, only where the key does not exist, the key exists already)
Entry = tuple[float, bool, bool]


# Running and ended robots have different TTLs and are flushed together, in one call.
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([-1.0, 0.0, 5.0, 30.0, 3600.0]), st.booleans(),
                          st.booleans()), max_size=12))
def test_write_many_sets_each_key_with_its_own_expiry_in_one_call(
    redis_url: str, redis_prefix: str, entries: list[Entry],
) -> None:
    async def run() -> None:
        backend = RedisBackend(redis_url)
        await backend.open()
        prefix = f"{redis_prefix}{uuid.uuid4().hex}:"
        keys = [f"{prefix}{i}" for i in range(len(entries))]
        try:
            await backend.set_many([(k, b"old") for k, (_, _, exists) in zip(
                keys, entries, strict=True) if exists], 60)
            only_new = [(k, b"new", ttl) for k, (ttl, nx, _) in zip(keys, entries, strict=True)
                        if nx]
            items = [(k, b"new", ttl) for k, (ttl, nx, _) in zip(keys, entries, strict=True)
                     if not nx]
            assert await backend.write_many(items, only_new) == 0
            for k, (ttl, nx, exists) in zip(keys, entries, strict=True):
                if nx and exists:  # only where it does not exist: the old value stays
                    expected, ms = b"old", 60_000.0
                elif ttl <= 0:  # expired on arrival: gone (or never set, for only_new)
                    expected, ms = None, 0.0
                else:
                    expected, ms = b"new", ttl * 1000
                assert await backend.get(k) == expected, (k, ttl, nx, exists)
                if expected is not None:
                    assert ms - 2_000 < await backend.client.pttl(k) <= ms
        finally:
            await backend.close()

    anyio.run(run)


async def test_a_subscriber_hears_an_announcement_after_the_values_it_came_with(
    redis_backend: RedisBackend, key: Keys,
) -> None:
    channel = key("announcements")
    assert await redis_backend.write_many([], [], (channel, b"nobody")) == 0
    async with redis_backend.subscribe(channel) as subscription:
        heard_by = await redis_backend.write_many(
            [(key("a"), b"1", 60)], [(key("b"), b"2", 60)], (channel, b"a b"))
        assert heard_by == 1
        with anyio.fail_after(5):
            message = await subscription.receive(5)
        assert message == b"a b"
        # Set in the same script, before the message went out.
        assert await redis_backend.get(key("a")) == b"1"
        assert await redis_backend.get(key("b")) == b"2"


async def test_an_idle_subscription_answers_none_and_then_fails_once_its_connection_dies(
    redis_backend: RedisBackend, key: Keys, redis_url: str,
) -> None:
    """A subscriber must learn that it may have missed messages: a killed connection
    raises (redis-py reconnecting by itself is reported the same way)."""
    channel = key("announcements")
    async with redis_backend.subscribe(channel) as subscription:
        assert await subscription.receive(0.05) is None  # idle: nothing, and a PING sent
        killer = redis.asyncio.Redis.from_url(redis_url)
        try:
            killed = await killer.client_kill_filter(_type="pubsub")
        finally:
            await killer.aclose()
        assert killed >= 1
        async def until_it_fails() -> None:
            while True:
                await subscription.receive(0.05)

        with anyio.fail_after(10):
            with pytest.raises(ConnectionError):
                await until_it_fails()
