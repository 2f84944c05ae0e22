"""EmailMonitor: turn each new message of watched IMAP folders into a robot.

A built-in plugin on the hooks a third-party plugin would use. Enable it with
``RFMVP_PLUGINS=robotframework_mvp.services.email_monitor`` (configured by the
``RFMVP_EMAIL_*`` variables), or pass ``EmailMonitor(mailboxes=[...], api_key=...)`` in
``Orchestrator(plugins=[...])``. Each mailbox is watched by one ``background_tasks`` task
that polls it: select the folder, search, fetch each message without setting ``\\Seen``,
submit it through ``Orchestrator.submit`` (authentication, rate limits, sanitization and
audit apply) with the idempotency key ``imap:<mailbox>:<uidvalidity>:<uid>``, then mark it
``\\Seen`` and/or move it. A crash anywhere in between leaves the message matching the
search; the next poll submits it again and the key returns the robot already made, so a
message is neither lost nor doubled. Failures are logged, counted in ``status()`` and in
the ``email.poll`` metrics, and retried with backoff; they never stop the orchestrator.
See ``docs/services/email-monitor.md``.
"""

from __future__ import annotations

import functools
import logging
import random
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import anyio.to_thread
import attrs

from ..errors import ConfigError, PayloadTooLargeError, RateLimitedError, ValidationError
from ..hookspecs import hookimpl
from ..models import utcnow
from ..security.sanitize import PayloadLimits
from .email.config import EmailMonitorConfig, MailboxConfig
from .email.imap import ImapError, ImapSession
from .email.message import AttachmentStore, MessageLimits, build_payload, unparsable_payload

if TYPE_CHECKING:
    from ..orchestrator import Orchestrator

__all__ = [
    "EmailMonitor",
    "EmailMonitorConfig",
    "MailboxConfig",
    "MailboxStatus",
    "background_tasks",
    "monitors",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Outcome = Literal["created", "existing", "rejected", "gone"]

#: longest we wait on our own principal's rate limit before asking again
_MAX_RATE_LIMIT_WAIT = 60.0
_MAX_HEADER_CHARS = 998  # RFC 5322's longest line

_FROM_ENV: weakref.WeakKeyDictionary[Orchestrator, EmailMonitor] = weakref.WeakKeyDictionary()


@attrs.define
class MailboxStatus:
    """What one watched mailbox has done; ``EmailMonitor.status()`` returns copies.

    ``state`` is ``starting`` until the first poll ends, then ``ok`` or ``failing``.
    ``created`` counts new robots, ``existing`` messages whose robot already existed
    (submitted before a crash or by another process), ``rejected`` messages the
    orchestrator refused for good (left unmarked in the mailbox).
    """

    mailbox: str
    state: Literal["starting", "ok", "failing"] = "starting"
    uidvalidity: int | None = None
    last_uid: int = 0
    last_poll_at: datetime | None = None
    last_success_at: datetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    failures: int = 0
    polls: int = 0
    created: int = 0
    existing: int = 0
    rejected: int = 0
    marked: int = 0
    rate_limited: int = 0
    uidvalidity_changes: int = 0


class EmailMonitor:
    """The plugin: ``EmailMonitor(config)`` or ``EmailMonitor(mailboxes=[...], api_key=...)``.

    One instance serves one running orchestrator at a time.
    """

    def __init__(self, config: EmailMonitorConfig | None = None, **fields: Any) -> None:
        if config is not None and fields:
            raise TypeError("pass either an EmailMonitorConfig or its fields, not both")
        self.config = config if config is not None else EmailMonitorConfig(**fields)
        self._watchers: dict[str, _Watcher] = {}

    def status(self) -> dict[str, MailboxStatus]:
        """Each mailbox's status (a copy), by mailbox name."""
        return {name: attrs.evolve(w.status) for name, w in self._watchers.items()}

    def poll_now(self) -> None:
        """Wake every watcher: poll at once instead of at the next interval or retry."""
        for watcher in self._watchers.values():
            watcher.wake()

    @hookimpl
    def background_tasks(self, orchestrator: Orchestrator
                         ) -> list[Callable[[], Awaitable[None]]]:
        cfg = self.config
        if cfg.api_key is None:
            raise ConfigError("RFMVP_EMAIL_API_KEY is not set: the email monitor submits "
                              "robots with an API key of its own principal")
        try:
            cfg.attachment_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"RFMVP_EMAIL_ATTACHMENT_DIR: cannot create "
                              f"{str(cfg.attachment_dir)!r}: {exc.strerror}") from None
        store = AttachmentStore(cfg.attachment_dir)
        payload_limits = PayloadLimits.from_config(orchestrator.settings.security)
        limits = MessageLimits(
            max_attachment_bytes=cfg.max_attachment_bytes,
            max_text_chars=min(cfg.max_body_chars or payload_limits.max_string_length,
                               payload_limits.max_string_length),
            max_header_chars=min(_MAX_HEADER_CHARS, payload_limits.max_string_length),
            max_payload_chars=payload_limits.max_bytes,
            max_items=min(100, payload_limits.max_keys),
        )
        known = orchestrator.balancer.known_kinds()
        self._watchers = {}
        for mailbox in cfg.mailboxes:
            if mailbox.kind not in known:
                log.warning("email monitor %s: no module here runs kind %r; its messages "
                            "wait until one does", mailbox.mailbox_id, mailbox.kind)
            self._watchers[mailbox.mailbox_id] = _Watcher(cfg, mailbox, orchestrator, store,
                                                          limits)
        return [watcher.run for watcher in self._watchers.values()]


