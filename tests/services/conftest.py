"""Fixtures for the built-in services: Tesseract, rendered text, a local HTTP receiver of
signed webhooks, and a local SMTP server.

Everything is real: the receiver is a Starlette app served by uvicorn on a free port of
127.0.0.1, the SMTP server is aiosmtpd, and OCR runs Debian's tesseract. A test whose
program or package is missing skips, except under ``RFMVP_REQUIRE_SERVICES=1``, where it
fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

REQUIRE_SERVICES = os.environ.get("RFMVP_REQUIRE_SERVICES") == "1"

FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf",
)


def _missing(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is missing and RFMVP_REQUIRE_SERVICES=1")
    pytest.skip(f"{what} is missing")


def _unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """``free_port()``: a TCP port of 127.0.0.1 that nothing listens on (right now)."""
    return _unused_port


# -- OCR -------------------------------------------------------------------------------


@pytest.fixture
def tesseract() -> str:
    """The tesseract program, with the English model (Debian's tesseract-ocr-eng)."""
    for package in ("pytesseract", "pypdfium2", "PIL"):
        try:
            __import__(package)
        except ImportError:
            _missing(f"the Python package {package} (install robotframework-mvp[ocr])")
    program = shutil.which("tesseract")
    if program is None:
        _missing("the tesseract program (apt-get install tesseract-ocr tesseract-ocr-eng)")
    return str(program)


def _font(size: int, index: int = 0) -> Any:
    from PIL import ImageFont

    path = FONT_PATHS[index % len(FONT_PATHS)]
    if Path(path).is_file():
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # Pillow's own scalable font


def render_lines(lines: Sequence[str], *, size: int = 32, font: int = 0,
                 width: int = 1500) -> Any:
    """A white page with ``lines`` in black: a clean render with known text."""
    from PIL import Image, ImageDraw

    face = _font(size, font)
    step = int(size * 1.7)
    image = Image.new("L", (width, 2 * step + step * len(lines)), 255)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((size * 2, step + i * step), line, fill=0, font=face)
    return image


@pytest.fixture
def render() -> Callable[..., Any]:
    pytest.importorskip("PIL")
    return render_lines


@pytest.fixture
def ocr_root(tmp_path: Path) -> Path:
    """The allow-listed directory OCR may read files from."""
    root = tmp_path / "ocr-root"
    root.mkdir()
    return root


# -- a webhook receiver ----------------------------------------------------------------


WEBHOOK_SECRET = "whsec-test-0123456789abcdef"


@attrs.define
class Received:
    body: bytes
    headers: dict[str, str]
    verified: bool
    status: int


@attrs.define
class WebhookReceiver:
    """A local HTTP endpoint that checks each request's signature and records it.

    ``statuses`` are answered in order (then 200); a request with a bad signature gets
    401. While ``gate`` is set to an unset event, requests wait on it.
    """

    url: str
    secret: str
    statuses: list[int] = attrs.field(factory=list)
    gate: anyio.Event | None = None
    received: list[Received] = attrs.field(factory=list)
    arrived: anyio.Event = attrs.field(factory=anyio.Event)
    tolerance: float = 300.0

    def verify(self, body: bytes, headers: dict[str, str]) -> bool:
        """The recipe of docs/services/notifications.md, written out independently."""
        timestamp = headers.get("x-rfmvp-timestamp", "")
        signature = headers.get("x-rfmvp-signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > self.tolerance:
            return False
        expected = hmac.new(self.secret.encode(), timestamp.encode() + b"." + body,
                            hashlib.sha256).hexdigest()
        return hmac.compare_digest("sha256=" + expected, signature)

    @property
    def accepted(self) -> list[Received]:
        return [r for r in self.received if r.status == 200]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.received) < count:
                self.arrived = anyio.Event()
                await self.arrived.wait()


@asynccontextmanager
async def serve_receiver(secret: str = WEBHOOK_SECRET) -> AsyncIterator[WebhookReceiver]:
    pytest.importorskip("uvicorn")
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    port = _unused_port()
    receiver = WebhookReceiver(url=f"http://127.0.0.1:{port}/hook", secret=secret)

    async def hook(request: Request) -> JSONResponse:
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if receiver.gate is not None:
            await receiver.gate.wait()
        verified = receiver.verify(body, headers)
        status = 401 if not verified else (receiver.statuses.pop(0) if receiver.statuses
                                           else 200)
        receiver.received.append(Received(body, headers, verified, status))
        receiver.arrived.set()
        return JSONResponse({"status": status}, status_code=status)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, no event
                await anyio.sleep(0.01)
        try:
            yield receiver
        finally:
            if receiver.gate is not None:
                receiver.gate.set()
            server.should_exit = True


@pytest.fixture
def webhook_receiver() -> Callable[..., AbstractAsyncContextManager[WebhookReceiver]]:
    """``async with webhook_receiver() as receiver``: see :class:`WebhookReceiver`."""
    return serve_receiver


# -- an SMTP server --------------------------------------------------------------------


@attrs.define
class SmtpServer:
    host: str
    port: int
    messages: list[EmailMessage] = attrs.field(factory=list)
    envelopes: list[tuple[str, list[str]]] = attrs.field(factory=list)

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.messages) < count:  # noqa: ASYNC110 - filled by the server's thread
                await anyio.sleep(0.02)


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) on 127.0.0.1, collecting what it receives."""
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        _missing("aiosmtpd (the test extra installs it)")
        raise
    from email import message_from_bytes, policy

    server = SmtpServer(host="127.0.0.1", port=_unused_port())

    class Handler:
        async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
            message = message_from_bytes(envelope.original_content, policy=policy.default)
            server.messages.append(message)  # type: ignore[arg-type]
            server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
            return "250 Message accepted for delivery"

    controller = Controller(Handler(), hostname=server.host, port=server.port)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


# -- an IMAP server (dovecot) ----------------------------------------------------------

DOVECOT_PASSWORD = "imap-test-secret"


@attrs.define
class Dovecot:
    """A real dovecot on 127.0.0.1, started by the tests; every user name logs in with
    ``DOVECOT_PASSWORD`` and gets its own empty maildir, so each test uses a fresh user.

    ``port`` serves IMAP (and STARTTLS when ``cafile`` is set); ``imaps_port`` serves
    implicit TLS; ``cafile`` is the self-signed certificate clients must trust.
    """

    root: Path
    host: str
    port: int
    imaps_port: int | None = None
    cafile: str | None = None
    password: str = DOVECOT_PASSWORD

    @property
    def tls(self) -> bool:
        return self.cafile is not None

    def connect(self, user: str) -> Any:
        """A logged-in ``imaplib`` client (STARTTLS first on a TLS server)."""
        import imaplib
        import ssl

        client = imaplib.IMAP4(self.host, self.port, timeout=10)
        if self.cafile is not None:
            client.starttls(ssl_context=ssl.create_default_context(cafile=self.cafile))
        client.login(user, self.password)
        return client

    def append(self, user: str, message: bytes | EmailMessage, folder: str = "INBOX") -> None:
        raw = message if isinstance(message, bytes) else message.as_bytes()
        client = self.connect(user)
        try:
            if folder != "INBOX":
                client.create(f'"{folder}"')
            typ, data = client.append(f'"{folder}"', None, None, raw)
            assert typ == "OK", data
        finally:
            client.logout()

    def flags(self, user: str, folder: str = "INBOX") -> dict[int, set[str]]:
        """``{uid: flags}`` of every message in ``folder`` (``\\Recent`` left out)."""
        import re

        client = self.connect(user)
        try:
            typ, _ = client.select(f'"{folder}"', readonly=True)
            if typ != "OK":
                return {}
            typ, data = client.uid("FETCH", "1:*", "(UID FLAGS)")
            found: dict[int, set[str]] = {}
            for item in data:
                if not isinstance(item, bytes):
                    continue
                uid = re.search(rb"UID (\d+)", item)
                flags = re.search(rb"FLAGS \(([^)]*)\)", item)
                if uid and flags:
                    # \Recent depends on which session looked first: leave it out.
                    found[int(uid.group(1))] = set(flags.group(1).decode().split()) - {
                        "\\Recent"}
            return found
        finally:
            client.logout()

    def store(self, user: str, uids: str, change: str, flags: str,
              folder: str = "INBOX") -> None:
        """``UID STORE uids change flags``, e.g. ``store(u, "1:*", "-FLAGS", "(\\\\Seen)")``."""
        client = self.connect(user)
        try:
            client.select(f'"{folder}"')
            typ, data = client.uid("STORE", uids, change, flags)
            assert typ == "OK", data
        finally:
            client.logout()

    def command(self, user: str, name: str, *args: str) -> None:
        """Run one mailbox command (``create``, ``delete``, ``rename``) as ``user``."""
        client = self.connect(user)
        try:
            typ, data = getattr(client, name)(*args)
            assert typ == "OK", data
        finally:
            client.logout()


def _dovecot_config(root: Path, host: str, port: int,
                    tls: tuple[int, Path, Path] | None) -> str:
    import grp
    import pwd

    if os.geteuid() == 0:
        # dovecot refuses to run its login and mail processes as root.
        login_user, internal_user = "dovenull", "dovecot"
        mail_user = pwd.getpwnam("dovecot")
    else:
        login_user = internal_user = pwd.getpwuid(os.geteuid()).pw_name
        mail_user = pwd.getpwuid(os.geteuid())
    mail = root / "mail"
    mail.mkdir()
    os.chown(mail, mail_user.pw_uid, mail_user.pw_gid)
    group = grp.getgrgid(mail_user.pw_gid).gr_name
    if tls is None:
        ssl_lines = "ssl = no\ndisable_plaintext_auth = no\n"
        imaps = "  inet_listener imaps {\n    port = 0\n  }\n"
    else:
        imaps_port, cert, key = tls
        ssl_lines = (f"ssl = required\nssl_cert = <{cert}\nssl_key = <{key}\n"
                     "disable_plaintext_auth = yes\n")
        imaps = (f"  inet_listener imaps {{\n    address = {host}\n    port = {imaps_port}\n"
                 "    ssl = yes\n  }\n")
    return f"""\
