"""From a raw RFC 5322 message to a robot payload, with attachments stored by reference.

The payload holds the sender, recipients, subject, date, Message-ID and body text
(``text/plain`` preferred, else HTML flattened to text), each cleaned of the control
characters the sanitizer refuses and cut to the payload limits with a flag saying so.
Attachments never travel inline: each is written once to a content-addressed directory
(``<dir>/<sha256[:2]>/<sha256>``) and listed with its name, type, size, SHA-256 and a
``file://`` URI; one above the size limit is listed with ``"skipped": "too large"``.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator
from email.message import EmailMessage, Message
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import attrs

__all__ = ["AttachmentStore", "MessageLimits", "build_payload", "html_to_text",
           "unparsable_payload"]

# What sanitize_payload refuses in a string: C0 controls but tab, newline and carriage
# return; DEL and C1 controls; lone surrogates.
_FORBIDDEN_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_MAX_FILENAME = 255
TOO_LARGE = "too large"
UNPARSABLE = "unparsable"


@attrs.frozen
class MessageLimits:
    """How much of a message goes into a payload (from the monitor and payload settings)."""

    max_attachment_bytes: int
    max_text_chars: int
    max_header_chars: int
    max_payload_chars: int
    max_items: int


class AttachmentStore:
    """Content-addressed files: the same bytes are stored once, under their SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def put(self, data: bytes) -> tuple[str, Path]:
        """Store ``data`` (atomically, once); return its hex SHA-256 and its path."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest[:2] / digest
        if path.is_file() and path.stat().st_size == len(data):
            return digest, path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest, path


def clean_text(text: str) -> str:
    """``text`` without the characters a payload may not hold, NFC-normalized."""
    text = _FORBIDDEN_CHAR.sub("", text.replace("\r\n", "\n"))
    return unicodedata.normalize("NFC", text)


def _cut(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else (text[:limit], True)


class _TextExtractor(HTMLParser):
    _SKIP = frozenset({"script", "style", "head", "title", "template"})
    _BLOCK = frozenset({"p", "div", "br", "li", "tr", "table", "ul", "ol", "section",
                        "article", "header", "footer", "blockquote", "pre", "hr",
                        "h1", "h2", "h3", "h4", "h5", "h6"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag == "td":
            self.parts.append("\t")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """A crude plain-text rendering of HTML: tags dropped, blocks on their own lines."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).splitlines())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _header(msg: Message, name: str) -> Any:
    try:
        return msg[name]
    except Exception:  # a malformed header must not lose the message
        return None


def _addresses(msg: Message, name: str) -> list[dict[str, str | None]]:
    header = _header(msg, name)
    if header is None:
        return []
    found: list[dict[str, str | None]] = []
    try:
        for address in header.addresses:
            found.append({"name": address.display_name or None,
                          "address": address.addr_spec or None})
    except Exception:
        found.append({"name": None, "address": str(header)})
    return found


def _text_content(part: Message) -> str:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except Exception:  # noqa: S110 - an unknown charset falls back to lenient UTF-8 below
        pass
    raw = part.get_payload(decode=True)
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""


def _leaves(part: Message) -> Iterator[Message]:
    if part.is_multipart() and part.get_content_maintype() == "multipart":
        for sub in part.get_payload():
            if isinstance(sub, Message):
                yield from _leaves(sub)
    else:
        yield part


def _part_bytes(part: Message) -> bytes:
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            return inner[0].as_bytes()
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    if not name:
        return None
    name = clean_text(str(name)).replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:_MAX_FILENAME] or None


def _is_attachment(part: Message, body: Message | None) -> bool:
    if part is body:
        return False
    if part.get_content_type() in ("text/plain", "text/html"):
        # The other half of an alternative, or an inline text fragment: part of the body.
        return bool(part.get_filename()) or part.get_content_disposition() == "attachment"
    return True


def _attachment(part: Message, store: AttachmentStore, limits: MessageLimits
                ) -> dict[str, Any]:
    data = _part_bytes(part)
    entry: dict[str, Any] = {"filename": _filename(part),
                             "content_type": part.get_content_type(), "size": len(data)}
    if len(data) > limits.max_attachment_bytes:
        entry["skipped"] = TOO_LARGE
        return entry
    digest, path = store.put(data)
    entry["sha256"] = digest
    entry["uri"] = path.as_uri()
    return entry


