"""Group commit: completions that arrive while one is being written share the next write.

No timer and no background task: the first caller with nothing in flight writes its own
completion at once (no added latency when idle); callers that arrive meanwhile queue up,
and when that write returns, one of them writes the whole queue in one transaction. Under
load the store sees a few large transactions instead of one per robot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio

from ..models import Robot
from .driver import Completion

__all__ = ["GroupCommitter"]

WriteMany = Callable[[Sequence[Completion]], Awaitable[list[Robot | None]]]


class _Slot:
    __slots__ = ("completion", "done", "error", "robot")

    def __init__(self, completion: Completion) -> None:
        self.completion = completion
        self.done = anyio.Event()
        self.robot: Robot | None = None
        self.error: BaseException | None = None


class GroupCommitter:
    def __init__(self, write_many: WriteMany, max_batch: int = 500) -> None:
        self.write_many = write_many
        self.max_batch = max_batch
        self._queue: list[_Slot] = []
        self._writing = False
        self.batches = 0
        self.written = 0

    async def complete(self, completion: Completion) -> Robot | None:
        slot = _Slot(completion)
        self._queue.append(slot)
        if self._writing:
            # A write is in flight: whoever finishes it writes this one with the rest.
            await slot.done.wait()
        else:
            await self._drain()
        if slot.error is not None:
            raise slot.error
        return slot.robot

    async def _drain(self) -> None:
        """Write queued completions, batch after batch, until the queue is empty."""
        self._writing = True
        try:
            while self._queue:
                batch, self._queue = (self._queue[:self.max_batch],
                                      self._queue[self.max_batch:])
                try:
                    robots = await self.write_many([s.completion for s in batch])
                except Exception as exc:
                    for slot in batch:
                        slot.error = exc
                else:
                    self.batches += 1
                    self.written += len(batch)
                    for slot, robot in zip(batch, robots, strict=True):
                        slot.robot = robot
                for slot in batch:
                    slot.done.set()
        finally:
            self._writing = False
            # Cancelled mid-write (shutdown): release everyone still waiting.
            for slot in self._queue:
                slot.error = anyio.get_cancelled_exc_class()()
                slot.done.set()
            self._queue.clear()
