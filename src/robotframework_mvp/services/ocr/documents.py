"""Reading a robot's source (``file://`` below the root, or ``data:``) and its pages.

A PDF is rendered one page at a time with pypdfium2 at the configured DPI; an image is
read with Pillow (a multi-frame TIFF has several pages). Anything that cannot be read
raises :class:`PermanentError`: retrying would not change the bytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ...errors import ConfigError, PermanentError
from .config import OcrConfig

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Document", "open_document", "page_numbers", "read_source"]

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)"
                       r";base64,(?P<data>.*)", re.DOTALL)
# PDFium may not be called from two threads at once, not even for two documents.
_PDFIUM_LOCK = threading.Lock()


def read_source(source: object, config: OcrConfig) -> bytes:
    """The bytes of ``file://`` (below the root) or ``data:...;base64,`` source."""
    if not isinstance(source, str) or not source:
        raise PermanentError("payload.source must be a file:// URL or a data: URL")
    if source.startswith("data:"):
        return _read_data_url(source, config)
    if source.startswith("file:"):
        return _read_file_url(source, config)
    raise PermanentError("payload.source must be a file:// URL or a data: URL "
                         f"(got a {source.split(':', 1)[0][:16]!r} URL)")


def _read_data_url(source: str, config: OcrConfig) -> bytes:
    match = _DATA_URL.fullmatch(source)
    if match is None:
        raise PermanentError("payload.source is a data: URL without ';base64,'")
    encoded = match.group("data")
    if len(encoded) * 3 // 4 > config.max_file_bytes:
        raise PermanentError(f"the data: URL holds more than {config.max_file_bytes} "
                             "bytes (RFMVP_OCR_MAX_FILE_BYTES)")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PermanentError("the data: URL is not valid base64") from None


def _read_file_url(source: str, config: OcrConfig) -> bytes:
    root = config.root
    if root is None:
        raise PermanentError("file:// sources are refused: no RFMVP_OCR_ROOT is set")
    parts = urlsplit(source)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise PermanentError("payload.source must be file:///absolute/path, on this host")
    raw_path = unquote(parts.path)
    if "\x00" in raw_path or not raw_path.startswith("/"):
        raise PermanentError("payload.source must be file:///absolute/path")
    root_resolved = root.resolve()
    try:
        # resolve() follows symbolic links, so a link that leaves the root is refused too.
        path = Path(raw_path).resolve(strict=True)
    except (OSError, RuntimeError):
        path = None
    if path is None or not path.is_relative_to(root_resolved):
        # One message for "missing" and "outside": the answer must not reveal which
        # files exist outside the root.
        raise PermanentError("payload.source names no readable file below the OCR root")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise PermanentError(
            "payload.source names no readable file below the OCR root") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PermanentError("payload.source is not a regular file")
        if info.st_size > config.max_file_bytes:
            raise PermanentError(f"the file has {info.st_size} bytes; at most "
                                 f"{config.max_file_bytes} are read "
                                 "(RFMVP_OCR_MAX_FILE_BYTES)")
        return handle.read(config.max_file_bytes + 1)[: config.max_file_bytes]


class Document:
    """Pages of a PDF (rendered one at a time) or of an image (TIFF may have several)."""

    def __init__(self, data: bytes, *, dpi: int, max_pixels: int) -> None:
        self.dpi = dpi
        self.max_pixels = max_pixels
        self.is_pdf = data[:1024].lstrip().startswith(b"%PDF-")
        self._pdf: Any = None
        self._image: Image.Image | None = None
        if self.is_pdf:
            pdfium = _pdfium()
            with _PDFIUM_LOCK:
                try:
                    self._pdf = pdfium.PdfDocument(data)
                    self.page_count = len(self._pdf)
                except pdfium.PdfiumError as exc:
                    raise PermanentError(f"the PDF cannot be read: {exc}") from None
            if self.page_count < 1:
                self.close()
                raise PermanentError("the PDF has no pages")
            return
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            raise PermanentError("the source is neither a PDF nor an image Pillow can read "
                                 "(PNG, JPEG, TIFF, BMP, GIF, WebP)") from None
        if image.width * image.height > max_pixels:
            raise PermanentError(f"the image has {image.width}x{image.height} pixels; at most "
                                 f"{max_pixels} are read (RFMVP_OCR_MAX_PIXELS)")
        self._image = image
        self.page_count = int(getattr(image, "n_frames", 1))

    def render(self, number: int) -> Image.Image:
        if self._image is not None:
            return self._render_image(self._image, number)
        return self._render_pdf_page(number)

    def _render_image(self, image: Image.Image, number: int) -> Image.Image:
        from PIL import Image

        try:
            image.seek(number - 1)
            image.load()
        except (OSError, ValueError, EOFError, SyntaxError, struct.error,
                Image.DecompressionBombError):
            raise PermanentError(f"page {number} of the image is corrupt") from None
        if image.mode in ("RGBA", "LA", "P", "PA"):
            # Text on a transparent background would turn into black on black.
            flat = Image.new("RGB", image.size, "white")
            rgba = image.convert("RGBA")
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        if image.mode not in ("RGB", "L", "1"):
            return image.convert("RGB")
        return image.copy()

    def _render_pdf_page(self, number: int) -> Image.Image:
        pdfium = _pdfium()
        with _PDFIUM_LOCK:
            try:
                page = self._pdf[number - 1]
                try:
                    width, height = page.get_size()
                    scale = self.dpi / 72
                    pixels = width * scale * height * scale
                    if pixels > self.max_pixels:  # a huge page: lower the resolution
                        scale *= math.sqrt(self.max_pixels / pixels)
                    bitmap = page.render(scale=scale, grayscale=True)
                    try:
                        # to_pil() shares the bitmap's memory: copy before closing it.
                        image: Image.Image = bitmap.to_pil().copy()
                    finally:
                        bitmap.close()
                finally:
                    page.close()
            except pdfium.PdfiumError as exc:
                raise PermanentError(f"page {number} of the PDF cannot be rendered: "
                                     f"{exc}") from None
        return image

    def close(self) -> None:
        if self._pdf is not None:
            with _PDFIUM_LOCK:
                self._pdf.close()
            self._pdf = None
        if self._image is not None:
            self._image.close()
            self._image = None


@contextmanager
def open_document(data: bytes, *, dpi: int, max_pixels: int) -> Iterator[Document]:
    document = Document(data, dpi=dpi, max_pixels=max_pixels)
    try:
        yield document
    finally:
        document.close()


def page_numbers(pages: object) -> set[int] | None:
    if pages is None:
        return None
    if (not isinstance(pages, list) or not pages or len(pages) > 10_000
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1
                       for p in pages)):
        raise PermanentError("payload.pages must be a list of page numbers (1 is the first)")
    return set(pages)


def _pdfium() -> Any:
    try:
        import pypdfium2  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the ocr extra installs it
        raise ConfigError("the OCR service needs pypdfium2 to read PDFs; install "
                          "robotframework-mvp[ocr]") from None
    return pypdfium2
