"""EmailMonitor against a real IMAP server (dovecot, started by the fixtures).

Each test has a mailbox user of its own. Nothing sleeps and hopes: every wait is on a
condition (robots stored, flags set, failures counted) with a deadline.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import anyio
import pytest

from robotframework_mvp import ConfigError, Orchestrator, Robot, hookimpl, module
from robotframework_mvp.config import _NOT_SETTINGS, Settings
from robotframework_mvp.services.email.config import ENV_VARIABLES
from robotframework_mvp.services.email.imap import ImapError, ImapSession, encode_mailbox_name
from robotframework_mvp.services.email.message import html_to_text
from robotframework_mvp.services.email_monitor import (
    EmailMonitor,
    EmailMonitorConfig,
    MailboxConfig,
    monitors,
)
from robotframework_mvp.testing import TEST_API_KEY, test_settings

if TYPE_CHECKING:
    from conftest import Dovecot

pytestmark = pytest.mark.anyio

KIND = "email.received"


@module("email-sink", kinds=[KIND])
async def email_sink(robot: Robot, ctx: Any) -> dict[str, Any]:
    return {"subject": robot.payload["subject"]}


def message(subject: str, body: str | None = "Hello robots.", *, html: str | None = None,
            sender: str = "Alice Example <alice@example.com>",
            attachments: tuple[tuple[str, bytes, str], ...] = ()) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "Robots <robots@example.com>, ops@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg["Date"] = formatdate(localtime=False)
    if body is not None:
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    for filename, data, content_type in attachments:
        maintype, subtype = content_type.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def mailbox(server: Dovecot, user: str, **changes: Any) -> MailboxConfig:
    fields: dict[str, Any] = {"host": server.host, "port": server.port, "username": user,
                              "password": server.password, "security": "plain"}
    fields.update(changes)
    return MailboxConfig(**fields)


def monitor(tmp_path: Path, *mailboxes: MailboxConfig, **changes: Any) -> EmailMonitor:
    fields: dict[str, Any] = {
        "mailboxes": mailboxes, "api_key": TEST_API_KEY,
        "attachment_dir": tmp_path / "attachments", "poll_interval": 0.1,
        "retry_base_seconds": 0.05, "retry_cap_seconds": 0.5, "timeout": 10.0,
    }
    fields.update(changes)
    return EmailMonitor(**fields)


@asynccontextmanager
async def running(tmp_path: Path, *plugins: object, settings: Settings | None = None
                  ) -> AsyncIterator[Orchestrator]:
    """An orchestrator on ``tmp_path/robots.db``: a second one sees the first one's robots."""
    settings = settings or test_settings(f"sqlite:///{tmp_path / 'robots.db'}")
    async with Orchestrator(settings, modules=[email_sink], plugins=plugins) as orch:
        yield orch


