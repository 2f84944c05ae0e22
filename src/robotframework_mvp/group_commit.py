"""Group commit: writes that arrive while one is under way share the next write.

Used for completions, progress reports and robots submitted one at a time (the
StateManager), for rate-limit checks and status reads on a shared cache (the
CacheManager) and for stored-key lookups (StoredKeyBackend): any call whose items can go
to the server together, in order, in one round trip.

No timer and no background task: the first caller with nothing in flight writes its own
item after one turn of the event loop (no added latency when idle), with those of the
callers that arrived in that turn; callers that arrive while it writes queue up, and when
that write returns, it writes the whole queue in one transaction. Under
load the store sees a few large transactions instead of one per robot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, Protocol, TypeVar

import anyio

__all__ = ["GroupCommitter", "RoundTrips", "SharesRoundTrips"]

Item = TypeVar("Item")
Result = TypeVar("Result")
#: writes items in one transaction; one result per item, in order. An ``Exception`` in
#: place of a result is raised to that item's caller alone (the others' items were written).
WriteMany = Callable[[Sequence[Item]], Awaitable["Sequence[Result | Exception]"]]


class SharesRoundTrips(Protocol):
    """What ``/metrics`` reads of anything whose calls share round trips."""

    #: round trips made
    batches: int
    #: items they carried (items / round trips: the mean batch)
    written: int


class RoundTrips:
    """The counts a ``GroupCommitter`` keeps, for writes that share round trips another
    way (the cache's write behind: a pause, then every pending state in one trip)."""

    __slots__ = ("batches", "written")

    def __init__(self) -> None:
        self.batches = 0
        self.written = 0


class _Batch(Generic[Item, Result]):
    """Items waiting for the next write, and one event for those of them that wait.

    The event is made when the first item that must wait for it joins: the caller that
    writes a batch itself never waits, and a lone write (the latency path) needs none.
    """

    __slots__ = ("done", "error", "items", "results", "written")

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.done: anyio.Event | None = None
        self.written = False
        self.results: Sequence[Result | Exception] = ()
        self.error: BaseException | None = None

    async def wait(self) -> None:
        if not self.written:
            if self.done is None:
                self.done = anyio.Event()
            await self.done.wait()

    def finish(self) -> None:
        self.written = True
        if self.done is not None:
            self.done.set()

    def result(self, index: int) -> Result:
        if self.error is not None:
            raise self.error
        result = self.results[index]
        if isinstance(result, Exception):
            raise result
        return result


class GroupCommitter(Generic[Item, Result]):
    def __init__(self, write_many: WriteMany[Item, Result], max_batch: int = 500, *,
                 first_turn: bool = True) -> None:
        """``first_turn=False``: a caller with nothing in flight writes at once, without
        the turn of the loop that lets callers ready now join it. For a ``write_many``
        that always waits on the network (a Redis call), those callers join the next
        write anyway, and a lone call saves the turn."""
        self.write_many = write_many
        self.max_batch = max_batch
        self.first_turn = first_turn
        self._batches: list[_Batch[Item, Result]] = []
        self._writing = False
        self.batches = 0
        self.written = 0

    @property
    def queued(self) -> int:
        """Items waiting for a write in flight to return."""
        return sum(len(b.items) for b in self._batches)

    async def write(self, item: Item) -> Result:
        """Write ``item`` with whatever else is waiting for the store; its result."""
        if not self._writing:
            # Nothing in flight: this caller writes. It first lets the tasks that are
            # ready now run (one turn of the loop, a few microseconds when idle), so that
            # robots finishing together share its write even when the write itself runs
            # on the loop without yielding (a SQLite write of a few robots does).
            self._writing = True
            first = _Batch[Item, Result]()
            first.items.append(item)
            self._batches.append(first)
            # It writes for everyone who joins it: its own cancellation (a request that
            # went away) waits until their writes are done. One shielded scope covers the
            # turn and the writes (a checkpoint in it cannot be cancelled).
            with anyio.CancelScope(shield=True):
                try:
                    if self.first_turn:
                        await anyio.lowlevel.checkpoint()
                finally:
                    await self._drain()
            return first.result(0)
        # A write is in flight: whoever finishes it writes this one with the rest.
        batch = self._batches[-1] if self._batches else None
        if batch is None or len(batch.items) >= self.max_batch:
            batch = _Batch[Item, Result]()
            self._batches.append(batch)
        index = len(batch.items)
        batch.items.append(item)
        await batch.wait()
        return batch.result(index)

    async def _write(self, items: list[Item]) -> Sequence[Result | Exception]:
        results = await self.write_many(items)
        self.batches += 1
        self.written += len(items)
        return results

    async def _drain(self) -> None:
        """Write the queued batches in order until none is left, then stop writing."""
        try:
            while self._batches:
                batch = self._batches.pop(0)
                try:
                    batch.results = await self._write(batch.items)
                except Exception as exc:
                    batch.error = exc
                finally:
                    batch.finish()
        finally:
            self._writing = False
            # A write that raised what is not an Exception: release everyone waiting.
            for batch in self._batches:
                batch.error = anyio.get_cancelled_exc_class()()
                batch.finish()
            self._batches.clear()
