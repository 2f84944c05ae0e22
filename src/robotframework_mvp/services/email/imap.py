"""A small blocking IMAP session over stdlib ``imaplib``, run in a worker thread.

It does only what the monitor needs, with UIDs throughout: connect (IMAPS, STARTTLS that
never falls back, or plain), select a folder and read its UIDVALIDITY, search, fetch
sizes and messages without setting ``\\Seen`` (``BODY.PEEK``), and mark processed mail
(``\\Seen`` and/or MOVE, or COPY + ``\\Deleted`` + EXPUNGE where MOVE is missing). Every
call blocks; the monitor runs each in ``anyio.to_thread``. Errors are :class:`ImapError`
with the server's words, never the password.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import re
import socket
from collections.abc import Sequence

from .config import MailboxConfig

__all__ = ["ImapError", "ImapSession", "encode_mailbox_name"]

_FETCH_UID = re.compile(rb"UID (\d+)")
_FETCH_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")


class ImapError(Exception):
    """The server refused a command, or the connection failed."""


def encode_mailbox_name(name: str) -> str:
    """``name`` in IMAP's modified UTF-7 (RFC 3501 5.1.3), quoted for a command."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",")
                       + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    encoded = "".join(out)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(data: Sequence[object] | None) -> str:
    """The server's response text, for an error message."""
    for item in data or ():
        if isinstance(item, bytes):
            return item.decode("utf-8", "replace")[:300]
    return "no details"


