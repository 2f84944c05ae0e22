"""SmtpChannel: one e-mail per notification, sent with aiosmtplib.

The subject names the robot's kind, status and id; the body repeats them with the
module, attempts and error, and ends with the notification as JSON. SMTP replies 4xx and
lost connections are retried; 5xx replies (a refused recipient, bad credentials) are not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib

from ...errors import ConfigError
from .channels import DeliveryError, Notification

__all__ = ["SmtpChannel"]

SECURITY_MODES = ("starttls", "tls", "none")


class SmtpChannel:
    """Send notifications as e-mail through an SMTP server.

    ``security`` is ``starttls`` (upgrade a plain connection, usually port 587), ``tls``
    (TLS from the start, usually port 465) or ``none`` (plain text: only for a relay on
    the same host or network).
    """

    def __init__(self, host: str, port: int = 587, *, sender: str, recipients: Sequence[str],
                 username: str | None = None, password: str | None = None,
                 security: str = "starttls", timeout: float = 10.0,
                 name: str = "email") -> None:
        if not host:
            raise ConfigError("RFMVP_NOTIFY_SMTP_HOST must be set to send e-mail")
        if security not in SECURITY_MODES:
            raise ConfigError("RFMVP_NOTIFY_SMTP_SECURITY has a bad value; expected "
                              "starttls, tls or none")
        if not sender or "@" not in sender:
            raise ConfigError("RFMVP_NOTIFY_SMTP_FROM must be the sender's e-mail address")
        if not recipients or not all("@" in r for r in recipients):
            raise ConfigError("an e-mail subscription needs at least one recipient address")
        self.name = name
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = tuple(recipients)
        self.username = username
        self._password = password
        self.security = security
        self.timeout = timeout

    def __repr__(self) -> str:  # the password never shows
        return (f"SmtpChannel({self.name!r}, {self.host}:{self.port}, "
                f"to={list(self.recipients)!r})")

    def message(self, notification: Notification) -> EmailMessage:
        robot = notification.robot
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        message["Subject"] = f"[rfmvp] {robot.kind} {robot.status}: robot {robot.id}"
        message["Message-ID"] = make_msgid(domain=self.sender.rpartition("@")[2] or None)
        message["X-RFMVP-Delivery"] = notification.id
        lines = [
            f"Robot:    {robot.id}",
            f"Kind:     {robot.kind}",
            f"Status:   {robot.status}",
            f"Module:   {robot.module or '-'}",
            f"Attempts: {robot.attempts} of {robot.max_attempts}",
        ]
        if robot.finished_at is not None:
            lines.append(f"Finished: {robot.finished_at.isoformat()}")
        if robot.error is not None:
            lines.append(f"Error:    {robot.error.type}: {robot.error.message}")
        lines += ["", "The notification as JSON:", "",
                  json.dumps(notification.to_dict(), indent=2, sort_keys=True)]
        message.set_content("\n".join(lines) + "\n")
        return message

    async def send(self, notification: Notification) -> None:
        try:
            await aiosmtplib.send(
                self.message(notification), hostname=self.host, port=self.port,
                username=self.username, password=self._password,
                use_tls=self.security == "tls", start_tls=self.security == "starttls",
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = sorted({r.code for r in exc.recipients})
            raise DeliveryError(f"every recipient was refused (SMTP {codes})",
                                retryable=all(400 <= c < 500 for c in codes)) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(f"SMTP {exc.code}: {exc.message}"[:300],
                                retryable=400 <= exc.code < 500) from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError,
                aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}"[:300], retryable=True) from None
        except aiosmtplib.SMTPException as exc:
            # The server lacks something asked for (STARTTLS, SMTPUTF8, an auth method):
            # a setting to change, not a moment to wait for.
            raise DeliveryError(f"SMTP: {exc}"[:300], retryable=False) from None
