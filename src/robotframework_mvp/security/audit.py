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

from ..models import AuditEvent, audit_hash, utcnow
from ..state.driver import StorageDriver

__all__ = ["AuditLog", "verify_chain"]

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
        while self._buffer:
            batch, self._buffer = self._buffer[:_MAX_BATCH], self._buffer[_MAX_BATCH:]
            try:
                written = await self.driver.append_audit(batch)
            except Exception:
                # Keep the records for the next flush rather than lose them.
                self.write_errors += 1
                self._buffer[:0] = batch
                log.exception("writing %d audit records failed; will retry", len(batch))
                return
            self.written += len(written)
            if self.on_written is not None:
                await self.on_written(written)

    async def run(self) -> None:
        """Flush every ``flush_interval`` (or as soon as a batch is full) until cancelled."""
        try:
            while True:
                with anyio.move_on_after(self.flush_interval):
                    await self._wake.wait()
                self._wake = anyio.Event()
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