class ImapSession:
    """One logged-in connection to one mailbox. Not thread-safe: one call at a time."""

    def __init__(self, mailbox: MailboxConfig, timeout: float) -> None:
        self.mailbox = mailbox
        self.timeout = timeout
        self._conn: imaplib.IMAP4 | None = None
        self.capabilities: frozenset[str] = frozenset()

    # -- connection --------------------------------------------------------------------

    def connect(self) -> None:
        mb = self.mailbox
        try:
            if mb.security == "ssl":
                conn: imaplib.IMAP4 = imaplib.IMAP4_SSL(
                    mb.host, mb.effective_port, ssl_context=mb.make_ssl_context(),
                    timeout=self.timeout)
            else:
                conn = imaplib.IMAP4(mb.host, mb.effective_port, timeout=self.timeout)
            self._conn = conn
            if mb.security == "starttls":
                # Raises when the server does not offer STARTTLS: never log in in clear.
                conn.starttls(ssl_context=mb.make_ssl_context())
            conn.login(mb.username, mb.password)
            _typ, data = conn.capability()
        except (imaplib.IMAP4.error, OSError) as exc:
            self.abort()
            raise ImapError(f"cannot log in to {mb.redacted_url()}: {_describe(exc)}") from None
        words = b" ".join(d for d in data if isinstance(d, bytes)).decode("ascii", "replace")
        self.capabilities = frozenset(words.upper().split())

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def logout(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()

    def abort(self) -> None:
        """Close the socket now; a call blocked in another thread fails at once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(OSError, AttributeError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError, AttributeError):
            conn.shutdown()

    # -- commands ----------------------------------------------------------------------

    def _c(self) -> imaplib.IMAP4:
        if self._conn is None:
            raise ImapError("not connected")
        return self._conn

    def _run(self, what: str, command: str, *args: str) -> list[object]:
        try:
            if command == "SELECT":
                typ, data = self._c().select(args[0])
            else:
                typ, data = self._c().uid(command, *args)
        except (imaplib.IMAP4.error, OSError) as exc:
            raise ImapError(f"{what} failed: {_describe(exc)}") from None
        if typ != "OK":
            raise ImapError(f"{what} was refused: {_text(data)}")
        return list(data)

    def select(self, folder: str) -> int:
        """Open ``folder`` read-write; return its UIDVALIDITY."""
        self._run(f"SELECT {folder!r}", "SELECT", encode_mailbox_name(folder))
        _, data = self._c().response("UIDVALIDITY")
        for item in data or ():
            if isinstance(item, bytes) and item.strip().isdigit():
                return int(item)
        raise ImapError("the server sent no UIDVALIDITY")

    def search(self, criteria: str, above_uid: int) -> list[int]:
        """UIDs above ``above_uid`` that match ``criteria``, ascending."""
        data = self._run("SEARCH", "SEARCH", f"UID {above_uid + 1}:*", criteria)
        uids = {int(w) for item in data if isinstance(item, bytes) for w in item.split()
                if w.isdigit()}
        # ``n:*`` always includes the highest UID, even below n.
        return sorted(uid for uid in uids if uid > above_uid)

    def fetch_sizes(self, uids: Sequence[int]) -> dict[int, int]:
        """``{uid: RFC822.SIZE}`` of the messages that still exist."""
        data = self._run("FETCH sizes", "FETCH", _uid_set(uids), "(UID RFC822.SIZE)")
        sizes: dict[int, int] = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if not isinstance(line, bytes):
                continue
            uid, size = _FETCH_UID.search(line), _FETCH_SIZE.search(line)
            if uid and size:
                sizes[int(uid.group(1))] = int(size.group(1))
        return sizes

    def fetch_message(self, uid: int, *, headers_only: bool = False) -> bytes | None:
        """The raw message (or only its header), without setting ``\\Seen``; None if gone."""
        section = "BODY.PEEK[HEADER]" if headers_only else "BODY.PEEK[]"
        data = self._run(f"FETCH {uid}", "FETCH", str(uid), f"(UID {section})")
        for item in data:
            if isinstance(item, tuple) and len(item) >= 2 and isinstance(item[1], bytes):
                match = _FETCH_UID.search(item[0]) if isinstance(item[0], bytes) else None
                if match is None or int(match.group(1)) == uid:
                    return item[1]
        return None

    def mark_processed(self, uids: Sequence[int], *, seen: bool, move_to: str | None) -> None:
        """Flag ``\\Seen`` and/or move the messages; an unknown target folder is created."""
        if not uids:
            return
        uid_set = _uid_set(uids)
        if seen:
            self._run("STORE \\Seen", "STORE", uid_set, "+FLAGS.SILENT", "(\\Seen)")
        if move_to is None:
            return
        target = encode_mailbox_name(move_to)
        try:
            self._move(uid_set, target)
        except ImapError as exc:
            if "TRYCREATE" not in str(exc):
                raise
            conn = self._c()
            typ, data = conn.create(target)
            if typ != "OK" and "ALREADYEXISTS" not in _text(data).upper():
                raise ImapError(f"cannot create {move_to!r}: {_text(data)}") from None
            self._move(uid_set, target)

    def _move(self, uid_set: str, target: str) -> None:
        if "MOVE" in self.capabilities:
            self._run("MOVE", "MOVE", uid_set, target)
            return
        self._run("COPY", "COPY", uid_set, target)
        self._run("STORE \\Deleted", "STORE", uid_set, "+FLAGS.SILENT", "(\\Deleted)")
        if "UIDPLUS" in self.capabilities:
            self._run("UID EXPUNGE", "EXPUNGE", uid_set)
        else:
            # Without UIDPLUS, EXPUNGE also removes other messages flagged \Deleted.
            try:
                typ, data = self._c().expunge()
            except (imaplib.IMAP4.error, OSError) as exc:
                raise ImapError(f"EXPUNGE failed: {_describe(exc)}") from None
            if typ != "OK":
                raise ImapError(f"EXPUNGE was refused: {_text(data)}")


def _uid_set(uids: Sequence[int]) -> str:
    return ",".join(str(uid) for uid in uids)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, imaplib.IMAP4.error) and exc.args:
        first = exc.args[0]
        text = first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)
        return text[:300]
    return f"{type(exc).__name__}: {exc}"[:300]
