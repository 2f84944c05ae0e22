"""Circuit breakers and retry backoff: how the framework copes with failing dependencies.

This module owns the in-process failure-handling primitives. ``CircuitBreaker`` is a pure
state machine (no I/O, no locks: it lives on one event loop) that counts the outcomes of
the last ``BreakerPolicy.window_size`` calls to one dependency, opens when too many of
them failed (or were too slow), refuses calls with ``CircuitOpenError`` (a 503) while
open, and after ``open_seconds`` lets a few trial calls through (half-open) to decide
whether to close again; every transition can be reported through an ``on_change``
callback and inspected with ``snapshot()``. ``backoff_delay`` computes the full-jitter
exponential backoff between attempts of a robot, and ``infrastructure_retrying`` builds
the short ``tenacity`` retry loop used around infrastructure calls (storage, cache) that
fail transiently.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import tenacity

from .errors import ServiceUnavailableError

__all__ = [
    "BreakerPolicy",
    "BreakerSnapshot",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "backoff_delay",
    "infrastructure_retrying",
]

T = TypeVar("T")

OnChange = Callable[[str, "CircuitState", "CircuitState"], None]


class CircuitState(enum.StrEnum):
    """Where a breaker is: letting calls through, refusing them, or testing recovery."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# --- policy -------------------------------------------------------------------------------


