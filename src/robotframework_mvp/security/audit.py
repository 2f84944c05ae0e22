"""The audit trail: every request, accepted or refused, as a hash-chained record.

Recording is a cheap append to a buffer; a background task writes the buffer in
batches (one transaction each), so auditing costs the request path almost nothing.
The store links each record to the previous one by hash (``audit_hash``), so
``verify_chain`` detects an edited, inserted or deleted record.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs

from ..models import AuditEvent, audit_hash, utcnow
from ..state.driver import StorageDriver

__all__ = ["AuditLog", "ChainReport", "verify_chain", "verify_store"]

log = logging.getLogger(__name__)

_MAX_BATCH = 1000


class AuditLog:
    def __init__(
        self,
        driver: StorageDriver,
        flush_interval: float,
        on_written: Callable[[Sequence[AuditEvent]], Awaitable[None]] | None = None,
    ) -> None:
        self.driver = driver
        self.flush_interval = flush_interval
        self.on_written = on_written
        self._buffer: list[AuditEvent] = []
        self._wake = anyio.Event()
        self.written = 0
        self.write_errors = 0

    def record(
        self,
        *,
        action: str,
        outcome: str,
        principal: str | None,
        target: str | None,
        client: str | None,
        request_id: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        self._buffer.append(
            AuditEvent(
                ts=utcnow(), principal=principal, action=action, target=target,
                outcome=outcome, client=client, request_id=request_id,
                details=details or {},
            )
        )
        if len(self._buffer) >= _MAX_BATCH:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> None:
        """Write the records buffered now, up to ``_MAX_BATCH`` a transaction.

        Records that arrive meanwhile wait for the next flush: draining until the buffer
        stays empty would, under a steady stream of requests, write them one by one.
        """
        pending, self._buffer = self._buffer, []
        for start in range(0, len(pending), _MAX_BATCH):
            batch = pending[start:start + _MAX_BATCH]
            try:
                written = await self.driver.append_audit(batch)
            except Exception:
                # Keep the records, ahead of any recorded since, for the next flush.
                self.write_errors += 1
                self._buffer[:0] = pending[start:]
                log.exception("writing %d audit records failed; will retry",
                              len(pending) - start)
                return
            self.written += len(written)
            if self.on_written is not None:
                await self.on_written(written)

    async def run(self) -> None:
        """Flush every ``flush_interval`` (or as soon as a batch is full) until cancelled.

        Cancelled only while it waits: a write under way finishes (shielded). Cut off at
        its COMMIT, its outcome would be unknown, and its records lost or written twice.
        """
        try:
            while True:
                with anyio.move_on_after(self.flush_interval):
                    await self._wake.wait()
                self._wake = anyio.Event()
                with anyio.CancelScope(shield=True):
                    await self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()


def verify_chain(records: Sequence[tuple[int, AuditEvent]], anchor: str | None) -> int | None:
    """Check ``records`` (in chain order) link up from ``anchor``; return the first bad seq.

    ``anchor`` is the ``prev_hash`` the first record must carry (None for a chain that
    starts at its very first record). Returns None when the chain is intact.
    """
    prev = anchor
    for seq, event in records:
        if event.prev_hash != prev or event.hash != audit_hash(prev, event):
            return seq
        prev = event.hash
    return None


@attrs.frozen
class ChainReport:
    """What ``verify_store`` found: ``first_bad_seq`` is None when the chain is intact."""

    checked: int
    first_seq: int | None
    last_seq: int | None
    #: the hash of the newest record: write it down to detect a later cut of the tail
    head_hash: str | None
    #: the prev_hash the oldest remaining record carries (None: the chain's very start)
    anchor: str | None
    first_bad_seq: int | None = None
    #: whether a record with the ``expect`` hash was found (None when none was asked for)
    found_expected: bool | None = None

    @property
    def intact(self) -> bool:
        return self.first_bad_seq is None


async def verify_store(driver: StorageDriver, *, page_size: int = 1000,
                       expect: str | None = None) -> ChainReport:
    """Walk the whole audit trail in pages of ``page_size``, checking every link.

    The oldest remaining record's ``prev_hash`` is the anchor: when retention has purged
    older records there is nothing left to check it against. ``expect`` is a record hash
    written down earlier (a past ``head_hash``): the report says whether it is still in
    the chain, which detects newest records cut off since.
    """
    after, checked, first, last = 0, 0, None, None
    anchor: str | None = None
    prev: str | None = None
    found = None if expect is None else False
    while True:
        page = await driver.list_audit(after_seq=after, limit=page_size)
        if not page:
            break
        if first is None:
            first = page[0][0]
            anchor = prev = page[0][1].prev_hash
            if expect is not None and anchor == expect:
                found = True  # the expected record was purged by retention since
        bad = verify_chain(page, prev)
        if bad is not None:
            return ChainReport(checked + [s for s, _ in page].index(bad), first, bad,
                               None, anchor, first_bad_seq=bad, found_expected=found)
        if expect is not None and not found:
            found = any(event.hash == expect for _, event in page)
        checked += len(page)
        last, prev = page[-1][0], page[-1][1].hash
        after = last
    return ChainReport(checked, first, last, prev if checked else None, anchor,
                       found_expected=found)
