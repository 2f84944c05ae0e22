"""Run the invoice pipeline: an invoice mailbox -> OCR robots -> a signed webhook.

    python examples/invoice_pipeline/run.py --demo
    python examples/invoice_pipeline/run.py --demo --imap 'imap://USER:PW@HOST:143/INBOX?security=plain'
    python examples/invoice_pipeline/run.py            # serve, configured by RFMVP_* variables

``--demo`` is self-contained: it renders an invoice PDF with Pillow, starts a local
webhook receiver that checks each request's signature, runs an orchestrator with the
OCR engine, the notification service and the pipeline, and exits once the receiver got
the extracted invoice (exit status 0) or the time ran out (1). Without ``--imap`` the
invoice e-mail robot is submitted directly, in the shape the EmailMonitor gives it; with
``--imap`` the demo mails the invoice to that mailbox and the EmailMonitor picks it up.
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # examples/

from invoice_pipeline.pipeline import EMAIL_KIND, EXTRACT_KIND, InvoicePipeline
from robotframework_mvp import (
    Orchestrator,
    Robot,
    SecurityConfig,
    Settings,
    StaticKey,
    StorageConfig,
    WorkerConfig,
    hookimpl,
)
from robotframework_mvp.services.email_monitor import (
    EmailMonitor,
    EmailMonitorConfig,
    MailboxConfig,
)
from robotframework_mvp.services.notifications import (
    NotificationService,
    NotifyConfig,
    Subscription,
    WebhookChannel,
    verify_signature,
)
from robotframework_mvp.services.ocr import OcrConfig, OCREngine

log = logging.getLogger("invoice_pipeline")

INVOICE_LINES = [
    "ACME Robotics Ltd",
    "12 Harbour Street, Bristol",
    "INVOICE NO. 2024-0117",
    "Date: 2024-05-02",
    "Widget assembly kit x 3        129.00",
    "Calibration service             45.50",
    "Shipping and handling           12.75",
    "TOTAL DUE EUR 187.25",
    "Payment within 30 days.",
]
EXPECTED = {"invoice_number": "2024-0117", "date": "2024-05-02", "total": "187.25",
            "currency": "EUR"}


def render_invoice_pdf(lines: list[str] = INVOICE_LINES) -> bytes:
    """A one-page invoice as a PDF, drawn with Pillow (the input a scanner would give)."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    font = (ImageFont.truetype(str(font_path), 30) if font_path.is_file()
            else ImageFont.load_default(size=30))
    page = Image.new("L", (1240, 1754), 255)  # A4 at 150 dpi
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((100, 120 + i * 56), line, fill=0, font=font)
    buffer = io.BytesIO()
    page.save(buffer, "PDF", resolution=150)
    return buffer.getvalue()


# -- the demo's webhook receiver -------------------------------------------------------


