"""The invoice pipeline: an e-mail's PDF and image attachments are OCR-ed, the invoice
fields are read from the text, and the result is notified.

    invoice.email  (the EmailMonitor's robot; module ``invoice``: picks the documents)
      -> ocr             one robot per document (the built-in OCREngine)
        -> invoice.extract   module ``invoice-extract``: number, date, total, currency
          -> notification    NotificationService subscription on invoice.extract

Each arrow after the first is the ``on_robot_finished`` hook of :class:`InvoicePipeline`,
which submits the next robot through ``Orchestrator.submit`` like any client, with an
idempotency key derived from the parent, so a repeated event never doubles a robot. The
hooks and modules are the ones any third-party plugin could use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from robotframework_mvp import (
    ModuleContext,
    PermanentError,
    Robot,
    RobotStatus,
    hookimpl,
    module,
)

if TYPE_CHECKING:
    from robotframework_mvp import Orchestrator

__all__ = ["InvoicePipeline", "extract_invoice", "parse_invoice", "pick_documents"]

log = logging.getLogger("invoice_pipeline")

EMAIL_KIND = "invoice.email"
EXTRACT_KIND = "invoice.extract"
OCR_KIND = "ocr"
#: attachment types the OCR engine reads
DOCUMENT_TYPES = ("application/pdf", "image/png", "image/jpeg", "image/tiff", "image/gif",
                  "image/bmp", "image/webp")
DOCUMENT_SUFFIXES = (".pdf", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp",
                     ".webp")
_MAX_TEXT = 15_000  # below RFMVP_MAX_STRING_LENGTH's default (16 KiB)


@module("invoice", kinds=[EMAIL_KIND])
async def pick_documents(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Pick an invoice e-mail's documents: its stored PDF and image attachments."""
    documents = []
    for item in robot.payload.get("attachments") or []:
        if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
            continue  # skipped (too large) or not stored
        content_type = str(item.get("content_type") or "").lower()
        filename = str(item.get("filename") or "")
        if content_type in DOCUMENT_TYPES or filename.lower().endswith(DOCUMENT_SUFFIXES):
            documents.append({"filename": filename, "uri": item["uri"],
                              "content_type": content_type, "sha256": item.get("sha256")})
    sender = robot.payload.get("sender") or {}
    return {"subject": robot.payload.get("subject"),
            "sender": sender.get("address") if isinstance(sender, dict) else None,
            "documents": documents}


_NUMBER = re.compile(r"\bINVOICE\s*(?:NO\.?|NUMBER|#)?\s*[:#]?\s*([A-Z0-9][A-Z0-9/-]{2,})",
                     re.IGNORECASE)
_TOTAL = re.compile(r"\bTOTAL(?:\s+DUE)?\b[^0-9\n]*?(?:(EUR|USD|GBP|CHF)\s*)?"
                    r"(\d{1,3}(?:[ ,.]\d{3})*[.,]\d{2})\b", re.IGNORECASE)
_DATE = re.compile(r"\b(\d{4}-\d{2}-\d{2}|\d{1,2}[./]\d{1,2}[./]\d{4})\b")
_CURRENCY = re.compile(r"\b(EUR|USD|GBP|CHF)\b")


def parse_invoice(text: str) -> dict[str, Any]:
    """The invoice number, date, total and currency found in OCR text (None if absent)."""
    number = _NUMBER.search(text)
    totals = _TOTAL.findall(text)
    date = _DATE.search(text)
    currency = totals[-1][0] if totals and totals[-1][0] else None
    if currency is None and (found := _CURRENCY.search(text)):
        currency = found.group(1)
    total = None
    if totals:
        digits = re.sub(r"[ ,.]", "", totals[-1][1])
        total = f"{int(digits[:-2])}.{digits[-2:]}"
    return {"invoice_number": number.group(1) if number else None,
            "date": date.group(1) if date else None,
            "total": total, "currency": currency}


@module("invoice-extract", kinds=[EXTRACT_KIND])
def extract_invoice(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Read the invoice fields from a document's OCR text (fails when there is no total)."""
    text = robot.payload.get("text")
    if not isinstance(text, str):
        raise PermanentError("payload.text must be the document's OCR text")
    fields = parse_invoice(text)
    if fields["total"] is None:
        raise PermanentError(f"no TOTAL line in {robot.payload.get('filename') or 'the text'}")
    return {**fields, "filename": robot.payload.get("filename"),
            "subject": robot.payload.get("subject"),
            "email_robot": robot.payload.get("email_robot"),
            "ocr_robot": robot.payload.get("ocr_robot"),
            "mean_confidence": robot.payload.get("mean_confidence")}


class InvoicePipeline:
    """Chains the robots: e-mail -> one OCR robot per document -> extraction.

    ``api_key`` submits the follow-up robots; use the key the EmailMonitor submits with,
    so one principal owns the whole chain. Registered as a plugin, it also registers the
    two modules (a plugin's ``Module`` attributes are registered).
    """

    documents_module = pick_documents
    extract_module = extract_invoice

    def __init__(self, api_key: str, *, languages: Sequence[str] = ("eng",)) -> None:
        self._api_key = api_key
        self.languages = list(languages)
        self.orchestrator: Orchestrator | None = None

    def __repr__(self) -> str:  # the key never shows
        return "InvoicePipeline()"

    @hookimpl
    def on_startup(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    @hookimpl
    async def on_robot_finished(self, robot: Robot) -> None:
        if robot.status != RobotStatus.SUCCEEDED or self.orchestrator is None:
            return
        if robot.kind == EMAIL_KIND:
            await self._read_documents(robot)
        elif robot.kind == OCR_KIND and isinstance(robot.payload.get("invoice"), dict):
            await self._extract(robot)

    async def _read_documents(self, email: Robot) -> None:
        assert self.orchestrator is not None
        result = email.result or {}
        for index, document in enumerate(result.get("documents") or []):
            robot = await self.orchestrator.submit(
                OCR_KIND,
                {"source": document["uri"], "languages": self.languages,
                 "invoice": {"email_robot": email.id, "filename": document["filename"],
                             "subject": result.get("subject")}},
                api_key=self._api_key, idempotency_key=f"invoice-ocr:{email.id}:{index}",
                client="invoice-pipeline")
            log.info("e-mail robot %s: OCR robot %s reads %s", email.id, robot.id,
                     document["filename"])

    async def _extract(self, ocr: Robot) -> None:
        assert self.orchestrator is not None
        result = ocr.result or {}
        pages = result.get("pages") or []
        confidences = [p["mean_confidence"] for p in pages if p.get("mean_confidence")]
        robot = await self.orchestrator.submit(
            EXTRACT_KIND,
            {**ocr.payload["invoice"], "text": str(result.get("text", ""))[:_MAX_TEXT],
             "ocr_robot": ocr.id,
             "mean_confidence": (round(sum(confidences) / len(confidences), 1)
                                 if confidences else None)},
            api_key=self._api_key, idempotency_key=f"invoice-extract:{ocr.id}",
            client="invoice-pipeline")
        log.info("OCR robot %s: extraction robot %s", ocr.id, robot.id)
