"""The invoice pipeline example runs end to end: mailbox -> OCR -> extraction -> webhook.

The documented command (``python examples/invoice_pipeline/run.py --demo``) runs as a
subprocess; the mailbox variant mails the invoice to a real dovecot, where the
EmailMonitor picks it up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:  # the example is imported as the package invoice_pipeline
    sys.path.insert(0, str(EXAMPLES))

from invoice_pipeline.pipeline import parse_invoice  # noqa: E402
from invoice_pipeline.run import EXPECTED, run_demo  # noqa: E402

pytestmark = pytest.mark.slow


def test_the_documented_demo_command_reads_the_invoice_and_notifies_it(tesseract: str) -> None:
    done = subprocess.run(
        [sys.executable, "examples/invoice_pipeline/run.py", "--demo", "--timeout", "90"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout[done.stdout.index("\n{") + 1:])
    assert summary["ok"] is True
    assert {k: summary["invoice"][k] for k in EXPECTED} == EXPECTED
    assert summary["refused_signatures"] == 0
    assert "webhook <- invoice.extract succeeded (signature verified)" in done.stdout


@pytest.mark.anyio
async def test_a_mailed_invoice_goes_from_the_mailbox_to_the_webhook(
    tesseract: str, dovecot: Any, imap_user: str,
) -> None:
    url = (f"imap://{imap_user}:{dovecot.password}@{dovecot.host}:{dovecot.port}/INBOX"
           "?security=plain")
    summary = await run_demo(imap_url=url, timeout=90)
    assert summary["ok"] is True, summary
    assert {k: summary["invoice"][k] for k in EXPECTED} == EXPECTED
    assert summary["invoice"]["subject"] == "Invoice 2024-0117"
    assert summary["invoice"]["filename"] == "invoice-2024-0117.pdf"
    assert dovecot.flags(imap_user) == {1: {"\\Seen"}}  # the monitor marked the mail


def test_the_invoice_fields_are_found_in_ocr_text() -> None:
    text = ("ACME Robotics Ltd\nINVOICE NO. 2024-0117\nDate: 02.05.2024\n"
            "Subtotal 1,174.50\nTOTAL DUE EUR 1,187.25\n")
    assert parse_invoice(text) == {"invoice_number": "2024-0117", "date": "02.05.2024",
                                   "total": "1187.25", "currency": "EUR"}
    assert parse_invoice("nothing here")["total"] is None
