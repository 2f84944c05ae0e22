"""The email monitor's configuration: mailboxes, limits, and the ``RFMVP_EMAIL_*`` variables.

Build it in Python (``EmailMonitorConfig(mailboxes=[MailboxConfig(...)], api_key=...)``) or
from the environment with ``EmailMonitorConfig.from_env()``, which follows the conventions
of ``Settings.from_env``: real variables over a ``.env`` file, ``<VARIABLE>_FILE`` for
secrets, and errors that name the variable and the accepted form without echoing secrets.
A mailbox is written as a URL, ``imaps://user:password@host:993/INBOX?search=UNSEEN``, or as
a JSON object with the fields of :class:`MailboxConfig`.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
from dotenv import dotenv_values

from ...config import _lookup, _parse_bool, _parse_positive_float, _parse_positive_int
from ...errors import ConfigError

__all__ = ["ENV_VARIABLES", "EmailMonitorConfig", "MailboxConfig", "Security"]

Security = Literal["ssl", "starttls", "plain"]

_SECURITY: tuple[Security, ...] = ("ssl", "starttls", "plain")
_DEFAULT_PORTS = {"ssl": 993, "starttls": 143, "plain": 143}
_MAX_KEY_LENGTH = 200  # idempotency keys are 1 to 200 printable characters
_MIB = 1024 * 1024


def _check_text(name: str, *, allow_empty: bool = False) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if not isinstance(value, str) or (not value and not allow_empty):
            raise ConfigError(f"mailbox {name} must be a non-empty string")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ConfigError(f"mailbox {name} must not contain control characters")

    return check


def _check_search(_instance: Any, _attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or not value.isascii() \
            or not value.isprintable():
        raise ConfigError("mailbox search must be IMAP SEARCH criteria in printable ASCII, "
                          "e.g. UNSEEN or UNSEEN FROM \"billing@example.com\"")


def _check_security(_instance: Any, _attribute: Any, value: Any) -> None:
    if value not in _SECURITY:
        raise ConfigError("mailbox security must be ssl (IMAPS), starttls or plain")


def _check_port(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 < value < 65536):
        raise ConfigError("mailbox port must be a whole number from 1 to 65535")


@attrs.frozen
class MailboxConfig:
    """One IMAP folder to watch, and what to do with its messages.

    ``security``: ``ssl`` is implicit TLS (IMAPS, port 993), ``starttls`` upgrades a plain
    connection before logging in (port 143) and never falls back, ``plain`` sends the
    password in clear (tests and trusted networks only). ``search`` is IMAP SEARCH criteria
    in ASCII; the messages it finds become robots of ``kind``. Processed mail is marked
    ``\\Seen`` (``mark_seen``) and/or moved to ``move_to``; the search must leave processed
    mail out (``UNSEEN`` with ``mark_seen``, or any criteria with ``move_to``), or every
    restart checks it again. ``name`` identifies the mailbox in idempotency keys, logs and
    payloads; by default ``user@host:port/folder``.
    """

    host: str = attrs.field(validator=_check_text("host"))
    username: str = attrs.field(validator=_check_text("username"))
    password: str = attrs.field(repr=False, validator=_check_text("password", allow_empty=True))
    security: Security = attrs.field(default="ssl", validator=_check_security)
    port: int | None = attrs.field(default=None, validator=_check_port)
    folder: str = attrs.field(default="INBOX", validator=_check_text("folder"))
    search: str = attrs.field(default="UNSEEN", validator=_check_search)
    kind: str = attrs.field(default="email.received", validator=_check_text("kind"))
    mark_seen: bool = True
    move_to: str | None = attrs.field(default=None)
    name: str | None = attrs.field(default=None)
    priority: int = 0
    cafile: str | None = None
    #: a ready SSL context (Python only), e.g. for a private CA; overrides ``cafile``
    ssl_context: ssl.SSLContext | None = attrs.field(default=None, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.move_to is not None:
            _check_text("move_to")(self, None, self.move_to)
            if self.move_to == self.folder:
                raise ConfigError("mailbox move_to must differ from its folder")
        if self.name is not None:
            _check_text("name")(self, None, self.name)
        if not self.mark_seen and self.move_to is None and self.search.strip().upper() \
                == "UNSEEN":
            raise ConfigError("mailbox search=UNSEEN with mark_seen=false and no move_to "
                              "would find processed mail again; mark it, move it, or use "
                              "other criteria")

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else _DEFAULT_PORTS[self.security]

    @property
    def mailbox_id(self) -> str:
        """The name in idempotency keys, logs and payloads (never holds the password)."""
        return self.name or f"{self.username}@{self.host}:{self.effective_port}/{self.folder}"

    def idempotency_key(self, uidvalidity: int, uid: int) -> str:
        """``imap:<mailbox>:<uidvalidity>:<uid>``; the mailbox is hashed if it is too long."""
        key = f"imap:{self.mailbox_id}:{uidvalidity}:{uid}"
        if len(key) <= _MAX_KEY_LENGTH and key.isprintable():
            return key
        digest = hashlib.sha256(self.mailbox_id.encode()).hexdigest()[:32]
        return f"imap:{digest}:{uidvalidity}:{uid}"

    def make_ssl_context(self) -> ssl.SSLContext:
        """The context that verifies the server (system CAs, or ``cafile``)."""
        if self.ssl_context is not None:
            return self.ssl_context
        return ssl.create_default_context(cafile=self.cafile)

    def redacted_url(self) -> str:
        """The mailbox as a URL without its password, for logs and errors."""
        scheme = "imaps" if self.security == "ssl" else "imap"
        return f"{scheme}://{self.username}@{self.host}:{self.effective_port}/{self.folder}"

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> MailboxConfig:
        """``imaps://user:pass@host[:port]/FOLDER?search=...&kind=...&move_to=...``.

        ``imaps://`` is implicit TLS; ``imap://`` is STARTTLS unless ``security=plain``.
        Percent-encode reserved characters in the user, password and values. Query keys:
        ``search``, ``kind``, ``move_to``, ``mark_seen``, ``name``, ``priority``,
        ``cafile``, ``security``. ``overrides`` win over the URL.
        """
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError:
            raise ConfigError("a mailbox URL is malformed (bad port or brackets)") from None
        where = f"{parts.scheme}://{parts.hostname or '?'}"
        if parts.scheme not in ("imap", "imaps"):
            raise ConfigError(f"mailbox URL {where}: the scheme must be imaps:// or imap://")
        if not parts.hostname or parts.username is None or parts.password is None:
            raise ConfigError(f"mailbox URL {where}: write it as "
                              "imaps://USER:PASSWORD@HOST[:PORT]/FOLDER")
        fields: dict[str, Any] = {
            "host": parts.hostname, "username": unquote(parts.username),
            "password": unquote(parts.password), "port": port,
            "security": "ssl" if parts.scheme == "imaps" else "starttls",
        }
        folder = unquote(parts.path.lstrip("/"))
        if folder:
            fields["folder"] = folder
        known = {"search", "kind", "move_to", "mark_seen", "name", "priority", "cafile",
                 "security"}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in known:
                raise ConfigError(f"mailbox URL {where}: unknown parameter {key!r}; use "
                                  f"{', '.join(sorted(known))}")
            fields[key] = _parse_field(where, key, value)
        if parts.scheme == "imaps" and fields["security"] != "ssl":
            raise ConfigError(f"mailbox URL {where}: imaps:// is always implicit TLS; use "
                              "imap:// for starttls or plain")
        fields.update(overrides)
        return cls(**fields)


def _parse_field(where: str, key: str, value: str) -> Any:
    try:
        if key == "mark_seen":
            return _parse_bool(value)
        if key == "priority":
            return int(value)
    except ValueError:
        raise ConfigError(f"mailbox URL {where}: {key} has a bad value") from None
    if key in ("move_to", "name", "cafile") and not value:
        return None
    return value


def _non_negative(name: str) -> Callable[[Any, Any, Any], None]:
    def check(_instance: Any, _attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
                or value == float("inf"):
            raise ConfigError(f"{name} must be a number above 0")

    return check


@attrs.frozen
class EmailMonitorConfig:
    """Everything the email monitor needs; ``from_env()`` reads ``RFMVP_EMAIL_*``.

    ``api_key`` is the key the monitor submits robots with, so authentication, rate
    limits, sanitization and the audit trail apply to it as to any client.
    """

    mailboxes: tuple[MailboxConfig, ...] = attrs.field(converter=tuple)
    api_key: str | None = attrs.field(default=None, repr=False)
    attachment_dir: Path = attrs.field(default=Path("rfmvp-data/email-attachments"),
                                       converter=Path)
    poll_interval: float = attrs.field(default=60.0,
                                       validator=_non_negative("RFMVP_EMAIL_POLL_INTERVAL"))
    max_attachment_bytes: int = attrs.field(
        default=10 * _MIB, validator=_non_negative("RFMVP_EMAIL_MAX_ATTACHMENT_BYTES"))
    max_message_bytes: int = attrs.field(
        default=25 * _MIB, validator=_non_negative("RFMVP_EMAIL_MAX_MESSAGE_BYTES"))
    max_body_chars: int | None = None
    batch_size: int = attrs.field(default=20, validator=_non_negative("RFMVP_EMAIL_BATCH_SIZE"))
    timeout: float = attrs.field(default=30.0, validator=_non_negative("RFMVP_EMAIL_TIMEOUT"))
    retry_base_seconds: float = attrs.field(
        default=1.0, validator=_non_negative("RFMVP_EMAIL_RETRY_BASE_SECONDS"))
    retry_cap_seconds: float = attrs.field(
        default=300.0, validator=_non_negative("RFMVP_EMAIL_RETRY_CAP_SECONDS"))

    def __attrs_post_init__(self) -> None:
        for mailbox in self.mailboxes:
            if not isinstance(mailbox, MailboxConfig):
                raise ConfigError("mailboxes must be MailboxConfig objects")
        ids = [m.mailbox_id for m in self.mailboxes]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ConfigError(f"two mailboxes are named {duplicates[0]!r}; give one a name=")
        if self.max_body_chars is not None:
            _non_negative("RFMVP_EMAIL_MAX_BODY_CHARS")(self, None, self.max_body_chars)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
        prefix: str = "RFMVP_",
    ) -> EmailMonitorConfig:
        """Read ``RFMVP_EMAIL_*`` from ``environ`` (default ``os.environ``) over ``.env``."""
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        fields: dict[str, Any] = {}
        for field, (suffix, parse, form) in _ENV_FIELDS.items():
            name = prefix + suffix
            raw = _lookup(values, name)
            if raw is None or (not raw.strip() and field != "mailboxes"):
                continue
            try:
                fields[field] = parse(raw)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            except ValueError:
                raise ConfigError(f"{name} has a bad value; expected {form}") from None
        fields.setdefault("mailboxes", ())
        return cls(**fields)


def parse_mailboxes(text: str) -> tuple[MailboxConfig, ...]:
    """A JSON array (of URLs or objects) or URLs separated by commas, spaces or lines."""
    text = text.strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            # The text holds passwords: say where, never what.
            raise ConfigError("is not valid JSON") from None
        if not isinstance(items, list):
            raise ConfigError("must be a JSON array")
        return tuple(_mailbox_from_json(i, item) for i, item in enumerate(items))
    return tuple(MailboxConfig.from_url(url) for url in text.replace(",", " ").split())


def _mailbox_from_json(index: int, item: object) -> MailboxConfig:
    if isinstance(item, str):
        return MailboxConfig.from_url(item)
    if not isinstance(item, dict):
        raise ConfigError(f"item {index} must be a URL or an object")
    fields = dict(item)
    known = {a.name for a in attrs.fields(MailboxConfig)} - {"ssl_context"}
    unknown = sorted(set(fields) - known - {"url"})
    if unknown:
        raise ConfigError(f"item {index} has unknown fields {unknown}; use url or "
                          f"{', '.join(sorted(known))}")
    url = fields.pop("url", None)
    try:
        if url is not None:
            return MailboxConfig.from_url(str(url), **fields)
        return MailboxConfig(**fields)
    except TypeError:
        raise ConfigError(f"item {index} needs host, username and password (or url)") from None


_ENV_FIELDS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "mailboxes": ("EMAIL_MAILBOXES", parse_mailboxes,
                  "imaps://USER:PASSWORD@HOST/FOLDER URLs or a JSON array"),
    "api_key": ("EMAIL_API_KEY", str.strip, "an API key"),
    "attachment_dir": ("EMAIL_ATTACHMENT_DIR", str.strip, "a directory"),
    "poll_interval": ("EMAIL_POLL_INTERVAL", _parse_positive_float, "seconds above 0"),
    "max_attachment_bytes": ("EMAIL_MAX_ATTACHMENT_BYTES", _parse_positive_int,
                             "a whole number of bytes above 0"),
    "max_message_bytes": ("EMAIL_MAX_MESSAGE_BYTES", _parse_positive_int,
                          "a whole number of bytes above 0"),
    "max_body_chars": ("EMAIL_MAX_BODY_CHARS", _parse_positive_int,
                       "a whole number above 0"),
    "batch_size": ("EMAIL_BATCH_SIZE", _parse_positive_int, "a whole number above 0"),
    "timeout": ("EMAIL_TIMEOUT", _parse_positive_float, "seconds above 0"),
    "retry_base_seconds": ("EMAIL_RETRY_BASE_SECONDS", _parse_positive_float,
                           "seconds above 0"),
    "retry_cap_seconds": ("EMAIL_RETRY_CAP_SECONDS", _parse_positive_float,
                          "seconds above 0"),
}

#: every variable the monitor reads (``RFMVP_`` + these), for the unknown-variable check
ENV_VARIABLES: Sequence[str] = tuple(suffix for suffix, _, _ in _ENV_FIELDS.values())