async def robots(orch: Orchestrator) -> list[Robot]:
    page = await orch.list(api_key=TEST_API_KEY, kind=KIND, limit=500)
    return sorted(page.items, key=lambda r: (r.payload["uidvalidity"], r.payload["uid"]))


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str,
                     timeout: float = 20.0) -> None:
    """Wait until ``check()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while True:
                value = check()
                if inspect.isawaitable(value):
                    value = await value
                if value:
                    return
                await anyio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


def robot_count(orch: Orchestrator, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await robots(orch)) == n

    return check


# -- configuration (no server) ---------------------------------------------------------


def test_mailbox_urls_have_secure_defaults_and_carry_the_options() -> None:
    imaps = MailboxConfig.from_url("imaps://bob:p%40ss%3Aw0rd@mail.example.com/Orders%2F2024"
                                   "?search=UNSEEN%20FROM%20%22x%40y%22&kind=invoice.email"
                                   "&move_to=Done&priority=5&name=orders")
    assert (imaps.security, imaps.effective_port, imaps.password) == ("ssl", 993, "p@ss:w0rd")
    assert (imaps.folder, imaps.search, imaps.kind) == ("Orders/2024", 'UNSEEN FROM "x@y"',
                                                        "invoice.email")
    assert (imaps.move_to, imaps.priority, imaps.mailbox_id) == ("Done", 5, "orders")
    assert imaps.idempotency_key(7, 42) == "imap:orders:7:42"
    starttls = MailboxConfig.from_url("imap://bob:pw@mail.example.com")
    assert (starttls.security, starttls.effective_port, starttls.folder) == ("starttls", 143,
                                                                             "INBOX")
    assert starttls.mailbox_id == "bob@mail.example.com:143/INBOX"
    plain = MailboxConfig.from_url("imap://bob:pw@127.0.0.1:1143/?security=plain")
    assert (plain.security, plain.effective_port) == ("plain", 1143)
    assert "pw" not in repr(plain)
    assert "pw" not in plain.redacted_url()


@pytest.mark.parametrize(("url", "says"), [
    ("pop3://bob:s3cret-pw@host/", "scheme"),
    ("imaps://bob@host/", "USER:PASSWORD"),
    ("imaps://bob:s3cret-pw@host/?colour=red", "unknown parameter"),
    ("imaps://bob:s3cret-pw@host/?security=plain", "implicit TLS"),
    ("imap://bob:s3cret-pw@host/?security=carrier-pigeon", "security"),
    ("imaps://bob:s3cret-pw@host/INBOX?move_to=INBOX", "move_to"),
    ("imaps://bob:s3cret-pw@host/?mark_seen=false", "processed mail"),
    ("imaps://bob:s3cret-pw@host/?search=UNSEEN%0AX", "search"),
])
def test_bad_mailbox_urls_are_refused_without_echoing_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as refused:
        MailboxConfig.from_url(url)
    assert "s3cret-pw" not in str(refused.value)


def test_the_configuration_is_read_from_the_environment_and_files(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("monitor-key-0123456789\n")
    environ = {
        "RFMVP_EMAIL_MAILBOXES": '["imaps://a:pw@h1/INBOX", {"url": "imap://b:pw@h2/", '
                                 '"name": "second", "search": "ALL", "move_to": "Done"}]',
        "RFMVP_EMAIL_API_KEY_FILE": str(key_file),
        "RFMVP_EMAIL_POLL_INTERVAL": "2.5",
        "RFMVP_EMAIL_MAX_ATTACHMENT_BYTES": "1000",
        "RFMVP_EMAIL_ATTACHMENT_DIR": str(tmp_path / "blobs"),
    }
    config = EmailMonitorConfig.from_env(environ, env_file=None)
    assert [m.mailbox_id for m in config.mailboxes] == ["a@h1:993/INBOX", "second"]
    assert config.mailboxes[1].move_to == "Done"
    assert config.api_key == "monitor-key-0123456789"
    assert (config.poll_interval, config.max_attachment_bytes) == (2.5, 1000)
    assert config.attachment_dir == tmp_path / "blobs"
    assert "monitor-key" not in repr(config)
    listed = EmailMonitorConfig.from_env(
        {"RFMVP_EMAIL_MAILBOXES": "imaps://a:pw@h1/ , imaps://b:pw@h2/Sales"}, env_file=None)
    assert [m.folder for m in listed.mailboxes] == ["INBOX", "Sales"]
    with pytest.raises(ConfigError, match="RFMVP_EMAIL_POLL_INTERVAL"):
        EmailMonitorConfig.from_env({"RFMVP_EMAIL_POLL_INTERVAL": "soon"}, env_file=None)
    with pytest.raises(ConfigError, match="RFMVP_EMAIL_MAILBOXES: is not valid JSON") as bad:
        EmailMonitorConfig.from_env({"RFMVP_EMAIL_MAILBOXES": '["imaps://a:s3cret@h/"'},
                                    env_file=None)
    assert "s3cret" not in str(bad.value)


def test_settings_do_not_warn_about_the_monitor_variables() -> None:
    assert set(ENV_VARIABLES) <= _NOT_SETTINGS


def test_html_bodies_are_flattened_to_text() -> None:
    html = ("<html><head><style>p {color: red}</style><title>x</title></head><body>"
            "<h1>Invoice&nbsp;42</h1><p>Total: <b>10 &euro;</b></p><script>alert(1)</script>"
            "<ul><li>one</li><li>two</li></ul></body></html>")
    assert html_to_text(html) == "Invoice 42\n\nTotal: 10 \u20ac\n\none\n\ntwo"


def test_folder_names_are_sent_in_modified_utf7_and_quoted() -> None:
    assert encode_mailbox_name("INBOX") == '"INBOX"'
    assert encode_mailbox_name("Entwürfe") == '"Entw&APw-rfe"'
    assert encode_mailbox_name('A&B "x"') == '"A&-B \\"x\\""'
    assert encode_mailbox_name("日本語") == '"&ZeVnLIqe-"'


# -- against dovecot -------------------------------------------------------------------


async def test_each_message_becomes_one_robot_with_its_fields_and_attachments_by_reference(
    dovecot: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    small = b"%PDF-1.4 invoice 42\n" * 10
    large = bytes(range(256)) * 40  # 10240 bytes, above the 4096-byte limit below
    dovecot.append(imap_user, message("Plain one", "First body.\r\nSecond line."))
    dovecot.append(imap_user, message("HTML only", None,
                                      html="<p>Hello <b>HTML</b></p><p>bye</p>"))
    dovecot.append(imap_user, message(
        "With files", "See attached.", html="<p>See <i>attached</i>.</p>",
        sender='"Büro, Zürich" <buero@example.ch>',
        attachments=(("../../etc/invoice 42.pdf", small, "application/pdf"),
                     ("big.bin", large, "application/octet-stream"))))
    mon = monitor(tmp_path, mailbox(dovecot, imap_user), max_attachment_bytes=4096)
    async with running(tmp_path, mon) as orch:
        await eventually(robot_count(orch, 3), "3 robots")
        await eventually(lambda: all("\\Seen" in f for f in dovecot.flags(imap_user).values()),
                         "every message to be marked \\Seen")
        made = await robots(orch)
        plain, html, files = made
        assert mon.status()[mailbox(dovecot, imap_user).mailbox_id].created == 3
        for robot in made:
            done = await orch.wait(robot.id, api_key=TEST_API_KEY, timeout=10)
            assert done.status == "succeeded"
            assert done.idempotency_key == (f"imap:{imap_user}@{dovecot.host}:{dovecot.port}"
                                            f"/INBOX:{robot.payload['uidvalidity']}:"
                                            f"{robot.payload['uid']}")
    assert [r.payload["uid"] for r in made] == [1, 2, 3]
    assert plain.payload["sender"] == {"name": "Alice Example", "address": "alice@example.com"}
    assert plain.payload["to"] == [{"name": "Robots", "address": "robots@example.com"},
                                   {"name": None, "address": "ops@example.com"}]
    assert plain.payload["subject"] == "Plain one"
    assert plain.payload["text"] == "First body.\nSecond line."
    assert (plain.payload["text_format"], plain.payload["text_truncated"]) == ("plain", False)
    assert plain.payload["attachments"] == []
    assert plain.payload["folder"] == "INBOX"
    assert plain.payload["message_id"].endswith("@example.com>")
    assert plain.payload["date"] is not None
    assert plain.payload["size"] > 0
    assert (html.payload["text"], html.payload["text_format"]) == ("Hello HTML\n\nbye", "html")
    assert files.payload["sender"] == {"name": "Büro, Zürich", "address": "buero@example.ch"}
    assert (files.payload["text"], files.payload["text_format"]) == ("See attached.", "plain")
    stored, skipped = files.payload["attachments"]
    assert stored["filename"] == "invoice 42.pdf"  # no path can be smuggled in
    assert (stored["content_type"], stored["size"]) == ("application/pdf", len(small))
    assert stored["sha256"] == hashlib.sha256(small).hexdigest()
    path = Path(urlsplit(stored["uri"]).path)
    assert stored["uri"].startswith("file:///")
    assert await anyio.Path(path).read_bytes() == small
    assert path.is_relative_to((tmp_path / "attachments").resolve())
    assert skipped == {"filename": "big.bin", "content_type": "application/octet-stream",
                       "size": len(large), "skipped": "too large"}
    assert not any("big" in p.name for p in (tmp_path / "attachments").rglob("*"))


async def test_limits_cut_the_body_and_skip_oversized_messages_but_keep_their_robot(
    dovecot: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    dovecot.append(imap_user, message("Long", "word " * 200 + "\x0cfeed\x00nul"))
    dovecot.append(imap_user, message("Huge", "x" * 20_000))
    mon = monitor(tmp_path, mailbox(dovecot, imap_user), max_body_chars=100,
                  max_message_bytes=10_000)
    async with running(tmp_path, mon) as orch:
        await eventually(robot_count(orch, 2), "2 robots")
        long, huge = await robots(orch)
    assert len(long.payload["text"]) == 100
    assert long.payload["text_truncated"] is True
    assert huge.payload["skipped"] == "too large"
    assert huge.payload["subject"] == "Huge"
    assert huge.payload["text"] == ""
    assert huge.payload["size"] > 20_000


async def test_a_crash_between_robot_and_mark_neither_loses_nor_doubles_a_message(
    dovecot: Dovecot, imap_user: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(5):
        dovecot.append(imap_user, message(f"Order {i}"))
    box = mailbox(dovecot, imap_user)

    def crash(self: ImapSession, *args: Any, **kwargs: Any) -> None:
        raise ImapError("the process died before marking")

    # 1. Robots are made, then every attempt to mark the mail fails.
    with monkeypatch.context() as patched:
        patched.setattr(ImapSession, "mark_processed", crash)
        first = monitor(tmp_path, box)
        async with running(tmp_path, first) as orch:
            await eventually(robot_count(orch, 5), "5 robots")
            await eventually(lambda: first.status()[box.mailbox_id].failures >= 2,
                             "the marking to fail twice")
            assert first.status()[box.mailbox_id].existing >= 5  # the retry found them made
    assert not any(dovecot.flags(imap_user).values()), "nothing was marked"

    # 2. After the restart the same messages map to the same robots; new mail is picked up.
    second = monitor(tmp_path, box)
    async with running(tmp_path, second) as orch:
        await eventually(lambda: all("\\Seen" in f for f in dovecot.flags(imap_user).values()),
                         "the 5 messages to be marked")
        assert len(await robots(orch)) == 5
        assert second.status()[box.mailbox_id].existing == 5
        for i in range(2):
            dovecot.append(imap_user, message(f"Later {i}"))
        await eventually(robot_count(orch, 7), "the 2 later messages")
        await eventually(lambda: second.status()[box.mailbox_id].created == 2,
                         "2 new robots counted")

    # 3. Mail that looks unprocessed again (flags lost) still makes no second robot.
    dovecot.store(imap_user, "1:*", "-FLAGS", "(\\Seen)")
    third = monitor(tmp_path, box)
    async with running(tmp_path, third) as orch:
        await eventually(lambda: third.status()[box.mailbox_id].existing == 7,
                         "the 7 messages to be found already made")
        made = await robots(orch)
    assert [r.payload["subject"] for r in made] == [
        *(f"Order {i}" for i in range(5)), "Later 0", "Later 1"]
    assert len({r.idempotency_key for r in made}) == 7


async def test_processed_mail_is_moved_to_the_configured_folder(
    dovecot: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    for i in range(3):
        dovecot.append(imap_user, message(f"Move me {i}"))
    mon = monitor(tmp_path, mailbox(dovecot, imap_user, move_to="Processed",
                                    search="ALL"))
    async with running(tmp_path, mon) as orch:
        await eventually(lambda: len(dovecot.flags(imap_user, "Processed")) == 3,
                         "3 messages in Processed")
        assert dovecot.flags(imap_user) == {}
        assert len(await robots(orch)) == 3
    moved = dovecot.flags(imap_user, "Processed")
    assert all("\\Seen" in flags for flags in moved.values())


async def test_a_recreated_folder_is_a_new_epoch_whose_messages_are_not_confused_with_old(
    dovecot: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    dovecot.append(imap_user, message("Old 1"), folder="Orders")
    dovecot.append(imap_user, message("Old 2"), folder="Orders")
    box = mailbox(dovecot, imap_user, folder="Orders")
    mon = monitor(tmp_path, box)
    async with running(tmp_path, mon) as orch:
        await eventually(robot_count(orch, 2), "the 2 old messages")
        dovecot.command(imap_user, "delete", '"Orders"')
        dovecot.append(imap_user, message("New 1"), folder="Orders")  # UIDs start at 1 again
        dovecot.append(imap_user, message("New 2"), folder="Orders")
        await eventually(robot_count(orch, 4), "the 2 messages of the new epoch")
        made = await robots(orch)
        assert mon.status()[box.mailbox_id].uidvalidity_changes == 1
    assert [(r.payload["uid"], r.payload["subject"]) for r in made] == [
        (1, "Old 1"), (2, "Old 2"), (1, "New 1"), (2, "New 2")]
    assert made[0].payload["uidvalidity"] < made[2].payload["uidvalidity"]


async def test_imaps_and_starttls_log_in_over_tls_and_plain_login_is_refused(
    dovecot_tls: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    assert dovecot_tls.cafile is not None
    assert dovecot_tls.imaps_port is not None
    imaps_user, starttls_user = f"{imap_user}-imaps", f"{imap_user}-starttls"
    dovecot_tls.append(imaps_user, message("Over IMAPS"))
    dovecot_tls.append(starttls_user, message("Over STARTTLS"))
    password = quote(dovecot_tls.password, safe="")
    cafile = quote(dovecot_tls.cafile, safe="")
    imaps = MailboxConfig.from_url(f"imaps://{imaps_user}:{password}@{dovecot_tls.host}:"
                                   f"{dovecot_tls.imaps_port}/INBOX?cafile={cafile}")
    starttls = MailboxConfig.from_url(f"imap://{starttls_user}:{password}@{dovecot_tls.host}:"
                                      f"{dovecot_tls.port}/?cafile={cafile}")
    plain = mailbox(dovecot_tls, starttls_user, name="in-clear")
    untrusted = MailboxConfig.from_url(f"imaps://{imaps_user}:{password}@{dovecot_tls.host}:"
                                       f"{dovecot_tls.imaps_port}/?name=untrusted")
    mon = monitor(tmp_path, imaps, starttls, plain, untrusted)
    async with running(tmp_path, mon) as orch:
        await eventually(robot_count(orch, 2), "a robot from each TLS mailbox")
        await eventually(lambda: all(mon.status()[n].failures >= 1
                                     for n in ("in-clear", "untrusted")),
                         "the plain and the unverified mailbox to fail")
        await eventually(lambda: all(mon.status()[m.mailbox_id].state == "ok"
                                     for m in (imaps, starttls)),
                         "the TLS mailboxes to finish a poll")
        made = await robots(orch)
        status = mon.status()
    assert sorted(r.payload["subject"] for r in made) == ["Over IMAPS", "Over STARTTLS"]
    assert "PRIVACYREQUIRED" in (status["in-clear"].last_error or "")
    assert "CERTIFICATE_VERIFY_FAILED" in (status["untrusted"].last_error or "")
    log = (dovecot_tls.root / "dovecot.log").read_text()
    assert f"user=<{starttls_user}>, method=PLAIN" in log
    assert "TLS" in next(line for line in log.splitlines() if f"user=<{starttls_user}>" in line
                         and "Login:" in line)


async def test_a_wrong_password_is_reported_and_retried_without_stopping_anything(
    dovecot: Dovecot, imap_user: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="robotframework_mvp.services.email_monitor")
    wrong = mailbox(dovecot, imap_user, password="not-the-password", name="wrong")
    good = mailbox(dovecot, f"{imap_user}-good")
    mon = monitor(tmp_path, wrong, good)
    async with running(tmp_path, mon) as orch:
        await eventually(lambda: mon.status()["wrong"].failures >= 3, "3 failed polls")
        status = mon.status()["wrong"]
        assert status.state == "failing"
        assert status.consecutive_failures >= 3
        assert "AUTHENTICATIONFAILED" in (status.last_error or "")
        stats = orch.tracker.stats("email.poll")
        assert stats is not None
        assert stats.errors >= 3
        # The orchestrator and the other mailbox carry on.
        dovecot.append(f"{imap_user}-good", message("Still working"))
        await eventually(robot_count(orch, 1), "the good mailbox's robot")
        echo = await orch.process_robot(KIND, {"subject": "direct", "uid": 0,
                                               "uidvalidity": 0}, api_key=TEST_API_KEY)
        assert echo.status == "succeeded"
    assert "not-the-password" not in caplog.text
    assert "AUTHENTICATIONFAILED" in caplog.text


async def test_a_refused_message_stays_unmarked_and_is_not_retried_while_others_flow(
    dovecot: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    class NoSpam:
        @hookimpl
        def validate_robot(self, kind: str, payload: dict[str, Any]) -> str | None:
            return "no spam, thanks" if payload.get("subject") == "SPAM" else None

    dovecot.append(imap_user, message("Fine 1"))
    dovecot.append(imap_user, message("SPAM"))
    dovecot.append(imap_user, message("Fine 2"))
    box = mailbox(dovecot, imap_user)
    mon = monitor(tmp_path, box)
    async with running(tmp_path, mon, NoSpam()) as orch:
        await eventually(robot_count(orch, 2), "the 2 accepted messages")
        polls = mon.status()[box.mailbox_id].polls
        await eventually(lambda: mon.status()[box.mailbox_id].polls >= polls + 3,
                         "3 more polls")
        status = mon.status()[box.mailbox_id]
    assert (status.created, status.rejected, status.state) == (2, 1, "ok")
    assert dovecot.flags(imap_user) == {1: {"\\Seen"}, 2: set(), 3: {"\\Seen"}}


async def test_a_message_the_parser_fails_on_still_makes_a_robot_and_blocks_nothing(
    dovecot: Dovecot, imap_user: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from robotframework_mvp.services import email_monitor

    real = email_monitor.build_payload

    def choking(raw: bytes, **kwargs: Any) -> dict[str, Any]:
        if b"Poison" in raw:
            raise ValueError("the parser chokes")
        return real(raw, **kwargs)

    monkeypatch.setattr(email_monitor, "build_payload", choking)
    dovecot.append(imap_user, message("Poison"))
    dovecot.append(imap_user, message("Healthy"))
    mon = monitor(tmp_path, mailbox(dovecot, imap_user))
    async with running(tmp_path, mon) as orch:
        await eventually(robot_count(orch, 2), "2 robots")
        poison, healthy = await robots(orch)
    assert poison.payload["skipped"] == "unparsable"
    assert (poison.payload["uid"], poison.payload["text"]) == (1, "")
    assert healthy.payload["subject"] == "Healthy"


async def test_mail_for_a_kind_no_module_runs_waits_in_the_mailbox(
    dovecot: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    dovecot.append(imap_user, message("Nobody handles me"))
    box = mailbox(dovecot, imap_user, kind="nobody.handles")
    mon = monitor(tmp_path, box)
    async with running(tmp_path, mon) as orch:
        await eventually(lambda: mon.status()[box.mailbox_id].failures >= 2, "2 failures")
        assert "unknown kind" in (mon.status()[box.mailbox_id].last_error or "")
        assert await robots(orch) == []
    assert dovecot.flags(imap_user) == {1: set()}


async def test_the_plugin_is_enabled_and_configured_by_environment_variables(
    dovecot: Dovecot, imap_user: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = tmp_path / "email-key"
    key_file.write_text(TEST_API_KEY)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("RFMVP_EMAIL_MAILBOXES",
                       f"imap://{imap_user}:{quote(dovecot.password)}@{dovecot.host}:"
                       f"{dovecot.port}/INBOX?security=plain&name=from-env")
    monkeypatch.setenv("RFMVP_EMAIL_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("RFMVP_EMAIL_POLL_INTERVAL", "0.1")
    dovecot.append(imap_user, message("From the environment"))
    settings = test_settings(f"sqlite:///{tmp_path / 'robots.db'}",
                             plugins=("robotframework_mvp.services.email_monitor",))
    async with running(tmp_path, settings=settings) as orch:
        await eventually(robot_count(orch, 1), "the robot")
        (running_monitor,) = monitors(orch)
        await eventually(lambda: running_monitor.status()["from-env"].created == 1,
                         "the robot counted")
    assert (tmp_path / "rfmvp-data" / "email-attachments").is_dir()
    monkeypatch.delenv("RFMVP_EMAIL_MAILBOXES")
    with pytest.raises(ConfigError, match="RFMVP_EMAIL_MAILBOXES is empty"):
        async with running(tmp_path, settings=settings):
            pass


async def test_a_monitor_without_an_api_key_refuses_to_start(
    dovecot: Dovecot, imap_user: str, tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="RFMVP_EMAIL_API_KEY"):
        async with running(tmp_path, monitor(tmp_path, mailbox(dovecot, imap_user),
                                             api_key=None)):
            pass


# -- the background_tasks hook ---------------------------------------------------------


async def test_background_tasks_run_until_shutdown_and_a_failing_one_stops_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    started, cancelled = anyio.Event(), anyio.Event()

    class Plugin:
        @hookimpl
        def background_tasks(self, orchestrator: Orchestrator
                             ) -> list[Callable[[], Awaitable[None]]]:
            async def forever() -> None:
                started.set()
                try:
                    await anyio.sleep_forever()
                finally:
                    cancelled.set()

            async def broken() -> None:
                raise RuntimeError("boom")

            return [broken, forever]

    async with running(tmp_path, Plugin()) as orch:
        with anyio.fail_after(10):
            await started.wait()
        robot = await orch.process_robot(KIND, {"subject": "x"}, api_key=TEST_API_KEY)
        assert robot.status == "succeeded"
        assert not cancelled.is_set()
    assert cancelled.is_set()
    assert "boom" in caplog.text
