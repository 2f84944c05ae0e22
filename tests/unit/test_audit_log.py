"""AuditLog batches: a request appends to a buffer, a background task writes batches."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from robotframework_mvp.models import AuditEvent
from robotframework_mvp.security import audit
from robotframework_mvp.security.audit import AuditLog

pytestmark = pytest.mark.anyio


class GatedStore:
    """Records each batch; the writes wait until the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.writing = anyio.Event()
        self.gate = anyio.Event()

    async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        self.batches.append([str(e.target) for e in events])
        self.writing.set()
        await self.gate.wait()
        return list(events)


def record(log: AuditLog, n: int) -> None:
    log.record(action="robots.submit", outcome="accepted", principal="alice",
               target=f"robot-{n}", client=None, request_id=f"req-{n}")


async def test_records_that_arrive_during_a_write_wait_for_the_next_flush() -> None:
    """Under a steady stream of requests the trail is still written in batches: a flush
    writes what was buffered when it began, not each record that arrives meanwhile."""
    store = GatedStore()
    log = AuditLog(store, flush_interval=3600)  # type: ignore[arg-type]
    full = audit._MAX_BATCH
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(log.run)
            for n in range(full):  # a full batch wakes the writer at once
                record(log, n)
            await store.writing.wait()
            for n in range(full, full + 5):  # requests go on during the write
                record(log, n)
            store.gate.set()
            await anyio.wait_all_tasks_blocked()  # the write is done; the writer waits
            assert [len(b) for b in store.batches] == [full]
            assert log.pending == 5
            tg.cancel_scope.cancel()  # stopping flushes what is left, in one batch
    assert [len(b) for b in store.batches] == [full, 5]
    assert store.batches[1] == [f"robot-{n}" for n in range(full, full + 5)]
    assert log.written == full + 5


async def test_a_failed_write_keeps_its_records_ahead_of_newer_ones() -> None:
    class FailingOnce(GatedStore):
        async def append_audit(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
            if not self.batches:
                self.batches.append([])
                raise OSError("disk full")
            return await super().append_audit(events)

    store = FailingOnce()
    store.gate.set()
    log = AuditLog(store, flush_interval=3600)  # type: ignore[arg-type]
    record(log, 1)
    await log.flush()
    assert (log.write_errors, log.pending) == (1, 1)
    record(log, 2)
    await log.flush()
    assert store.batches[1] == ["robot-1", "robot-2"]
    assert (log.written, log.pending) == (2, 0)


async def test_stopping_during_a_write_lets_the_write_finish_and_loses_no_record() -> None:
    """The orchestrator stops (cancels the writer) while a batch is being written: the
    write must complete, not be cut off at its COMMIT, whose outcome would be unknown
    (the records lost, or written again by the final flush)."""
    store = GatedStore()
    log = AuditLog(store, flush_interval=0.001)  # type: ignore[arg-type]
    for n in range(3):
        record(log, n)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(log.run)
            await store.writing.wait()
            tg.cancel_scope.cancel()  # the stop arrives mid-write
            store.gate.set()
    assert store.batches == [["robot-0", "robot-1", "robot-2"]]
    assert log.written == 3
    assert log.pending == 0
