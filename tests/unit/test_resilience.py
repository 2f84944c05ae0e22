"""Specification of the circuit breaker, backoff and infrastructure retries.

Time is a fake clock the tests advance by hand: nothing here sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from fractions import Fraction

import anyio
import pytest
import tenacity
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from robotframework_mvp.errors import ServiceUnavailableError
from robotframework_mvp.resilience import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    backoff_delay,
    infrastructure_retrying,
)

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Transition = tuple[str, CircuitState, CircuitState]


def make_breaker(
    clock: FakeClock, transitions: list[Transition] | None = None, **policy: object
) -> CircuitBreaker:
    on_change: Callable[[str, CircuitState, CircuitState], None] | None = None
    if transitions is not None:
        on_change = lambda *change: transitions.append(change)  # noqa: E731
    return CircuitBreaker("storage", BreakerPolicy(**policy), clock, on_change=on_change)  # type: ignore[arg-type]


def open_breaker(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.policy.minimum_calls):
        breaker.record_failure()
    assert breaker.state is OPEN


# --- policy -------------------------------------------------------------------------------


def test_default_policy() -> None:
    policy = BreakerPolicy()
    assert policy.failure_rate_threshold == 0.5
    assert policy.window_size == 20
    assert policy.minimum_calls == 10
    assert policy.open_seconds == 30.0
    assert policy.half_open_max_calls == 3
    assert policy.slow_call_seconds is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("failure_rate_threshold", 0.0, "failure_rate_threshold must be a fraction"),
        ("failure_rate_threshold", 1.5, "failure_rate_threshold must be a fraction"),
        ("failure_rate_threshold", float("nan"), "failure_rate_threshold must be a fraction"),
        ("window_size", 0, "window_size must be a whole number above 0"),
        ("window_size", 2.5, "window_size must be a whole number above 0"),
        ("minimum_calls", 0, "minimum_calls must be a whole number above 0"),
        ("minimum_calls", 21, "minimum_calls (21) must not exceed window_size (20)"),
        ("open_seconds", 0.0, "open_seconds must be a finite number of seconds above 0"),
        ("open_seconds", float("inf"), "open_seconds must be a finite number of seconds"),
        ("half_open_max_calls", -1, "half_open_max_calls must be a whole number above 0"),
        ("slow_call_seconds", -0.5, "slow_call_seconds must be a finite number of seconds"),
    ],
)
def test_policy_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BreakerPolicy(**{field: value})  # type: ignore[arg-type]


# --- closed -> open -----------------------------------------------------------------------


def test_a_new_breaker_is_closed_and_allows_calls() -> None:
    breaker = make_breaker(FakeClock())
    assert breaker.state is CLOSED
    assert breaker.allow()
    assert breaker.retry_after() == 0.0


def test_opens_only_once_minimum_calls_are_in_the_window() -> None:
    breaker = make_breaker(FakeClock(), minimum_calls=5, window_size=10)
    for _ in range(4):
        breaker.record_failure()
    assert breaker.state is CLOSED, "100% failures, but only 4 of the 5 minimum calls"
    breaker.record_failure()
    assert breaker.state is OPEN


def test_opens_exactly_at_the_failure_rate_threshold() -> None:
    breaker = make_breaker(FakeClock(), failure_rate_threshold=0.5, window_size=4, minimum_calls=4)
    for _ in range(3):
        breaker.record_success()
    breaker.record_failure()
    assert breaker.state is CLOSED, "1 failure in 4 calls is below 50%"
    breaker.record_failure()  # the window slides to [ok, ok, fail, fail]: exactly 50%
    assert breaker.state is OPEN


def test_old_outcomes_slide_out_of_the_window() -> None:
    breaker = make_breaker(FakeClock(), failure_rate_threshold=0.5, window_size=4, minimum_calls=4)
    breaker.record_failure()
    for _ in range(4):
        breaker.record_success()
    assert breaker.snapshot().failure_rate == 0.0
    assert breaker.snapshot().calls_in_window == 4


def test_opening_empties_the_window_and_starts_the_timer() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, open_seconds=30.0)
    open_breaker(breaker)
    snapshot = breaker.snapshot()
    assert snapshot.state is OPEN
    assert snapshot.calls_in_window == 0
    assert snapshot.opened_at == clock.now
    assert snapshot.retry_after == 30.0


# --- open -> half-open -> closed or open ----------------------------------------------------


def test_open_refuses_until_open_seconds_then_half_open_admits_only_the_trial_calls() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, open_seconds=30.0, half_open_max_calls=3)
    open_breaker(breaker)

    clock.advance(29.5)
    assert not breaker.allow()
    assert breaker.state is OPEN
    assert breaker.retry_after() == pytest.approx(0.5)

    clock.advance(0.5)
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() == 0.0
    assert [breaker.allow() for _ in range(5)] == [True, True, True, False, False]


def test_outcomes_recorded_while_open_are_ignored() -> None:
    breaker = make_breaker(FakeClock(), minimum_calls=2)
    open_breaker(breaker)
    breaker.record_success()
    breaker.record_failure()
    assert breaker.snapshot().calls_in_window == 0
    assert breaker.state is OPEN


def test_a_failure_while_half_open_reopens_and_restarts_the_timer() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, open_seconds=10.0)
    open_breaker(breaker)
    clock.advance(10.0)
    assert breaker.allow()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.snapshot().opened_at == clock.now
    assert breaker.retry_after() == 10.0


def test_half_open_max_calls_successes_close_the_breaker_with_an_empty_window() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, half_open_max_calls=3)
    open_breaker(breaker)
    clock.advance(breaker.policy.open_seconds)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_success()
    assert breaker.state is HALF_OPEN, "2 of the 3 trial calls succeeded so far"
    assert breaker.allow()
    breaker.record_success()
    snapshot = breaker.snapshot()
    assert snapshot.state is CLOSED
    assert snapshot.calls_in_window == 0
    assert snapshot.opened_at is None
    assert breaker.allow()


# --- slow calls ---------------------------------------------------------------------------


def test_successes_slower_than_slow_call_seconds_count_as_failures() -> None:
    breaker = make_breaker(FakeClock(), minimum_calls=3, slow_call_seconds=1.0)
    breaker.record_success(duration=1.0)  # exactly the limit is not slow
    breaker.record_success(duration=None)  # unknown duration is not slow
    assert breaker.snapshot().failure_rate == 0.0
    breaker.record_success(duration=1.5)
    breaker.record_success(duration=2.0)
    assert breaker.state is OPEN, "2 slow calls out of 4 reach the 50% threshold"


def test_a_slow_trial_call_reopens_a_half_open_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, slow_call_seconds=1.0)
    open_breaker(breaker)
    clock.advance(breaker.policy.open_seconds)
    assert breaker.allow()
    breaker.record_success(duration=5.0)
    assert breaker.state is OPEN


def test_slow_calls_are_not_failures_without_a_slow_call_limit() -> None:
    breaker = make_breaker(FakeClock(), minimum_calls=2)
    for _ in range(5):
        breaker.record_success(duration=1e6)
    assert breaker.state is CLOSED


# --- on_change and force ------------------------------------------------------------------


def test_on_change_reports_every_transition() -> None:
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make_breaker(clock, transitions, minimum_calls=2, half_open_max_calls=1)
    open_breaker(breaker)
    clock.advance(breaker.policy.open_seconds)
    breaker.allow()
    breaker.record_failure()
    clock.advance(breaker.policy.open_seconds)
    breaker.allow()
    breaker.record_success()
    assert transitions == [
        ("storage", CLOSED, OPEN),
        ("storage", OPEN, HALF_OPEN),
        ("storage", HALF_OPEN, OPEN),
        ("storage", OPEN, HALF_OPEN),
        ("storage", HALF_OPEN, CLOSED),
    ]


def test_force_sets_the_state_and_reports_only_real_changes() -> None:
    clock = FakeClock()
    transitions: list[Transition] = []
    breaker = make_breaker(clock, transitions, open_seconds=10.0)
    breaker.force(OPEN)
    assert not breaker.allow()
    clock.advance(4.0)
    breaker.force(OPEN)  # restarts the timer, no transition
    assert breaker.retry_after() == 10.0
    breaker.force(HALF_OPEN)
    breaker.force(CLOSED)
    breaker.force(CLOSED)
    assert transitions == [
        ("storage", CLOSED, OPEN),
        ("storage", OPEN, HALF_OPEN),
        ("storage", HALF_OPEN, CLOSED),
    ]
    assert breaker.allow()


# --- call() -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_call_refuses_with_circuit_open_error_while_open() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, open_seconds=30.0)
    open_breaker(breaker)
    clock.advance(12.0)
    called = False

    async def operation() -> str:
        nonlocal called
        called = True
        return "ok"

    with pytest.raises(CircuitOpenError) as raised:
        await breaker.call(operation)
    error = raised.value
    assert not called
    assert isinstance(error, ServiceUnavailableError)
    assert error.status == 503
    assert error.type == "circuit_open"
    assert "storage" in error.message
    assert "18.0 seconds" in error.message
    assert error.retry_after == 18.0
    assert error.headers() == {"Retry-After": "18"}
    assert error.to_dict()["error"]["type"] == "circuit_open"


@pytest.mark.anyio
async def test_call_refuses_a_busy_half_open_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, half_open_max_calls=1)
    open_breaker(breaker)
    clock.advance(breaker.policy.open_seconds)
    assert breaker.allow()  # the one trial call is out

    async def operation() -> None:
        return None

    with pytest.raises(CircuitOpenError, match="half-open") as raised:
        await breaker.call(operation)
    assert raised.value.headers() == {"Retry-After": "1"}


@pytest.mark.anyio
async def test_call_records_successes_and_failures_and_reraises() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=4, window_size=4, slow_call_seconds=1.0)

    async def ok() -> int:
        return 42

    async def slow() -> int:
        clock.advance(2.0)
        return 7

    async def boom() -> int:
        raise ConnectionError("down")

    assert await breaker.call(ok) == 42
    assert await breaker.call(slow) == 7  # returned, but counted as a failure
    with pytest.raises(ConnectionError, match="down"):
        await breaker.call(boom)
    assert breaker.snapshot().calls_in_window == 3
    assert breaker.snapshot().failure_rate == pytest.approx(2 / 3)
    assert await breaker.call(ok) == 42
    assert breaker.state is OPEN  # 2 failures in 4 calls


class _Abort(BaseException):
    pass


@pytest.mark.anyio
async def test_call_records_nothing_for_base_exceptions() -> None:
    breaker = make_breaker(FakeClock())

    async def abort() -> None:
        raise _Abort

    with pytest.raises(_Abort):
        await breaker.call(abort)
    assert breaker.snapshot().calls_in_window == 0


@pytest.mark.anyio
async def test_a_cancelled_trial_call_gives_its_half_open_slot_back() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, half_open_max_calls=1)
    open_breaker(breaker)
    clock.advance(breaker.policy.open_seconds)

    async def hang() -> None:
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        scope.cancel()
        await breaker.call(hang)
    assert breaker.state is HALF_OPEN
    assert breaker.allow(), "the cancelled trial call no longer holds the only slot"


@pytest.mark.anyio
async def test_a_call_that_began_before_the_breaker_opened_is_not_a_trial_call() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, minimum_calls=2, half_open_max_calls=1)
    release = anyio.Event()

    async def slow_ok() -> str:
        await release.wait()
        return "late"

    results: list[str] = []

    async def run() -> None:
        results.append(await breaker.call(slow_ok))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await anyio.wait_all_tasks_blocked()
        open_breaker(breaker)
        clock.advance(breaker.policy.open_seconds)
        assert breaker.state is HALF_OPEN
        release.set()
    assert results == ["late"]
    assert breaker.state is HALF_OPEN, "the stale success must not close the breaker"


# --- backoff_delay ------------------------------------------------------------------------


@given(
    attempt=st.integers(min_value=1, max_value=3000),
    base=st.floats(min_value=0, max_value=100, allow_nan=False),
    cap=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    seed=st.integers(),
)
def test_backoff_delay_stays_between_zero_and_the_capped_exponential(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0 <= delay <= min(Fraction(cap), Fraction(base) * 2 ** (attempt - 1))


def test_backoff_delay_does_not_overflow_for_huge_attempts() -> None:
    for attempt in (1024, 1025, 10_000, 10**9):
        assert 0 <= backoff_delay(attempt, 1.0, 60.0) <= 60.0


def test_backoff_delay_is_reproducible_with_a_seeded_rng() -> None:
    first = [backoff_delay(n, 0.5, 30.0, random.Random(7)) for n in range(1, 8)]
    second = [backoff_delay(n, 0.5, 30.0, random.Random(7)) for n in range(1, 8)]
    assert first == second


def test_backoff_delay_uses_full_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(4, 1.0, 100.0, rng) for _ in range(500)]
    assert max(delays) <= 8.0
    assert min(delays) < 1.0, "full jitter reaches down to 0, not just half the ceiling"


@pytest.mark.parametrize(
    ("attempt", "base", "cap"),
    [(0, 1.0, 1.0), (-1, 1.0, 1.0), (1, -1.0, 1.0), (1, 1.0, float("inf"))],
)
def test_backoff_delay_rejects_bad_arguments(attempt: int, base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        backoff_delay(attempt, base, cap)


# --- infrastructure_retrying --------------------------------------------------------------


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, ConnectionError)


def _recording(retrying: tenacity.AsyncRetrying, sleeps: list[float]) -> tenacity.AsyncRetrying:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    return retrying.copy(sleep=sleep)


def _failing(times: int, error: Exception) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    calls: list[int] = []

    async def operation() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "ok"

    return operation, calls


@pytest.mark.anyio
async def test_infrastructure_retrying_retries_a_transient_error() -> None:
    sleeps: list[float] = []
    retrying = _recording(
        infrastructure_retrying(_is_transient, attempts=3, base=0.05, cap=1.0), sleeps
    )
    operation, calls = _failing(2, ConnectionError("reset"))
    assert await retrying(operation) == "ok"
    assert len(calls) == 3
    assert len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.05
    assert 0 <= sleeps[1] <= 0.1


@pytest.mark.anyio
async def test_infrastructure_retrying_works_as_an_async_for_loop() -> None:
    operation, calls = _failing(1, ConnectionError("reset"))
    result = None
    async for attempt in _recording(infrastructure_retrying(_is_transient), []):
        with attempt:
            result = await operation()
    assert result == "ok"
    assert len(calls) == 2


@pytest.mark.anyio
async def test_infrastructure_retrying_does_not_retry_other_errors() -> None:
    sleeps: list[float] = []
    operation, calls = _failing(1, ValueError("bad query"))
    with pytest.raises(ValueError, match="bad query"):
        await _recording(infrastructure_retrying(_is_transient), sleeps)(operation)
    assert len(calls) == 1
    assert sleeps == []


@pytest.mark.anyio
async def test_infrastructure_retrying_gives_up_after_attempts_with_the_error_itself() -> None:
    operation, calls = _failing(10, ConnectionError("still down"))
    with pytest.raises(ConnectionError, match="still down"):
        await _recording(infrastructure_retrying(_is_transient, attempts=4), [])(operation)
    assert len(calls) == 4


def test_infrastructure_retrying_needs_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="attempts"):
        infrastructure_retrying(_is_transient, attempts=0)


# --- stateful model -----------------------------------------------------------------------


class ReferenceBreaker:
    """The breaker's rules, written as plainly as possible (not as efficiently)."""

    def __init__(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self.state = CLOSED
        self.outcomes: list[bool] = []  # True = failed, newest last
        self.opened_at: float | None = None
        self.admitted = 0
        self.successes = 0
        self.transitions: list[tuple[CircuitState, CircuitState]] = []

    def go(self, new: CircuitState, now: float) -> None:
        if new != self.state:
            self.transitions.append((self.state, new))
        self.state = new
        self.outcomes, self.admitted, self.successes = [], 0, 0
        if new == OPEN:
            self.opened_at = now
        if new == CLOSED:
            self.opened_at = None

    def tick(self, now: float) -> None:
        if self.state == OPEN and now >= self.opened_at + self.policy.open_seconds:  # type: ignore[operator]
            self.go(HALF_OPEN, now)

    def allow(self, now: float) -> bool:
        self.tick(now)
        if self.state == HALF_OPEN and self.admitted < self.policy.half_open_max_calls:
            self.admitted += 1
            return True
        return self.state == CLOSED

    def record(self, failed: bool, now: float) -> None:
        self.tick(now)
        if self.state == CLOSED:
            self.outcomes = [*self.outcomes, failed][-self.policy.window_size :]
            rate = sum(self.outcomes) / len(self.outcomes)
            if len(self.outcomes) >= self.policy.minimum_calls and rate >= (
                self.policy.failure_rate_threshold
            ):
                self.go(OPEN, now)
        elif self.state == HALF_OPEN:
            if failed:
                self.go(OPEN, now)
            else:
                self.successes += 1
                if self.successes == self.policy.half_open_max_calls:
                    self.go(CLOSED, now)


@st.composite
def policies(draw: st.DrawFn) -> BreakerPolicy:
    window_size = draw(st.integers(1, 6))
    return BreakerPolicy(
        failure_rate_threshold=draw(st.sampled_from([0.2, 0.5, 2 / 3, 1.0]) | st.floats(0.01, 1.0)),
        window_size=window_size,
        minimum_calls=draw(st.integers(1, window_size)),
        open_seconds=float(draw(st.integers(1, 20))),
        half_open_max_calls=draw(st.integers(1, 4)),
        slow_call_seconds=draw(st.none() | st.just(1.0)),
    )


class BreakerMachine(RuleBasedStateMachine):
    @initialize(policy=policies())
    def start(self, policy: BreakerPolicy) -> None:
        self.clock = FakeClock(0.0)
        self.model = ReferenceBreaker(policy)
        self.reported: list[tuple[CircuitState, CircuitState]] = []
        self.trials_admitted = 0  # counted from allow() results, per half-open period
        self.closed_records = 0  # records since the breaker last became CLOSED
        self.breaker = CircuitBreaker("model", policy, self.clock, on_change=self.on_change)

    def on_change(self, name: str, old: CircuitState, new: CircuitState) -> None:
        assert name == "model"
        assert old != new
        self.reported.append((old, new))
        if new == HALF_OPEN:
            self.trials_admitted = 0
        if new == CLOSED:
            self.closed_records = 0

    def record(self, failed: bool, do: Callable[[], None]) -> None:
        was_closed = self.breaker.state == CLOSED
        do()
        self.model.record(failed, self.clock.now)
        if was_closed:
            self.closed_records += 1
            if self.breaker.state == OPEN:
                assert self.closed_records >= self.model.policy.minimum_calls

    @rule()
    def success(self) -> None:
        self.record(False, self.breaker.record_success)

    @rule()
    def failure(self) -> None:
        self.record(True, self.breaker.record_failure)

    @rule(duration=st.sampled_from([0.0, 0.5, 1.0, 1.5, 30.0]))
    def timed_success(self, duration: float) -> None:
        slow = self.model.policy.slow_call_seconds
        self.record(
            slow is not None and duration > slow,
            lambda: self.breaker.record_success(duration),
        )

    @rule(seconds=st.integers(0, 25))
    def advance_clock(self, seconds: int) -> None:
        self.clock.advance(float(seconds))

    @rule()
    def allow(self) -> None:
        was_open = self.breaker.state == OPEN
        allowed = self.breaker.allow()
        assert allowed == self.model.allow(self.clock.now)
        if was_open:
            assert not allowed, "an open breaker let a call through before its timeout"
        if allowed and self.breaker.state == HALF_OPEN:
            self.trials_admitted += 1

    @rule()
    def permits(self) -> None:
        permits = self.breaker.permits()
        self.model.tick(self.clock.now)
        if self.model.state == CLOSED:
            assert permits is None
        elif self.model.state == OPEN:
            assert permits == 0
        else:
            assert permits == self.model.policy.half_open_max_calls - self.model.admitted

    @rule(stale=st.booleans())
    def give_back(self, stale: bool) -> None:
        """A call admitted now (or before the latest transition) ends without an outcome."""
        epoch = self.breaker.epoch
        self.model.tick(self.clock.now)
        self.breaker.give_back(epoch - 1 if stale else epoch)
        if not stale and self.model.state == HALF_OPEN and self.model.admitted > 0:
            self.model.admitted -= 1
            self.trials_admitted -= 1

    @rule(state=st.sampled_from(CircuitState))
    def force(self, state: CircuitState) -> None:
        self.breaker.force(state)
        self.model.go(state, self.clock.now)
        self.trials_admitted = 0
        self.closed_records = 0

    @invariant()
    def matches_the_reference_model(self) -> None:
        state = self.breaker.state
        self.model.tick(self.clock.now)
        assert state == self.model.state
        assert self.reported == self.model.transitions
        snapshot = self.breaker.snapshot()
        assert snapshot.calls_in_window == len(self.model.outcomes)
        assert snapshot.opened_at == self.model.opened_at

    @invariant()
    def open_means_before_the_timeout(self) -> None:
        if self.breaker.state == OPEN:
            opened_at = self.breaker.snapshot().opened_at
            assert opened_at is not None
            assert self.clock.now < opened_at + self.model.policy.open_seconds
            assert self.breaker.retry_after() > 0

    @invariant()
    def half_open_admits_at_most_the_trial_calls(self) -> None:
        assert self.trials_admitted <= self.model.policy.half_open_max_calls


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_matches_its_reference_model = BreakerMachine.TestCase