protocols = imap
listen = {host}
base_dir = {root}/run
state_dir = {root}/state
instance_name = rfmvp-test-{port}
log_path = {root}/dovecot.log
default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = {min(mail_user.pw_uid, 1)}
first_valid_gid = 0
{ssl_lines}auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = static
  args = password={DOVECOT_PASSWORD}
}}
userdb {{
  driver = static
  args = uid={mail_user.pw_uid} gid={mail_user.pw_gid} home={mail}/%u
}}
mail_location = maildir:~/Maildir
mail_privileged_group = {group}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {host}
    port = {port}
  }}
{imaps}}}
service anvil {{
  chroot =
  # No auth penalty: the wrong-password test must not slow the others down.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _self_signed_certificate(root: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, 127.0.0.2 and localhost, made by the openssl program."""
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        _missing("the openssl program (to make the IMAP server's test certificate)")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        [str(openssl), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@contextlib.contextmanager
def run_dovecot(*, tls: bool = False) -> Iterator[Dovecot]:
    """Start ``dovecot -F`` with a config of its own in a temporary directory."""
    import subprocess
    import tempfile

    program = shutil.which("dovecot") or ("/usr/sbin/dovecot"
                                          if Path("/usr/sbin/dovecot").is_file() else None)
    if program is None:
        _missing("dovecot (apt-get install dovecot-imapd)")
    # Not under pytest's 0700 tmp_path: dovecot's unprivileged processes must reach it.
    root = Path(tempfile.mkdtemp(prefix="rfmvp-dovecot-"))
    root.chmod(0o755)
    process = None
    # dovecot treats a client whose address equals the server's as secure and lets it log
    # in without TLS; the TLS server listens on 127.0.0.2 so only TLS gets in.
    host = "127.0.0.2" if tls else "127.0.0.1"
    try:
        port = _free_port(host)
        server = Dovecot(root=root, host=host, port=port)
        tls_args = None
        if tls:
            cert, key = _self_signed_certificate(root)
            server.imaps_port = _free_port(host)
            server.cafile = str(cert)
            tls_args = (server.imaps_port, cert, key)
        conf = root / "dovecot.conf"
        conf.write_text(_dovecot_config(root, host, port, tls_args), encoding="utf-8")
        process = subprocess.Popen([str(program), "-F", "-c", str(conf)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        ports = [p for p in (port, server.imaps_port) if p is not None]
        while ports:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                pytest.fail(f"dovecot exited at startup: {output}")
            try:
                socket.create_connection((host, ports[0]), timeout=0.5).close()
                ports.pop(0)
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("dovecot did not listen within 15 s")
                time.sleep(0.05)
        yield server
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """A plain-IMAP dovecot (``ssl = no``) shared by the session's tests."""
    with run_dovecot() as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_tls() -> Iterator[Dovecot]:
    """A dovecot that requires TLS: STARTTLS on ``port``, IMAPS on ``imaps_port``."""
    with run_dovecot(tls=True) as server:
        yield server


@pytest.fixture
def imap_user(request: pytest.FixtureRequest) -> str:
    """A user of its own for this test (so its mailbox starts empty)."""
    import uuid

    return f"{request.node.name[:20].strip('_[]')}-{uuid.uuid4().hex[:8]}".replace("[", "-")
