"""Wake-ups for waits on robots that end in another process.

A ``wait`` (``POST /api/v1/robots`` with ``"wait"``, ``process_robot``) in a process that
does not run the robot, an API process above all, learnt of its end only by polling the
store: the first poll comes after 50 ms. Now a process that writes an ended robot to a
shared cache that can publish (Redis) announces its id in the same round trip
(``CacheManager.ended_channel``). A process subscribes the first time it waits for a
robot it does not run, and stays subscribed; each announcement wakes the waits for its
ids, and each of them reads the store once.

The polls stay, as the safety net: without a cache that can publish, or while the
subscription is down, waits work as before, only later. When the subscription is made,
or made again after a lost connection, every wait reads the store once: announcements
may have gone by unheard meanwhile.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

import anyio
import anyio.abc

from .cache.manager import CacheManager

__all__ = ["RemoteEnds"]

log = logging.getLogger(__name__)

#: an idle subscription checks its connection this often (a silent drop shows up then)
_KEEPALIVE = 15.0
#: waits before subscribing again after a failure: doubling from the first to the second
_BACKOFF = (0.1, 10.0)
#: ids heard most recently, for a wait that begins just after its robot's announcement
_RECENT = 10_000


class RemoteEnds:
    """Hears the robots that other processes end, and wakes the waits for them."""

    def __init__(self, cache: CacheManager,
                 wake: Callable[[Iterable[str] | None], None]) -> None:
        """``wake(ids)`` wakes the waits for ``ids``; ``wake(None)`` wakes every wait."""
        self.cache = cache
        self.wake = wake
        self._wanted = anyio.Event()
        self._recent: OrderedDict[str, None] = OrderedDict()
        #: whether announcements are being heard now
        self.subscribed = False
        #: announcements heard, robot ids in them, and subscriptions made (for /metrics)
        self.announcements = 0
        self.ids_heard = 0
        self.subscriptions = 0

    def want(self) -> None:
        """A wait for a robot run elsewhere began: subscribe, if not done yet."""
        self._wanted.set()

    def ended_recently(self, robot_id: str) -> bool:
        """Whether ``robot_id`` was among the last ids heard (a wait that began after its
        announcement went by reads the store at once instead of at its first poll)."""
        return robot_id in self._recent

    async def run(self, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe once a wait wants it; hear announcements until cancelled."""
        task_status.started()
        publisher = self.cache.publisher
        if publisher is None:
            return
        await self._wanted.wait()
        backoff = _BACKOFF[0]
        while True:
            try:
                async with publisher.subscribe(self.cache.ended_channel) as subscription:
                    self.subscribed = True
                    self.subscriptions += 1
                    backoff = _BACKOFF[0]
                    self.wake(None)  # announcements may have gone by before this
                    while True:
                        message = await subscription.receive(_KEEPALIVE)
                        if message:
                            self._heard(message.decode().split())
            except Exception as exc:
                log.warning("not hearing robots that end in other processes (%s: %s); "
                            "waits poll the store meanwhile, retrying in %g s",
                            type(exc).__name__, exc, backoff)
            finally:
                self.subscribed = False
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF[1])

    def _heard(self, ids: list[str]) -> None:
        self.announcements += 1
        self.ids_heard += len(ids)
        recent = self._recent
        for robot_id in ids:
            recent[robot_id] = None
        while len(recent) > _RECENT:
            recent.popitem(last=False)
        self.wake(ids)