class _Watcher:
    """Polls one mailbox for as long as its task runs."""

    def __init__(self, config: EmailMonitorConfig, mailbox: MailboxConfig,
                 orchestrator: Orchestrator, store: AttachmentStore,
                 limits: MessageLimits) -> None:
        self.config = config
        self.mailbox = mailbox
        self.orch = orchestrator
        self.store = store
        self.limits = limits
        self.status = MailboxStatus(mailbox.mailbox_id)
        self._session: ImapSession | None = None
        self._wake = anyio.Event()
        self._rejected: set[int] = set()
        # Threads of our own: blocked IMAP calls never starve the store's thread pool.
        self._limiter: anyio.CapacityLimiter | None = None

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self._limiter = anyio.CapacityLimiter(1)
        log.info("email monitor: watching %s for kind %r", self.mailbox.redacted_url(),
                 self.mailbox.kind)
        try:
            while True:
                delay = await self._poll_and_report()
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
        finally:
            self._drop_session()

    # -- one poll ----------------------------------------------------------------------

    async def _poll_and_report(self) -> float:
        """Poll once; return how long to wait before the next poll."""
        st = self.status
        st.last_poll_at = utcnow()
        st.polls += 1
        try:
            with self.orch.tracker.measure("email.poll"):
                await self._poll_reconnecting()
        except Exception as exc:
            self._drop_session()
            st.failures += 1
            st.consecutive_failures += 1
            st.state = "failing"
            st.last_error = _describe(exc)
            delay = self._backoff(st.consecutive_failures)
            log.error("email monitor %s: %s; retrying in %.1f s (failure %d in a row)",
                      self.mailbox.mailbox_id, st.last_error, delay, st.consecutive_failures,
                      exc_info=not isinstance(exc, ImapError | ValidationError))
            return delay
        if st.state == "failing":
            log.info("email monitor %s: polling works again", self.mailbox.mailbox_id)
        st.state = "ok"
        st.consecutive_failures = 0
        st.last_success_at = utcnow()
        return self.config.poll_interval

    def _backoff(self, failures: int) -> float:
        """Exponential backoff with equal jitter: never a tight loop, never past the cap."""
        cfg = self.config
        ceiling = min(cfg.retry_cap_seconds,
                      cfg.retry_base_seconds * 2.0 ** min(failures - 1, 30))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))

    async def _poll_reconnecting(self) -> None:
        reused = self._session is not None
        try:
            await self._poll_once()
        except ImapError:
            if not reused:
                raise
            # The kept connection may have timed out on the server side: one fresh try.
            self._drop_session()
            await self._poll_once()

    async def _poll_once(self) -> None:
        mb, st = self.mailbox, self.status
        session = await self._open_session()
        uidvalidity = await self._call(session.select, mb.folder)
        if uidvalidity != st.uidvalidity:
            if st.uidvalidity is not None:
                st.uidvalidity_changes += 1
                log.warning("email monitor %s: UIDVALIDITY changed from %d to %d; the folder "
                            "was recreated, so its messages are new ones", mb.mailbox_id,
                            st.uidvalidity, uidvalidity)
            st.uidvalidity, st.last_uid = uidvalidity, 0
            self._rejected.clear()
        uids = await self._call(session.search, mb.search, st.last_uid)
        uids = [uid for uid in uids if uid not in self._rejected]
        size = self.config.batch_size
        for start in range(0, len(uids), size):
            await self._process_batch(session, uidvalidity, uids[start:start + size])

    async def _process_batch(self, session: ImapSession, uidvalidity: int,
                             batch: list[int]) -> None:
        mb, st = self.mailbox, self.status
        sizes = await self._call(session.fetch_sizes, batch)
        done: list[int] = []
        try:
            for uid in batch:
                if uid not in sizes:
                    continue  # expunged since the search
                outcome = await self._handle(session, uidvalidity, uid, sizes[uid])
                if outcome == "rejected":
                    self._rejected.add(uid)
                elif outcome != "gone":
                    done.append(uid)
        finally:
            # Mark what was submitted even when a later message failed: fewer repeats.
            if done:
                await self._call(session.mark_processed, done, seen=mb.mark_seen,
                                 move_to=mb.move_to)
                st.marked += len(done)
        st.last_uid = max(st.last_uid, *batch)

    async def _handle(self, session: ImapSession, uidvalidity: int, uid: int,
                      size: int) -> Outcome:
        mb = self.mailbox
        too_large = size > self.config.max_message_bytes
        raw = await self._call(session.fetch_message, uid, headers_only=too_large)
        if raw is None:
            return "gone"
        meta = {"mailbox": mb.mailbox_id, "folder": mb.folder, "uidvalidity": uidvalidity,
                "uid": uid}
        try:
            payload = await anyio.to_thread.run_sync(functools.partial(
                build_payload, raw, complete=not too_large, size=size, meta=meta,
                store=self.store, limits=self.limits), limiter=self._limiter)
        except OSError:
            raise  # the attachment directory: retried with the poll
        except Exception:
            # A message the parser chokes on must not block the mailbox forever.
            log.exception("email monitor %s: message %d cannot be parsed; its robot says "
                          "\"skipped\": \"unparsable\"", mb.mailbox_id, uid)
            payload = unparsable_payload(meta, size)
        if too_large:
            log.warning("email monitor %s: message %d is %d bytes, above "
                        "RFMVP_EMAIL_MAX_MESSAGE_BYTES; its robot gets the header only",
                        mb.mailbox_id, uid, size)
        return await self._submit(payload, mb.idempotency_key(uidvalidity, uid), uid)

    async def _submit(self, payload: dict[str, Any], key: str, uid: int) -> Outcome:
        mb, st = self.mailbox, self.status
        while True:
            started = utcnow()
            try:
                robot = await self.orch.submit(
                    mb.kind, payload, api_key=self.config.api_key, priority=mb.priority,
                    idempotency_key=key, client=f"imap:{mb.mailbox_id}"[:200])
            except RateLimitedError as exc:
                st.rate_limited += 1
                await anyio.sleep(min(max(exc.retry_after, 0.01), _MAX_RATE_LIMIT_WAIT))
                continue
            except (ValidationError, PayloadTooLargeError) as exc:
                if isinstance(exc, ValidationError) and (exc.path or "").startswith("$.kind"):
                    raise  # no module runs the kind (yet): every message would fail
                st.rejected += 1
                log.error("email monitor %s: message %d was refused (%s); it stays in the "
                          "mailbox unmarked", mb.mailbox_id, uid, exc.message)
                return "rejected"
            # A robot made by an earlier attempt (before a crash) predates this call.
            if robot.created_at < started:
                st.existing += 1
                return "existing"
            st.created += 1
            return "created"

    # -- the IMAP session --------------------------------------------------------------

    async def _open_session(self) -> ImapSession:
        if self._session is None:
            session = ImapSession(self.mailbox, self.config.timeout)
            await self._call(session.connect)
            self._session = session
        return self._session

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.abort()

    async def _call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking IMAP call in a thread; on cancellation, abandon it and close the
        socket so the thread ends too."""
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(func, *args, **kwargs), abandon_on_cancel=True,
                limiter=self._limiter)
        except anyio.get_cancelled_exc_class():
            self._drop_session()
            raise


def _describe(exc: Exception) -> str:
    """One line for the log and ``status()``; IMAP errors never hold the password."""
    if isinstance(exc, ImapError):
        return str(exc)
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}"[:500]


# -- configured from the environment (RFMVP_PLUGINS=robotframework_mvp.services.email_monitor)


@hookimpl
def background_tasks(orchestrator: Orchestrator) -> list[Callable[[], Awaitable[None]]]:
    """Watch the mailboxes of ``RFMVP_EMAIL_MAILBOXES``."""
    config = EmailMonitorConfig.from_env()
    if not config.mailboxes:
        raise ConfigError("RFMVP_PLUGINS enables robotframework_mvp.services.email_monitor but "
                          "RFMVP_EMAIL_MAILBOXES is empty; set it to imaps:// URLs")
    monitor = EmailMonitor(config)
    _FROM_ENV[orchestrator] = monitor
    return monitor.background_tasks(orchestrator)


def monitors(orchestrator: Orchestrator) -> list[EmailMonitor]:
    """The email monitors running in ``orchestrator`` (to read their ``status()``)."""
    found = [p for p in orchestrator.pm.get_plugins() if isinstance(p, EmailMonitor)]
    env_monitor = _FROM_ENV.get(orchestrator)
    return found + ([env_monitor] if env_monitor is not None else [])
