"""Fail fast while the store is down: the write-side circuit breaker of a PostgreSQL store.

Without it, a request that meets a dead PostgreSQL waits for a pooled connection for the
whole pool timeout (``RFMVP_STORAGE_TIMEOUT``, 10 s) before it fails, and so does every
request behind it. ``StoreAvailability`` sits in front of the write pool:

- a store call that loses its connection, or waits for one in vain, makes the guard
  *probe* the server with one fresh, direct connection (at most 2 s; concurrent callers
  share one probe). When the probe fails the breaker opens: the call fails with
  ``StoreUnavailableError`` (503, nothing written) and so do the calls waiting for a
  pooled connection, at once;
- while the breaker is open every store call fails at once with the same error, for
  ``RFMVP_STORAGE_BREAKER_OPEN_SECONDS``;
- then the next call is the half-open trial: it probes first, and when the server
  answers, ``on_recover`` (a fresh write pool, so the old pool's reconnection backoff
  does not delay recovery) runs before the call goes ahead; its success closes the
  breaker. A failed probe reopens it.

A probe that succeeds (a backend was killed, ``pg_terminate_backend``, but the server is
up) lets the caller retry as before. Only an unreachable server counts as a failure: any
answer from PostgreSQL, even an error, counts as a success.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio

from ..errors import StoreUnavailableError
from ..resilience import BreakerPolicy, CircuitBreaker, CircuitState

__all__ = ["StoreAvailability"]

log = logging.getLogger(__name__)

#: longest a probe waits for a fresh connection
PROBE_TIMEOUT = 2.0
#: a probe's answer is shared with callers that ask within this many seconds
_PROBE_REUSE = 0.25


class StoreAvailability:
    """The breaker, the probe and the watched pool waits of one store."""

    def __init__(
        self,
        name: str,
        describe: str,
        probe: Callable[[], Awaitable[None]],
        *,
        open_seconds: float,
        on_recover: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.describe = describe
        self._probe = probe
        self._on_recover = on_recover
        self._clock = clock
        # One unreachable probe opens it; one trial closes it.
        self.breaker = CircuitBreaker(
            name,
            BreakerPolicy(failure_rate_threshold=1.0, window_size=1, minimum_calls=1,
                          open_seconds=open_seconds, half_open_max_calls=1),
            clock, on_change=self._changed,
        )
        self._watched: set[anyio.CancelScope] = set()
        self._probe_lock = anyio.Lock()
        self._last_probe: tuple[float, bool] | None = None
        #: probes run, and how many found the server unreachable
        self.probes = 0
        self.probe_failures = 0
        #: calls refused at once because the breaker was open
        self.refused = 0

    # -- the breaker -------------------------------------------------------------------

    def unavailable(self) -> StoreUnavailableError:
        retry_after = self.breaker.retry_after()
        # The server's address goes to the log, never to the caller.
        return StoreUnavailableError(
            "the store is unavailable (PostgreSQL cannot be reached); nothing was written, "
            "retry later", retry_after=max(retry_after, 1.0))

    def _changed(self, name: str, old: CircuitState, new: CircuitState) -> None:
        if new is CircuitState.OPEN:
            log.error("%s cannot be reached: store calls fail at once with 503 for %g s, "
                      "then one call tries again", self.describe,
                      self.breaker.policy.open_seconds)
            for scope in list(self._watched):
                scope.cancel()
        elif new is CircuitState.CLOSED:
            log.warning("%s answers again: store calls go ahead", self.describe)

    async def enter(self) -> int:
        """Before a store call: raise at once while open; the half-open trial probes first.

        Returns the breaker's epoch, for ``leave``.
        """
        breaker = self.breaker
        if not breaker.allow():
            self.refused += 1
            raise self.unavailable()
        epoch = breaker.epoch
        if breaker.state is CircuitState.HALF_OPEN:
            try:
                reachable = await self._probe_now()
                if reachable and self._on_recover is not None:
                    await self._on_recover()
            except BaseException:
                breaker.give_back(epoch)
                raise
            if not reachable:
                breaker.record_failure()
                raise self.unavailable()
        return epoch

    def leave(self, epoch: int, exc: BaseException | None) -> None:
        """After the call: any answer of the server closes (or keeps closed) the breaker."""
        breaker = self.breaker
        if epoch != breaker.epoch:
            return  # admitted before the latest transition: says nothing new
        if exc is None:
            breaker.record_success()
        elif isinstance(exc, StoreUnavailableError):
            if breaker.state is CircuitState.HALF_OPEN:
                breaker.record_failure()
        elif isinstance(exc, Exception):
            breaker.record_success()  # the server answered (with an error of its own)
        else:  # cancelled: no outcome
            breaker.give_back(epoch)

    # -- probing -----------------------------------------------------------------------

    async def check_reachable(self) -> None:
        """After a lost connection or a vain wait: raise (and open) when the server is down."""
        if not await self._probe_shared():
            self.breaker.record_failure()
            raise self.unavailable()

    async def _probe_shared(self) -> bool:
        async with self._probe_lock:
            last = self._last_probe
            if last is not None and self._clock() - last[0] < _PROBE_REUSE:
                return last[1]
            return await self._probe_now()

    async def _probe_now(self) -> bool:
        self.probes += 1
        reachable = True
        try:
            with anyio.fail_after(PROBE_TIMEOUT):
                await self._probe()
        except Exception as exc:
            reachable = False
            self.probe_failures += 1
            log.warning("probing %s failed: %s", self.describe, type(exc).__name__)
        self._last_probe = (self._clock(), reachable)
        return reachable

    def watch(self) -> _Watch:
        """A scope around one use of the pool, cancelled when the breaker opens (the
        caller then raises ``unavailable()``), so nobody waits out the pool timeout."""
        return _Watch(self._watched)

    def snapshot(self) -> dict[str, object]:
        """The breaker's state for /health and /metrics."""
        retry_after = self.breaker.retry_after()
        return {"state": str(self.breaker.state),
                "retry_after": math.ceil(retry_after * 10) / 10 if retry_after else 0.0}


class _Watch:
    """``StoreAvailability.watch()``: enter a fresh cancel scope, registered with the
    guard while it is entered. A class, not a generator: every store call enters one."""

    __slots__ = ("_scope", "_watched")

    def __init__(self, watched: set[anyio.CancelScope]) -> None:
        self._watched = watched
        self._scope = anyio.CancelScope()

    def __enter__(self) -> anyio.CancelScope:
        self._watched.add(self._scope)
        try:
            return self._scope.__enter__()
        except BaseException:
            self._watched.discard(self._scope)
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        try:
            return self._scope.__exit__(exc_type, exc, tb)
        finally:
            self._watched.discard(self._scope)