class Receiver:
    """A local endpoint for the notifications: it checks signatures, as yours should."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.received: list[dict[str, Any]] = []
        self.seen: set[str] = set()
        self.refused = 0
        self.extracted = anyio.Event()
        self.url = ""

    async def app(self, scope: dict[str, Any], receive: Callable[..., Any],
                  send: Callable[..., Any]) -> None:
        """A bare ASGI app: POST /hook."""
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if verify_signature(self.secret, body, headers.get("x-rfmvp-timestamp"),
                            headers.get("x-rfmvp-signature")):
            status = 204
            delivery = headers.get("x-rfmvp-delivery", "")
            notification = json.loads(body)
            robot = notification["robot"]
            if delivery in self.seen:  # delivery is at least once: deduplicate on the id
                print(f"  webhook <- {robot['kind']} {robot['status']} again (duplicate "
                      "delivery, ignored)")
            else:
                self.seen.add(delivery)
                self.received.append(notification)
                print(f"  webhook <- {robot['kind']} {robot['status']} (signature verified)")
                if robot["kind"] == EXTRACT_KIND:
                    self.extracted.set()
        else:
            status = 401
            self.refused += 1
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def serve_receiver(secret: str) -> AsyncIterator[Receiver]:
    import uvicorn

    receiver = Receiver(secret)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    server = uvicorn.Server(uvicorn.Config(receiver.app, host="127.0.0.1", port=port,
                                           interface="asgi3", log_level="warning",
                                           lifespan="off"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, no event
                await anyio.sleep(0.02)
        try:
            yield receiver
        finally:
            server.should_exit = True


class Narrator:
    """Prints each robot of the chain as it ends (an observer, like any plugin)."""

    @hookimpl
    def on_robot_finished(self, robot: Robot) -> None:
        detail = "" if robot.error is None else f": {robot.error.message}"
        print(f"  robot {robot.id} {robot.kind} {robot.status}{detail}")


# -- the demo --------------------------------------------------------------------------


def invoice_email(pdf: bytes, to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Supplier Billing <billing@supplier.example>"
    message["To"] = to
    message["Subject"] = "Invoice 2024-0117"
    message.set_content("Dear customer, please find our invoice attached.\n")
    message.add_attachment(pdf, maintype="application", subtype="pdf",
                           filename="invoice-2024-0117.pdf")
    return message


def mail_invoice(mailbox: MailboxConfig, message: EmailMessage) -> None:
    """APPEND the message to the mailbox, as a mail server delivering it would."""
    import imaplib

    client: imaplib.IMAP4
    if mailbox.security == "ssl":
        client = imaplib.IMAP4_SSL(mailbox.host, mailbox.effective_port,
                                   ssl_context=mailbox.make_ssl_context(), timeout=30)
    else:
        client = imaplib.IMAP4(mailbox.host, mailbox.effective_port, timeout=30)
        if mailbox.security == "starttls":
            client.starttls(ssl_context=mailbox.make_ssl_context())
    try:
        client.login(mailbox.username, mailbox.password)
        typ, data = client.append(f'"{mailbox.folder}"', None, None, message.as_bytes())
        if typ != "OK":
            raise RuntimeError(f"the mailbox refused the message: {data!r}")
    finally:
        client.logout()


async def run_demo(*, imap_url: str | None = None, timeout: float = 120.0,
                   workdir: Path | None = None) -> dict[str, Any]:
    """Run the whole pipeline once; return what the webhook receiver was told."""
    with tempfile.TemporaryDirectory(prefix="rfmvp-invoices-") as tmp:
        work = workdir or Path(tmp)
        attachments = work / "attachments"
        attachments.mkdir(parents=True, exist_ok=True)
        key, secret = secrets.token_urlsafe(24), secrets.token_hex(24)
        settings = Settings(
            storage=StorageConfig(url=f"sqlite:///{work / 'robots.db'}"),
            security=SecurityConfig(api_keys=(StaticKey("invoices", key),), rate_limit=None),
            worker=WorkerConfig(poll_interval=0.2, shutdown_grace_seconds=5.0),
        )
        pdf = render_invoice_pdf()
        async with serve_receiver(secret) as receiver:
            notifications = NotificationService(
                [Subscription(channel=WebhookChannel(receiver.url, secret),
                              kinds=(EXTRACT_KIND, "ocr"), statuses=("succeeded", "failed")),
                 Subscription(channel="log", kinds=("invoice.*", "ocr"),
                              statuses=("failed", "timed_out"))],
                config=NotifyConfig(retry_base_seconds=0.2, retry_cap_seconds=2.0))
            plugins: list[object] = [
                OCREngine(OcrConfig(root=attachments)), notifications,
                InvoicePipeline(key), Narrator(),
            ]
            mailbox = None
            if imap_url is not None:
                mailbox = MailboxConfig.from_url(imap_url, kind=EMAIL_KIND)
                plugins.append(EmailMonitor(mailboxes=[mailbox], api_key=key,
                                            attachment_dir=attachments, poll_interval=1.0))
            async with Orchestrator(settings, plugins=plugins) as orch:
                print(f"invoice pipeline demo (webhook receiver at {receiver.url})")
                if mailbox is not None:
                    print(f"  mailing the invoice to {mailbox.redacted_url()}")
                    await anyio.to_thread.run_sync(
                        mail_invoice, mailbox, invoice_email(pdf, mailbox.username))
                else:
                    await submit_email_robot(orch, key, attachments, pdf)
                with anyio.move_on_after(timeout):
                    await receiver.extracted.wait()
            extracted = [n for n in receiver.received if n["robot"]["kind"] == EXTRACT_KIND]
            summary = {
                "ok": bool(extracted),
                "invoice": extracted[-1]["robot"].get("result") if extracted else None,
                "notifications": len(receiver.received),
                "refused_signatures": receiver.refused,
                "deliveries": notifications.stats(),
            }
    return summary


async def submit_email_robot(orch: Orchestrator, key: str, attachments: Path, pdf: bytes
                             ) -> None:
    """Without a mailbox: store the PDF as the EmailMonitor would, submit its robot."""
    digest = hashlib.sha256(pdf).hexdigest()
    path = attachments / digest[:2] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pdf)
    robot = await orch.submit(EMAIL_KIND, {
        "subject": "Invoice 2024-0117",
        "sender": {"name": "Supplier Billing", "address": "billing@supplier.example"},
        "attachments": [{"filename": "invoice-2024-0117.pdf",
                         "content_type": "application/pdf", "size": len(pdf),
                         "sha256": digest, "uri": path.as_uri()}],
    }, api_key=key, idempotency_key=f"demo:{digest}")
    print(f"  submitted the invoice e-mail robot {robot.id} (no mailbox: --imap not given)")


# -- serving ---------------------------------------------------------------------------


async def serve() -> None:
    """The services from ``RFMVP_PLUGINS`` and ``RFMVP_*``; the pipeline on top."""
    key = EmailMonitorConfig.from_env().api_key
    if key is None:
        raise SystemExit("set RFMVP_EMAIL_API_KEY (or _FILE): the pipeline submits the OCR "
                         "and extraction robots with the email monitor's key")
    languages = OcrConfig.from_env().languages
    async with Orchestrator(Settings.from_env(),
                            plugins=[InvoicePipeline(key, languages=languages)]):
        log.info("invoice pipeline running; Ctrl-C stops it")
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="run the self-contained demo")
    parser.add_argument("--imap", help="demo: mail the invoice to this mailbox URL and let "
                        "the EmailMonitor pick it up")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="demo: seconds to wait for the notification")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("RFMVP_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.demo:
        anyio.run(serve)
        return 0
    summary = anyio.run(lambda: run_demo(imap_url=args.imap, timeout=args.timeout))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0 if summary["ok"] and summary["invoice"] else 1


if __name__ == "__main__":
    sys.exit(main())
