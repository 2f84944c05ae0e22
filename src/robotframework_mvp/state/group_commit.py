"""Group commit: writes that arrive while one is under way share the next write.

Used for completions and for progress reports.

No timer and no background task: the first caller with nothing in flight writes its own
item after one turn of the event loop (no added latency when idle), with those of the
callers that arrived in that turn; callers that arrive while it writes queue up, and when
that write returns, it writes the whole queue in one transaction. Under
load the store sees a few large transactions instead of one per robot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio

from ..models import Robot

__all__ = ["GroupCommitter"]

Item = TypeVar("Item")
WriteMany = Callable[[Sequence[Item]], Awaitable[list[Robot | None]]]


class _Batch(Generic[Item]):
    """Items waiting for the next write, and one event for all of them."""

    __slots__ = ("done", "error", "items", "robots")

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.done = anyio.Event()
        self.robots: list[Robot | None] = []
        self.error: BaseException | None = None


class GroupCommitter(Generic[Item]):
    def __init__(self, write_many: WriteMany[Item], max_batch: int = 500) -> None:
        self.write_many = write_many
        self.max_batch = max_batch
        self._batches: list[_Batch[Item]] = []
        self._writing = False
        self.batches = 0
        self.written = 0

    @property
    def queued(self) -> int:
        """Items waiting for a write in flight to return."""
        return sum(len(b.items) for b in self._batches)

    async def write(self, item: Item) -> Robot | None:
        """Write ``item`` with whatever else is waiting for the store; its robot as stored
        (None: its lease is gone)."""
        if not self._writing:
            # Nothing in flight: this caller writes. It first lets the tasks that are
            # ready now run (one turn of the loop, a few microseconds when idle), so that
            # robots finishing together share its write even when the write itself runs
            # on the loop without yielding (a SQLite write of a few robots does).
            self._writing = True
            first = _Batch[Item]()
            first.items.append(item)
            self._batches.append(first)
            try:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            finally:
                await self._drain()
            if first.error is not None:
                raise first.error
            return first.robots[0]
        # A write is in flight: whoever finishes it writes this one with the rest.
        batch = self._batches[-1] if self._batches else None
        if batch is None or len(batch.items) >= self.max_batch:
            batch = _Batch[Item]()
            self._batches.append(batch)
        index = len(batch.items)
        batch.items.append(item)
        await batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.robots[index]

    async def _write(self, items: list[Item]) -> list[Robot | None]:
        robots = await self.write_many(items)
        self.batches += 1
        self.written += len(items)
        return robots

    async def _drain(self) -> None:
        """Write the queued batches in order until none is left, then stop writing."""
        try:
            while self._batches:
                batch = self._batches.pop(0)
                try:
                    batch.robots = await self._write(batch.items)
                except Exception as exc:
                    batch.error = exc
                finally:
                    batch.done.set()
        finally:
            self._writing = False
            # Cancelled mid-write (shutdown): release everyone still waiting.
            for batch in self._batches:
                batch.error = anyio.get_cancelled_exc_class()()
                batch.done.set()
            self._batches.clear()
