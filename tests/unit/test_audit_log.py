"""AuditLog batches: a request appends to a buffer, a background task writes batches."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robotframework_mvp.models import AuditEvent, audit_hash
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


# --- the chain's canonical JSON ---------------------------------------------------------------

_text = st.text(max_size=12)  # any code point, surrogates and controls included
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300)
@given(prev=st.none() | _text, principal=st.none() | _text, action=_text,
       target=st.none() | _text, outcome=_text, client=st.none() | _text, request_id=_text,
       details=st.dictionaries(_text, _json, max_size=4),
       ts=st.datetimes(timezones=st.just(UTC)))
def test_a_chain_link_hashes_the_canonical_json_the_trail_was_written_with(
    prev: str | None, principal: str | None, action: str, target: str | None, outcome: str,
    client: str | None, request_id: str, details: dict[str, Any], ts: datetime,
) -> None:
    """The link is built field by field for speed; it must stay byte for byte the sorted,
    compact, ASCII-only ``json.dumps`` of the record, which every stored trail hashed."""
    event = AuditEvent(ts=ts, principal=principal, action=action, target=target,
                       outcome=outcome, client=client, request_id=request_id, details=details)
    body = {"ts": ts.isoformat(), "principal": principal, "action": action,
            "target": target, "outcome": outcome, "client": client, "request_id": request_id,
            "details": details, "prev_hash": prev}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert audit_hash(prev, event) == hashlib.sha256(canonical.encode()).hexdigest()
