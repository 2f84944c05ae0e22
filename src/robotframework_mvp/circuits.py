"""Per-module circuit breakers, shared by every process through Redis.

``ModuleCircuits`` owns one ``CircuitBreaker`` per module registered in this process
(policy from the ``RFMVP_BREAKER_*`` settings). The worker feeds it the outcome of every
attempt: a success (slower than ``RFMVP_BREAKER_SLOW_CALL_SECONDS`` counts as a
failure), a failure, or a timeout (a failure). A ``PermanentError`` is the robot's fault
(bad input), not the module's: it is not counted; nor is an attempt that was cancelled
or whose lease was lost.

What a state means here:

- ``closed``: the worker claims the module's robots as usual;
- ``open``: the worker claims none of them (they wait queued) and the LoadBalancer
  sends no new robot there while another module of the kind is available; a retry of a
  robot that just failed on it goes to another module when there is one;
- ``half_open`` (after ``RFMVP_BREAKER_OPEN_SECONDS``): the worker claims at most
  ``RFMVP_BREAKER_HALF_OPEN_CALLS`` robots as trials; all must succeed to close it.

**Across processes.** Each process counts its own attempts with its own breakers. With
the Redis cache, a process whose breaker opens also writes
``<prefix>circuit:<module>`` = ``{"until": <UNIX time>, "opened_at": ..., "by": ...}``
with a time to live of ``RFMVP_BREAKER_OPEN_SECONDS``, and every process reads those
keys (at most once per ``RFMVP_CACHE_TTL_MODULE_CHOICE``). So when any process opens a
module's circuit, every process treats it as open until that shared period ends; after
it, each process goes by its own breaker again. With the memory cache the states are per
process, and other processes learn them from the module records, which a process
stores again soon after one of its circuits changes.

The object also keeps the resilience counters that ``/metrics`` exposes: retries, robots
moved to another module, robots failed for want of a module (each breaker counts its own
transitions).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .config import ResilienceConfig
from .models import ExecutionStatus, Robot
from .resilience import BreakerPolicy, CircuitBreaker, CircuitState

if TYPE_CHECKING:
    from .balancing import LoadBalancer, ModuleStats
    from .cache.manager import CacheManager
    from .modules import Module
    from .state.manager import StateManager

__all__ = ["ModuleCircuits", "breaker_policy"]

log = logging.getLogger(__name__)

#: execution statuses that mean "the attempt failed on its module"
_FAILED = frozenset({ExecutionStatus.FAILED, ExecutionStatus.TIMED_OUT, ExecutionStatus.LOST})


def breaker_policy(config: ResilienceConfig) -> BreakerPolicy:
    """The per-module breaker policy the ``RFMVP_BREAKER_*`` settings describe."""
    return BreakerPolicy(
        failure_rate_threshold=config.breaker_failure_rate,
        window_size=config.breaker_window,
        minimum_calls=config.breaker_minimum_calls,
        open_seconds=config.breaker_open_seconds,
        half_open_max_calls=config.breaker_half_open_calls,
        slow_call_seconds=config.breaker_slow_call_seconds,
    )


class ModuleCircuits:
    """The circuit breakers of this process's modules, and the shared open states."""

    def __init__(
        self,
        config: ResilienceConfig,
        modules: Mapping[str, Module],
        stats: Mapping[str, ModuleStats],
        cache: CacheManager,
        *,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.policy = breaker_policy(config)
        self.stats = stats
        self.cache = cache
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self.wall = wall
        self.balancer: LoadBalancer | None = None
        self.state_manager: StateManager | None = None
        self.process = f"{socket.gethostname()}:{os.getpid()}"
        self.breakers: dict[str, CircuitBreaker] = {
            name: CircuitBreaker(f"module:{name}", self.policy, clock, on_change=self._changed)
            for name in modules
        }
        #: module -> UNIX time its shared open period ends (read from Redis)
        self.shared: dict[str, float] = {}
        self._shared_loaded_at = float("-inf")
        self._to_publish: list[tuple[str, float, float]] = []
        self._listeners: list[Callable[[], None]] = []
        #: a circuit changed since the module records were last stored
        self.dirty = False
        # -- counters for /metrics ---------------------------------------------------------
        #: module -> attempts that ended in a retry (a failure, or a lease that expired)
        self.retries: Counter[str] = Counter()
        #: (module, reason) -> robots moved off the module ("retry" or "unavailable")
        self.reassigned: Counter[tuple[str, str]] = Counter()
        #: module -> robots failed with no_module_available
        self.unavailable_failures: Counter[str] = Counter()
        #: reads of the shared states that failed (Redis down); the last state is kept
        self.shared_errors = 0

    @property
    def shared_backend(self) -> bool:
        """Whether states are shared with other processes (the cache is Redis)."""
        return self.cache.backend.name == "redis"

    def on_transition(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after any change of an effective state (e.g. to drop the
        balancer's scored candidates at once)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # -- states ------------------------------------------------------------------------

    def state(self, name: str) -> str | None:
        """The circuit state this process acts on for module ``name``: ``open`` while any
        process holds it open, else its own breaker's; None for a module of another
        process that is not held open (its stored record says)."""
        until = self.shared.get(name)
        if until is not None and until > self.wall():
            return "open"
        breaker = self.breakers.get(name)
        return None if breaker is None else breaker.state.value

    def sync(self) -> None:
        """Write each local module's effective state into its ModuleStats."""
        for name in self.breakers:
            st = self.stats.get(name)
            if st is not None:
                st.circuit_state = self.state(name) or "closed"

    def permits(self, name: str) -> int | None:
        """Robots of ``name`` the worker may claim now: None for no limit (closed), 0 while
        open here or elsewhere, the trial robots left while half-open."""
        until = self.shared.get(name)
        if until is not None and until > self.wall():
            return 0
        breaker = self.breakers.get(name)
        return None if breaker is None else breaker.permits()

    def retry_after(self, name: str) -> float:
        """Seconds until an open circuit of ``name`` lets trials through (0 otherwise)."""
        until = self.shared.get(name)
        shared = max(0.0, until - self.wall()) if until is not None else 0.0
        breaker = self.breakers.get(name)
        return max(shared, 0.0 if breaker is None else breaker.retry_after())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every local breaker (and every shared open state) for /health and /metrics."""
        out: dict[str, dict[str, Any]] = {}
        now = self.wall()
        for name in sorted(set(self.breakers) | set(self.shared)):
            breaker = self.breakers.get(name)
            local = None if breaker is None else breaker.snapshot()
            until = self.shared.get(name)
            row: dict[str, Any] = {"state": self.state(name) or "closed"}
            if local is not None:
                row.update(local_state=local.state.value,
                           failure_rate=round(local.failure_rate, 4),
                           calls_in_window=local.calls_in_window)
            if until is not None and until > now:
                row["shared_open_seconds_left"] = round(until - now, 3)
            retry_after = self.retry_after(name)
            if retry_after:
                row["retry_after"] = round(retry_after, 3)
            out[name] = row
        return out

    # -- attempts ----------------------------------------------------------------------

    def admit(self, name: str) -> int | None:
        """An attempt of ``name`` starts: its ticket (the breaker's epoch), or None when
        the breaker refused it or the module has none (its outcome is then not counted)."""
        breaker = self.breakers.get(name)
        if breaker is None or not breaker.allow():
            return None
        return breaker.epoch

    def abandon(self, name: str, ticket: int | None) -> None:
        """The attempt ended without an outcome for the module (cancelled, lease lost, a
        permanent error): give its half-open trial slot back."""
        breaker = self.breakers.get(name)
        if breaker is not None and ticket is not None:
            breaker.give_back(ticket)

    async def record(self, name: str, ticket: int | None, *, ok: bool, seconds: float) -> None:
        """Count how an attempt went. Never raises."""
        breaker = self.breakers.get(name)
        if breaker is None or ticket is None:
            return
        if breaker.epoch != ticket:
            return  # admitted before the latest transition: says nothing about this state
        if ok:
            breaker.record_success(seconds)
        else:
            breaker.record_failure()
        if self._to_publish:
            await self.publish()

    def _changed(self, breaker_name: str, old: CircuitState, new: CircuitState) -> None:
        name = breaker_name.removeprefix("module:")
        st = self.stats.get(name)
        if st is not None:
            st.circuit_state = self.state(name) or new.value
        self.dirty = True
        if new is CircuitState.OPEN:
            log.warning("circuit of module %r opened (%s -> open): its robots wait queued for "
                        "%g s, then %d trial robots run", name, old.value,
                        self.policy.open_seconds, self.policy.half_open_max_calls)
            if self.shared_backend:
                now = self.wall()
                self._to_publish.append((name, now, now + self.policy.open_seconds))
        else:
            log.info("circuit of module %r: %s -> %s", name, old.value, new.value)
        self._notify()

    # -- sharing through Redis -----------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.cache.prefix}circuit:{name}"

    async def publish(self) -> None:
        """Write the open periods that started here to Redis (each key lives as long as
        the period). A failure is counted by the cache's own breaker and dropped."""
        pending, self._to_publish = self._to_publish, []
        for name, opened_at, until in pending:
            data = {"until": until, "opened_at": opened_at, "by": self.process}
            await self.cache.set_bytes("circuit", name, json.dumps(data).encode(),
                                       max(0.001, until - self.wall()))

    async def refresh_shared(self, names: Iterable[str] | None = None, *,
                             force: bool = False) -> None:
        """Read the shared open states of ``names`` (default: every module this process
        knows), at most once per ``refresh_seconds`` unless ``force``. Never raises."""
        if not self.shared_backend:
            return
        now = self.clock()
        if not force and now - self._shared_loaded_at < self.refresh_seconds:
            return
        self._shared_loaded_at = now
        if names is None:
            known = set(self.breakers)
            if self.balancer is not None:
                known.update(self.balancer.remote_names())
            names = known
        ordered = sorted(names)
        if not ordered:
            return
        values = await self._read_keys([self._key(n) for n in ordered])
        if values is None:
            return
        wall = self.wall()
        found: dict[str, float] = {}
        for name, raw in zip(ordered, values, strict=True):
            if raw is None:
                continue
            try:
                until = float(json.loads(raw)["until"])
            except (ValueError, KeyError, TypeError):
                continue
            if until > wall:
                found[name] = until
        if found != self.shared:
            opened = sorted(set(found) - set(self.shared))
            if opened:
                log.warning("circuits held open by another process: %s", ", ".join(opened))
            self.shared = found
            self.sync()
            self.dirty = True
            self._notify()

    async def _read_keys(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """One round trip for all keys, through the cache's own breaker."""
        cache = self.cache
        if not cache.breaker.allow():
            return None
        try:
            client = getattr(cache.backend, "client", None)
            if client is not None:
                values: list[Any] = await client.mget(list(keys))
            else:
                values = [await cache.backend.get(key) for key in keys]
        except Exception as exc:
            self.shared_errors += 1
            cache.breaker.record_failure()
            log.warning("reading shared circuit states failed (%s); keeping the last ones",
                        type(exc).__name__)
            return None
        cache.breaker.record_success()
        return [None if v is None else bytes(v) for v in values]

    # -- retries -----------------------------------------------------------------------

    async def retry_module(self, robot: Robot, failed_module: str, lease_token: str
                           ) -> str | None:
        """Where the retry of ``robot``, whose attempt just failed on ``failed_module``,
        should run: another module of its kind when the failed one's circuit is open, or
        when the robot failed ``RFMVP_RETRY_OTHER_MODULE_AFTER`` attempts in a row on it,
        and another module is available; None keeps it where it is."""
        balancer = self.balancer
        if balancer is None or len(balancer.candidates(robot.kind)) < 2:
            return None
        move = self.state(failed_module) == "open"
        after = self.config.retry_other_module_after
        if not move and after <= 1:
            move = True
        if not move and self.state_manager is not None:
            try:
                executions = await self.state_manager.list_executions(robot.id)
            except Exception:
                log.warning("robot %s: could not read its attempts; its retry stays on %r",
                            robot.id, failed_module)
                return None
            streak = 1  # this attempt
            for execution in sorted(executions, key=lambda e: (e.attempt, e.started_at),
                                    reverse=True):
                if execution.id == lease_token or execution.status is ExecutionStatus.RELEASED:
                    continue
                if execution.module != failed_module or execution.status not in _FAILED:
                    break
                streak += 1
            move = streak >= after
        if not move:
            return None
        return balancer.alternative(robot.kind, exclude={failed_module})
