"""OCREngine: the built-in module for robots of kind ``ocr`` (extra ``ocr``).

It extracts the text of images and PDFs with Tesseract (Debian's ``tesseract-ocr``,
called through pytesseract), page by page, with a box and a confidence for each word,
and reports progress after each page. PDF pages are rendered with pypdfium2, whose
wheel ships its own PDFium. File sources are read only below an allow-listed root
directory (``RFMVP_OCR_ROOT``). Input that can never be read (not an image, a corrupt
PDF, a path outside the root) fails at once with :class:`PermanentError`.

Enable it with ``RFMVP_PLUGINS=robotframework_mvp.services.ocr`` (configured from
``RFMVP_OCR_*`` variables), or pass ``OCREngine(OcrConfig(...))`` as a plugin. See
``docs/services/ocr.md``.
"""


from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...errors import ConfigError
from ...hookspecs import hookimpl
from ...modules import Module
from .config import OcrConfig
from .engine import OCREngine

if TYPE_CHECKING:
    from ...config import Settings

__all__ = ["OCREngine", "OcrConfig", "register_modules"]


@hookimpl
def register_modules(settings: Settings) -> Sequence[Module]:
    """``RFMVP_PLUGINS=robotframework_mvp.services.ocr``: the module from ``RFMVP_OCR_*``."""
    try:
        import pytesseract  # type: ignore[import-untyped]  # noqa: F401
        from PIL import Image  # noqa: F401
    except ImportError:  # pragma: no cover
        raise ConfigError("the OCR service needs pytesseract and Pillow; install "
                          "robotframework-mvp[ocr]") from None
    return [OCREngine(OcrConfig.from_env()).module]
