"""NotificationService: a plugin that turns robot events into deliveries, off the worker's path.

``on_robot_created`` and ``on_robot_finished`` only match subscriptions and put the
notifications into a bounded in-memory stream; they never wait for the network. A task
contributed through ``background_tasks`` takes them out and delivers them, at most
``concurrency`` at a time, each retried with exponential backoff and full jitter (tenacity)
while the failure is transient. Every delivery is kept in a bounded delivery log with its
attempts, and counted.

At shutdown, the orchestrator cancels the delivery task before the worker drains;
``on_shutdown`` then delivers what is still queued or was interrupted, for at most
``shutdown_grace_seconds``. What is left after that is logged as abandoned: delivery is
at least once while the process runs, not across restarts.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import attrs
import tenacity
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ...errors import ConfigError
from ...hookspecs import hookimpl
from ...models import Robot, new_id, utcnow
from .channels import DeliveryError, LogChannel, Notification, NotificationChannel
from .config import NotifyConfig, Subscription, load_from_env

if TYPE_CHECKING:
    import os

    from ...orchestrator import Orchestrator

__all__ = ["DeliveryAttempt", "DeliveryRecord", "NotificationService"]

log = logging.getLogger("robotframework_mvp.notifications")

_STATES = ("pending", "delivered", "failed", "dropped", "abandoned")


@attrs.frozen
class DeliveryAttempt:
    """One try: when, how long, and the error (None when it was accepted)."""

    number: int
    started_at: datetime
    duration_ms: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@attrs.frozen
class DeliveryRecord:
    """One notification for one subscription, as the delivery log keeps it.

    ``state``: ``pending`` (queued or being tried), ``delivered``, ``failed`` (a permanent
    error, or the attempts ran out), ``dropped`` (the queue was full) or ``abandoned``
    (still undelivered when the shutdown grace period ended).
    """

    id: str
    subscription: str
    channel: str
    event: str
    robot_id: str
    kind: str
    status: str
    state: str
    created_at: datetime
    attempts: tuple[DeliveryAttempt, ...] = ()
    finished_at: datetime | None = None
    error: str | None = None


@attrs.define(eq=False)
class _Item:
    notification: Notification
    subscription: Subscription

    @property
    def channel_name(self) -> str:
        return self.subscription.channel_name


class NotificationService:
    """Deliver notifications of robot events to webhooks, e-mail and other channels.

    ``NotificationService(subscriptions=[...])`` passed to ``Orchestrator(plugins=[...])``,
    or ``RFMVP_PLUGINS=robotframework_mvp.services.notifications`` with
    ``RFMVP_NOTIFY_*`` variables. ``channels`` adds named channels that subscriptions can
    name, like the ``notification_channels`` hook does.
    """

    def __init__(self, subscriptions: Iterable[Subscription] = (), *,
                 config: NotifyConfig | None = None,
                 channels: Iterable[NotificationChannel] = ()) -> None:
        self.config = config if config is not None else NotifyConfig()
        self.subscriptions = tuple(
            s if s.name else attrs.evolve(s, name=f"{i}:{s.channel_name}")
            for i, s in enumerate(subscriptions))
        self._extra_channels = tuple(channels)
        # The queue is opened by on_startup and closed by on_shutdown (see open()).
        self._send: MemoryObjectSendStream[_Item] | None = None
        self._receive: MemoryObjectReceiveStream[_Item] | None = None
        self._channels: dict[str, NotificationChannel] = {}
        self._log: OrderedDict[str, DeliveryRecord] = OrderedDict()
        self._counts = dict.fromkeys(
            ("enqueued", "delivered", "failed", "dropped", "abandoned", "attempts", "retries"),
            0)
        self._leftovers: list[_Item] = []
        self._inflight = 0
        self._idle = anyio.Event()
        self._idle.set()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 env_file: str | os.PathLike[str] | None = ".env") -> NotificationService:
        """A service configured by ``RFMVP_NOTIFY_*`` (see docs/services/notifications.md)."""
        config, subscriptions = load_from_env(environ, env_file)
        return cls(subscriptions, config=config)

    def __repr__(self) -> str:
        return f"NotificationService({len(self.subscriptions)} subscriptions)"

    # -- what operators read -------------------------------------------------------------

    def deliveries(self, *, robot_id: str | None = None, state: str | None = None
                   ) -> list[DeliveryRecord]:
        """The delivery log, oldest first (the last ``log_size`` deliveries)."""
        if state is not None and state not in _STATES:
            raise ValueError(f"state must be one of {', '.join(_STATES)}")
        return [r for r in self._log.values()
                if (robot_id is None or r.robot_id == robot_id)
                and (state is None or r.state == state)]

    def stats(self) -> dict[str, int]:
        """Counters since start: enqueued, delivered, failed, dropped, abandoned,
        attempts, retries, plus ``queued`` (waiting now) and ``in_flight``."""
        queued = 0 if self._receive is None else self._receive.statistics().current_buffer_used
        return {**self._counts, "queued": queued,
                "in_flight": self._inflight}

    @property
    def channels(self) -> Mapping[str, NotificationChannel]:
        return dict(self._channels)

    # -- hooks ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the queue. ``on_startup`` calls it; robots that end before are not told."""
        if self._send is None:
            self._send, self._receive = anyio.create_memory_object_stream[_Item](
                self.config.queue_size)

    @hookimpl
    def on_startup(self, orchestrator: Orchestrator) -> None:
        self.open()

    @hookimpl
    def on_robot_created(self, robot: Robot) -> None:
        self._enqueue("robot.created", robot)

    @hookimpl
    def on_robot_finished(self, robot: Robot) -> None:
        self._enqueue("robot.finished", robot)

    @hookimpl
    def background_tasks(self, orchestrator: Orchestrator
                         ) -> Sequence[Callable[[], Awaitable[None]]]:
        try:
            self._resolve_channels(orchestrator)
        except ConfigError:
            self._close_queue()  # on_shutdown will not be called: startup fails
            raise
        return [self._run]

    @hookimpl
    async def on_shutdown(self, orchestrator: Orchestrator) -> None:
        await self.drain(self.config.shutdown_grace_seconds)

    # -- enqueueing (on the worker's completion path: never blocks) -----------------------

    def _enqueue(self, event: str, robot: Robot) -> None:
        try:
            for subscription in self.subscriptions:
                if not subscription.matches(robot):
                    continue
                notification = Notification(
                    id=new_id(), event=event, subscription=subscription.name, robot=robot,
                    created_at=utcnow(), include_result=subscription.include_result,
                    max_result_bytes=self.config.max_result_bytes)
                item = _Item(notification, subscription)
                self._record(item, "pending")
                try:
                    if self._send is None:
                        raise anyio.ClosedResourceError
                    self._send.send_nowait(item)
                    self._counts["enqueued"] += 1
                except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                    self._finish(item, "dropped", "the notification queue is full or closed")
        except Exception:  # an observer must never break the robot's completion
            log.exception("could not queue notifications for robot %s", robot.id)

    # -- delivering ------------------------------------------------------------------------

    def _resolve_channels(self, orchestrator: Orchestrator) -> None:
        """Channels that subscriptions may name: ``log``, ``channels=`` and the hook's."""
        named: dict[str, NotificationChannel] = {"log": LogChannel()}
        contributed = orchestrator.pm.hook.notification_channels(settings=orchestrator.settings)
        explicit: dict[str, NotificationChannel] = {}
        for channel in [*self._extra_channels, *(c for group in contributed for c in group or ())]:
            if channel.name in explicit and explicit[channel.name] is not channel:
                raise ConfigError(f"two notification channels are named {channel.name!r}; "
                                  "rename one")
            explicit[channel.name] = channel
        named.update(explicit)  # a channel named "log" replaces the built-in one
        missing = sorted({s.channel for s in self.subscriptions
                          if isinstance(s.channel, str) and s.channel not in named})
        if missing:
            raise ConfigError(f"notification subscriptions name unknown channels {missing}; "
                              f"known: {sorted(named)}")
        self._channels = named

    def _channel(self, item: _Item) -> NotificationChannel | None:
        channel = item.subscription.channel
        return self._channels.get(channel) if isinstance(channel, str) else channel

    async def _run(self) -> None:
        """Deliver queued notifications until cancelled (or the queue is closed)."""
        async with anyio.create_task_group() as tg:
            for _ in range(self.config.concurrency):
                tg.start_soon(self._deliver_from_queue)

    async def _deliver_from_queue(self) -> None:
        # No checkpoint between taking an item and entering _deliver's try block, so a
        # cancellation cannot lose it: _deliver hands it to on_shutdown.
        receive = self._receive
        if receive is None:
            return
        while True:
            try:
                item = await receive.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                return
            await self._deliver(item)

    async def _deliver(self, item: _Item) -> None:
        """Try until delivered, a permanent error, or the attempts run out."""
        self._inflight += 1
        if self._idle.is_set():
            self._idle = anyio.Event()
        try:
            await self._attempts(item)
        except anyio.get_cancelled_exc_class():
            self._leftovers.append(item)  # on_shutdown tries it again
            raise
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _attempts(self, item: _Item) -> None:
        channel = self._channel(item)
        if channel is None:
            self._finish(item, "failed", f"no channel named {item.channel_name!r}")
            return
        cfg = self.config
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(cfg.max_attempts),
            wait=_wait(cfg.retry_base_seconds, cfg.retry_cap_seconds),
            retry=tenacity.retry_if_exception(_retryable),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(item, channel, attempt.retry_state.attempt_number)
        except Exception as exc:
            self._finish(item, "failed", _describe(exc))
            log.warning("notification %s to %s failed after %d attempts: %s",
                        item.notification.id, item.channel_name,
                        len(self._log[item.notification.id].attempts)
                        if item.notification.id in self._log else 0, _describe(exc))
            return
        self._finish(item, "delivered", None)

    async def _attempt(self, item: _Item, channel: NotificationChannel, number: int) -> None:
        started, clock = utcnow(), time.perf_counter()
        self._counts["attempts"] += 1
        if number > 1:
            self._counts["retries"] += 1
        error: str | None = "interrupted by shutdown"
        try:
            with anyio.fail_after(self.config.timeout):
                await channel.send(item.notification)
            error = None
        except Exception as exc:
            error = _describe(exc)
            raise
        finally:
            self._add_attempt(item, DeliveryAttempt(
                number=number, started_at=started, error=error,
                duration_ms=round((time.perf_counter() - clock) * 1000, 3)))

    async def drain(self, timeout: float) -> None:
        """Stop taking notifications, deliver what is left, for at most ``timeout`` s.

        Called by ``on_shutdown``; whatever is still undelivered then is ``abandoned``.
        """
        pending = self._leftovers
        self._leftovers = []
        if self._send is not None and self._receive is not None:
            self._send.close()
            while True:
                try:
                    pending.append(self._receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
        self._close_queue()
        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                for item in pending:
                    tg.start_soon(self._deliver, item)
            await self._idle.wait()  # deliveries the background task may still run
        for record in list(self._log.values()):
            if record.state == "pending":
                self._finish_record(record.id, "abandoned",
                                    "still undelivered when the shutdown grace period ended")
        if self._counts["abandoned"]:
            log.warning("%d notifications were abandoned at shutdown",
                        self._counts["abandoned"])
        owned = {id(c): c for c in self._channels.values()}
        owned.update({id(s.channel): s.channel for s in self.subscriptions
                      if not isinstance(s.channel, str)})
        for channel in owned.values():
            close = getattr(channel, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing notification channel %r failed", channel.name)

    def _close_queue(self) -> None:
        for stream in (self._send, self._receive):
            if stream is not None:
                stream.close()
        self._send = self._receive = None

    # -- the delivery log ----------------------------------------------------------------

    def _record(self, item: _Item, state: str) -> None:
        n = item.notification
        self._log[n.id] = DeliveryRecord(
            id=n.id, subscription=n.subscription, channel=item.channel_name, event=n.event,
            robot_id=n.robot.id, kind=n.robot.kind, status=str(n.robot.status), state=state,
            created_at=n.created_at)
        while len(self._log) > self.config.log_size:
            self._log.popitem(last=False)

    def _add_attempt(self, item: _Item, attempt: DeliveryAttempt) -> None:
        record = self._log.get(item.notification.id)
        if record is not None:
            self._log[record.id] = attrs.evolve(record, attempts=(*record.attempts, attempt))
        if attempt.error is not None:
            log.info("notification %s to %s: attempt %d failed: %s", item.notification.id,
                     item.channel_name, attempt.number, attempt.error)

    def _finish(self, item: _Item, state: str, error: str | None) -> None:
        if item.notification.id not in self._log:
            self._record(item, "pending")
        self._finish_record(item.notification.id, state, error)
        if state == "delivered":
            log.debug("notification %s delivered to %s", item.notification.id,
                      item.channel_name)
        elif state == "dropped":
            log.warning("notification %s for robot %s dropped: %s", item.notification.id,
                        item.notification.robot.id, error)

    def _finish_record(self, delivery_id: str, state: str, error: str | None) -> None:
        record = self._log.get(delivery_id)
        if record is None or record.state != "pending":
            return
        self._log[delivery_id] = attrs.evolve(record, state=state, error=error,
                                              finished_at=utcnow())
        self._counts[state] += 1


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, DeliveryError):
        return exc.retryable
    return isinstance(exc, OSError | TimeoutError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DeliveryError):
        return str(exc)
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]


def _wait(base: float, cap: float) -> Callable[[tenacity.RetryCallState], float]:
    """Full-jitter exponential backoff, never shorter than a receiver's Retry-After."""
    backoff = tenacity.wait_random_exponential(multiplier=base, max=cap)

    def wait(state: tenacity.RetryCallState) -> float:
        delay = backoff(state)
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        if isinstance(exc, DeliveryError) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, cap))
        return delay if math.isfinite(delay) else cap

    return wait