def _fraction(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(
            f"{attribute.name} must be a fraction above 0 and at most 1, got {value!r}"
        )


def _positive_int(_: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a whole number above 0, got {value!r}")


def _positive_seconds(_: Any, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(
            f"{attribute.name} must be a finite number of seconds above 0, got {value!r}"
        )


def _minimum_calls(instance: BreakerPolicy, attribute: attrs.Attribute[int], value: int) -> None:
    _positive_int(instance, attribute, value)
    if value > instance.window_size:
        raise ValueError(
            f"minimum_calls ({value}) must not exceed window_size ({instance.window_size}): "
            "the breaker could never open"
        )


@attrs.frozen
class BreakerPolicy:
    """When a breaker opens, how long it stays open, and how it tests recovery.

    ``failure_rate_threshold`` is the fraction of failed calls among the last
    ``window_size`` calls at which the breaker opens, but only once at least
    ``minimum_calls`` calls are in the window. After ``open_seconds`` the breaker goes
    half-open and admits ``half_open_max_calls`` trial calls: all must succeed to close
    it, one failure reopens it. A success slower than ``slow_call_seconds`` (when set)
    counts as a failure.
    """

    failure_rate_threshold: float = attrs.field(default=0.5, validator=_fraction)
    window_size: int = attrs.field(default=20, validator=_positive_int)
    minimum_calls: int = attrs.field(default=10, validator=_minimum_calls)
    open_seconds: float = attrs.field(default=30.0, validator=_positive_seconds)
    half_open_max_calls: int = attrs.field(default=3, validator=_positive_int)
    slow_call_seconds: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive_seconds)
    )


_DEFAULT_POLICY = BreakerPolicy()


@attrs.frozen
class BreakerSnapshot:
    """A breaker's state at one moment, for health endpoints, metrics and logs.

    ``opened_at`` is the clock time the breaker last opened (``None`` while closed);
    ``retry_after`` the seconds until an open breaker goes half-open (0 otherwise).
    """

    name: str
    state: CircuitState
    failure_rate: float
    calls_in_window: int
    opened_at: float | None
    retry_after: float


class CircuitOpenError(ServiceUnavailableError):
    """A call was refused because its circuit breaker is open (or half-open and busy)."""

    type = "circuit_open"

    def __init__(self, breaker: str, retry_after: float) -> None:
        if retry_after > 0:
            message = f"Circuit breaker {breaker!r} is open; retry in {retry_after:.1f} seconds"
        else:
            message = (
                f"Circuit breaker {breaker!r} is half-open and already testing recovery; "
                "retry in a moment"
            )
        super().__init__(message, breaker=breaker, retry_after=round(retry_after, 3))
        self.breaker = breaker
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


# --- breaker ------------------------------------------------------------------------------


class CircuitBreaker:
    """Closed → open → half-open → closed state machine guarding one dependency.

    Use ``call(fn)``, or ``allow()`` before a call and ``record_success()`` /
    ``record_failure()`` after it. Records are attributed to the state the breaker is in
    when they arrive; records that arrive while it is open are ignored (they come from
    calls that began before it opened). ``call()`` goes further and drops the outcome of
    a call admitted before the latest transition, so a call that began before the breaker
    opened never counts as a half-open trial.

    Not thread-safe by design: use one breaker from one event loop. ``on_change`` is
    called after every transition, with the state already updated; it should not raise
    (an exception propagates to whoever caused the transition).
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy = _DEFAULT_POLICY,
        clock: Callable[[], float] = time.monotonic,
        *,
        on_change: OnChange | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        # True marks a failed call; ``_failures`` is the number of True in the window.
        self._window: deque[bool] = deque(maxlen=policy.window_size)
        self._failures = 0
        self._opened_at: float | None = None
        self._trials_admitted = 0
        self._trial_successes = 0
        # Bumped on every transition (and force); lets ``call()`` spot stale outcomes.
        self._epoch = 0
        #: how many times the breaker entered each state (for metrics)
        self.transitions: Counter[CircuitState] = Counter()

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state.value}>"

    # --- reading --------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose time is up turns half-open here."""
        self._refresh()
        return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker goes half-open; 0 when it is not open."""
        self._refresh()
        if self._state is not CircuitState.OPEN or self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.policy.open_seconds - self._clock())

    def snapshot(self) -> BreakerSnapshot:
        """The breaker's state, failure rate and timing, frozen at this moment."""
        retry_after = self.retry_after()  # refreshes the state first
        calls = len(self._window)
        return BreakerSnapshot(
            name=self.name,
            state=self._state,
            failure_rate=self._failures / calls if calls else 0.0,
            calls_in_window=calls,
            opened_at=self._opened_at,
            retry_after=retry_after,
        )

    # --- admitting and recording ------------------------------------------------------------

    def allow(self) -> bool:
        """Whether a call may go ahead now; a half-open breaker admits a few trial calls."""
        self._refresh()
        if self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.OPEN:
            return False
        if self._trials_admitted < self.policy.half_open_max_calls:
            self._trials_admitted += 1
            return True
        return False

    def permits(self) -> int | None:
        """How many calls ``allow()`` would admit now, without admitting any.

        ``None`` while closed (no limit), 0 while open, and the trial calls left while
        half-open. A caller that takes work in batches (a worker claiming robots) asks
        this first, then calls ``allow()`` once per call it actually makes.
        """
        self._refresh()
        if self._state is CircuitState.CLOSED:
            return None
        if self._state is CircuitState.OPEN:
            return 0
        return max(0, self.policy.half_open_max_calls - self._trials_admitted)

    @property
    def epoch(self) -> int:
        """A number that changes at every transition: note it when ``allow()`` admits a
        call, and record the call's outcome only if it has not changed since (a call
        admitted before the latest transition says nothing about the new state)."""
        self._refresh()
        return self._epoch

    def give_back(self, epoch: int) -> None:
        """A call admitted at ``epoch`` ended without an outcome (cancelled, abandoned):
        return its trial slot when the breaker is still in that half-open period."""
        self._refresh()
        if epoch == self._epoch and self._state is CircuitState.HALF_OPEN \
                and self._trials_admitted > 0:
            self._trials_admitted -= 1

    def record_success(self, duration: float | None = None) -> None:
        """Count a successful call; one slower than ``slow_call_seconds`` is a failure."""
        slow = self.policy.slow_call_seconds
        self._record(failed=duration is not None and slow is not None and duration > slow)

    def record_failure(self) -> None:
        """Count a failed call."""
        self._record(failed=True)

    def force(self, state: CircuitState) -> None:
        """Put the breaker in ``state`` now (operators, tests), starting that state afresh.

        Forcing ``OPEN`` restarts the open timer; forcing ``CLOSED`` empties the window.
        ``on_change`` is called only when the state actually changes.
        """
        self._enter(CircuitState(state))

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` through the breaker and record how it went.

        Raises ``CircuitOpenError`` without calling ``fn`` when the breaker refuses the
        call. An ``Exception`` from ``fn`` is recorded as a failure and re-raised; a
        ``BaseException`` (cancellation, exit) records nothing, and gives back the trial
        slot of a half-open breaker.
        """
        if not self.allow():
            raise CircuitOpenError(self.name, self.retry_after())
        epoch = self._epoch
        started = self._clock()
        try:
            result = await fn()
        except Exception:
            if self._epoch == epoch:
                self.record_failure()
            raise
        except BaseException:
            if self._epoch == epoch and self._state is CircuitState.HALF_OPEN:
                self._trials_admitted -= 1
            raise
        if self._epoch == epoch:
            self.record_success(self._clock() - started)
        return result

    # --- internals --------------------------------------------------------------------------

    def _refresh(self) -> None:
        if (
            self._state is CircuitState.OPEN
            and self._opened_at is not None
            and self._clock() >= self._opened_at + self.policy.open_seconds
        ):
            self._enter(CircuitState.HALF_OPEN)

    def _record(self, *, failed: bool) -> None:
        self._refresh()
        if self._state is CircuitState.CLOSED:
            if len(self._window) == self._window.maxlen and self._window[0]:
                self._failures -= 1
            self._window.append(failed)
            self._failures += failed
            calls = len(self._window)
            if (
                calls >= self.policy.minimum_calls
                and self._failures / calls >= self.policy.failure_rate_threshold
            ):
                self._enter(CircuitState.OPEN)
        elif self._state is CircuitState.HALF_OPEN:
            if failed:
                self._enter(CircuitState.OPEN)
            else:
                self._trial_successes += 1
                if self._trial_successes >= self.policy.half_open_max_calls:
                    self._enter(CircuitState.CLOSED)
        # OPEN: the call began before the breaker opened; its outcome says nothing new.

    def _enter(self, new: CircuitState) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self._window.clear()
        self._failures = 0
        self._trials_admitted = 0
        self._trial_successes = 0
        if new is CircuitState.OPEN:
            self._opened_at = self._clock()
        elif new is CircuitState.CLOSED:
            self._opened_at = None
        if old is not new:
            self.transitions[new] += 1
            if self._on_change is not None:
                self._on_change(self.name, old, new)


# --- backoff and retries ------------------------------------------------------------------


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first attempt).

    Exponential backoff with full jitter: uniform in ``[0, min(cap, base * 2**(attempt-1))]``,
    which spreads retries of many callers instead of having them retry in lockstep. Huge
    attempt numbers simply give the cap.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be a whole number of at least 1, got {attempt!r}")
    if not 0 <= base < math.inf:
        raise ValueError(f"base must be a finite number of seconds of at least 0, got {base!r}")
    if not 0 <= cap < math.inf:
        raise ValueError(f"cap must be a finite number of seconds of at least 0, got {cap!r}")
    try:
        ceiling = min(cap, math.ldexp(base, attempt - 1))
    except OverflowError:
        ceiling = cap
    uniform = rng.uniform if rng is not None else random.uniform
    return min(ceiling, max(0.0, uniform(0.0, ceiling)))


def infrastructure_retrying(
    is_transient: Callable[[BaseException], bool],
    attempts: int = 3,
    base: float = 0.05,
    cap: float = 1.0,
) -> tenacity.AsyncRetrying:
    """A short retry loop for infrastructure calls (storage, cache) that fail transiently.

    Retries only errors ``is_transient`` accepts, at most ``attempts`` attempts in all,
    waiting a full-jitter exponential backoff (``base`` seconds widening up to ``cap``)
    between them, and re-raises the last error itself rather than a ``RetryError``::

        async for attempt in infrastructure_retrying(is_transient):
            with attempt:
                await connection.execute(...)
    """
    if attempts < 1:
        raise ValueError(f"attempts must be a whole number above 0, got {attempts!r}")
    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_random_exponential(multiplier=base, max=cap),
        reraise=True,
    )