def build_payload(
    raw: bytes,
    *,
    complete: bool,
    size: int,
    meta: dict[str, Any],
    store: AttachmentStore,
    limits: MessageLimits,
) -> dict[str, Any]:
    """The robot payload for one message; ``meta`` (mailbox, folder, UIDs) comes first.

    ``complete`` is False when only the header was fetched (the message was above the
    size limit): the payload then says ``"skipped": "too large"`` and has no body.
    """
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    senders = _addresses(msg, "From")
    date_header = _header(msg, "Date")
    date: str | None = None
    try:
        if date_header is not None and date_header.datetime is not None:
            date = date_header.datetime.isoformat()
    except Exception:
        date = None
    subject, _ = _cut(clean_text(str(_header(msg, "Subject") or "")), limits.max_header_chars)
    message_id, _ = _cut(clean_text(str(_header(msg, "Message-ID") or "").strip()),
                         limits.max_header_chars)
    payload: dict[str, Any] = {
        **meta,
        "message_id": message_id or None,
        "date": date,
        "sender": senders[0] if senders else None,
        "to": _addresses(msg, "To"),
        "cc": _addresses(msg, "Cc"),
        "subject": subject,
        "size": size,
        "text": "",
        "text_format": "none",
        "text_truncated": False,
        "attachments": [],
    }
    for field in ("to", "cc"):
        for address in payload[field]:
            for key, value in address.items():
                if isinstance(value, str):
                    address[key] = _cut(clean_text(value), limits.max_header_chars)[0]
    if payload["sender"] is not None:
        for key, value in payload["sender"].items():
            if isinstance(value, str):
                payload["sender"][key] = _cut(clean_text(value), limits.max_header_chars)[0]
    if not complete:
        payload["skipped"] = TOO_LARGE
        return _fit(payload, limits)
    body = msg.get_body(preferencelist=("plain", "html")) if isinstance(msg, EmailMessage) \
        else None
    if body is not None:
        text = _text_content(body)
        if body.get_content_subtype() == "html":
            text, payload["text_format"] = html_to_text(text), "html"
        else:
            payload["text_format"] = "plain"
        payload["text"], payload["text_truncated"] = _cut(clean_text(text).strip(),
                                                          limits.max_text_chars)
    attachments = [_attachment(part, store, limits) for part in _leaves(msg)
                   if _is_attachment(part, body)]
    payload["attachments"] = attachments
    return _fit(payload, limits)


def unparsable_payload(meta: dict[str, Any], size: int) -> dict[str, Any]:
    """The payload of a message the parser failed on: where it is, and no content."""
    return {**meta, "message_id": None, "date": None, "sender": None, "to": [], "cc": [],
            "subject": "", "size": size, "text": "", "text_format": "none",
            "text_truncated": False, "attachments": [], "skipped": UNPARSABLE}


def _chars(value: Any) -> int:
    """What a payload costs against ``RFMVP_MAX_PAYLOAD_BYTES``: its keys and strings."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + _chars(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _fit(payload: dict[str, Any], limits: MessageLimits) -> dict[str, Any]:
    """Shrink the payload under the limits: the body first, then lists, then the rest."""
    for field in ("to", "cc", "attachments"):
        if len(payload[field]) > limits.max_items:
            payload[f"{field}_omitted"] = len(payload[field]) - limits.max_items
            payload[field] = payload[field][:limits.max_items]
    over = _chars(payload) - limits.max_payload_chars
    if over > 0 and payload["text"]:
        keep = max(0, len(payload["text"]) - over - 32)
        payload["text"], payload["text_truncated"] = payload["text"][:keep], True
    for field in ("cc", "to", "attachments"):
        while _chars(payload) > limits.max_payload_chars and payload[field]:
            payload[field] = payload[field][:-1]
            payload[f"{field}_omitted"] = payload.get(f"{field}_omitted", 0) + 1
    return payload
