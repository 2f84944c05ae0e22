"""OCREngine: the module for robots of kind ``ocr`` and its health check.

Tesseract (Debian's ``tesseract-ocr``) runs through pytesseract, one page at a time, in
the worker thread of a plain ``def`` module; progress is reported after each page.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ...errors import ConfigError, PermanentError
from ...modules import Module, ModuleContext, module
from .config import LANGUAGE, OcrConfig
from .documents import open_document, page_numbers, read_source

if TYPE_CHECKING:
    from PIL import Image

    from ...models import Robot

__all__ = ["OCREngine"]

log = logging.getLogger(__name__)


class OCREngine:
    """The OCR module and its health check, built from an :class:`OcrConfig`.

    Pass an instance as a plugin (``Orchestrator(plugins=[OCREngine(config)])``): its
    ``module`` attribute is registered as the module ``ocr`` for the kind ``ocr``.
    """

    def __init__(self, config: OcrConfig | None = None, *, name: str = "ocr",
                 kinds: Sequence[str] = ("ocr",)) -> None:
        self.config = config if config is not None else OcrConfig()
        self._installed: frozenset[str] | None = None
        self._probe_lock = threading.Lock()
        self.last_health_problem: str | None = None
        if self.config.tesseract_cmd is not None:
            # pytesseract keeps the program in one process-wide variable.
            _pytesseract().pytesseract.tesseract_cmd = self.config.tesseract_cmd
        timeout = self.config.page_timeout * self.config.max_pages + 60
        self.module: Module = module(
            name, kinds=kinds, capacity=self.config.capacity, timeout=timeout,
            health_check=self.check_health,
        )(self._process)
        self.module.description = "Extract text, word boxes and confidences from images and PDFs."

    # -- health ------------------------------------------------------------------------

    @property
    def tesseract_cmd(self) -> str:
        return self.config.tesseract_cmd or str(_pytesseract().pytesseract.tesseract_cmd)

    def installed_languages(self, *, refresh: bool = False) -> frozenset[str]:
        """Languages Tesseract has models for (``tesseract --list-langs``), cached.

        Raises ``FileNotFoundError`` when the program is missing. Asked here rather than
        through pytesseract, which remembers its first answer for the life of the process.
        """
        with self._probe_lock:
            if self._installed is None or refresh:
                done = subprocess.run(  # noqa: S603 - a configured program, no shell
                    [self.tesseract_cmd, "--list-langs"], capture_output=True, timeout=30,
                    check=False,
                )
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.decode(errors="replace").strip()[:300]
                                       or f"exit status {done.returncode}")
                lines = done.stdout.decode(errors="replace").splitlines()
                self._installed = frozenset(
                    line.strip() for line in lines[1:] if LANGUAGE.fullmatch(line.strip()))
            return self._installed

    def problem(self) -> str | None:
        """What stops this engine from working, or None: Tesseract or a language missing."""
        try:
            installed = self.installed_languages(refresh=True)
        except FileNotFoundError:
            return (f"the Tesseract program {self.tesseract_cmd!r} was not found; install "
                    "Debian's tesseract-ocr and tesseract-ocr-eng, or set "
                    "RFMVP_OCR_TESSERACT_CMD")
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            return f"Tesseract {self.tesseract_cmd!r} does not run: {exc}"
        missing = [lang for lang in self.config.languages if lang not in installed]
        if missing:
            return (f"Tesseract has no model for {', '.join(missing)} (RFMVP_OCR_LANGUAGES); "
                    f"installed: {', '.join(sorted(installed)) or 'none'}; install "
                    + " ".join(f"tesseract-ocr-{lang}" for lang in missing))
        return None

    async def check_health(self) -> bool:
        """The module's health check: False (with a logged reason) when OCR cannot run."""
        problem = await anyio.to_thread.run_sync(self.problem)
        if problem is not None and problem != self.last_health_problem:
            log.error("OCR module unhealthy: %s", problem)
        self.last_health_problem = problem
        return problem is None

    # -- the module ----------------------------------------------------------------------

    def _process(self, robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
        """Runs in a worker thread: read the source, then OCR each page in turn."""
        payload = robot.payload
        languages = self._robot_languages(payload.get("languages"))
        dpi = payload.get("dpi", self.config.dpi)
        if isinstance(dpi, bool) or not isinstance(dpi, int) or not 50 <= dpi <= 600:
            raise PermanentError("payload.dpi must be a whole number from 50 to 600")
        data = read_source(payload.get("source"), self.config)
        wanted = page_numbers(payload.get("pages"))
        with open_document(data, dpi=dpi, max_pixels=self.config.max_pixels) as document:
            numbers = [n for n in range(1, document.page_count + 1)
                       if wanted is None or n in wanted]
            if wanted is not None and (missing := sorted(wanted - set(numbers))):
                raise PermanentError(f"payload.pages asks for page {missing[0]}, but the "
                                     f"document has {document.page_count}")
            if len(numbers) > self.config.max_pages:
                raise PermanentError(
                    f"the document has {len(numbers)} pages to read; at most "
                    f"{self.config.max_pages} are read per robot (RFMVP_OCR_MAX_PAGES): "
                    "split it with payload.pages")
            pages: list[dict[str, Any]] = []
            words_left = self.config.max_words
            for index, number in enumerate(numbers, start=1):
                image = document.render(number)
                page = self._ocr_page(image, number, "+".join(languages),
                                      dpi if document.is_pdf else None, words_left)
                words_left -= len(page["words"])
                pages.append(page)
                ctx.progress_from_thread(100 * index / len(numbers),
                                         f"page {index}/{len(numbers)}")
        return {
            "pages": pages,
            "text": "\n\n".join(page["text"] for page in pages),
            "languages": list(languages),
            "page_count": document.page_count,
            "truncated": any(page.get("words_truncated") for page in pages),
        }

    def _robot_languages(self, requested: object) -> tuple[str, ...]:
        if requested is None:
            languages = self.config.languages
        elif (isinstance(requested, list) and requested and len(requested) <= 8
              and all(isinstance(x, str) and LANGUAGE.fullmatch(x) for x in requested)):
            languages = tuple(requested)
        else:
            raise PermanentError("payload.languages must be a list of 1 to 8 Tesseract "
                                 "language codes, e.g. [\"eng\", \"deu\"]")
        try:
            installed = self.installed_languages()
        except FileNotFoundError:
            raise RuntimeError(f"the Tesseract program {self.tesseract_cmd!r} was not found; "
                               "install Debian's tesseract-ocr or set "
                               "RFMVP_OCR_TESSERACT_CMD") from None
        missing = [lang for lang in languages if lang not in installed]
        if missing:
            raise PermanentError(
                f"language {missing[0]!r} is not installed for Tesseract; installed: "
                f"{', '.join(sorted(installed))}")
        return languages

    def _ocr_page(self, image: Image.Image, number: int, lang: str, dpi: int | None,
                  words_left: int) -> dict[str, Any]:
        tesseract = _pytesseract()
        config = f"--dpi {dpi}" if dpi else ""
        try:
            data = tesseract.image_to_data(image, lang=lang, config=config,
                                           output_type=tesseract.Output.DICT,
                                           timeout=self.config.page_timeout)
        except tesseract.TesseractNotFoundError:
            raise RuntimeError("the Tesseract program was not found; install Debian's "
                               "tesseract-ocr or set RFMVP_OCR_TESSERACT_CMD") from None
        except tesseract.TesseractError as exc:
            raise PermanentError(f"Tesseract could not read page {number}: "
                                 f"{str(exc.message)[:300]}") from None
        words: list[dict[str, Any]] = []
        lines: list[list[str]] = []
        line_key: tuple[int, int, int] | None = None
        block_key: tuple[int, int] | None = None
        confidences: list[float] = []
        for i, text in enumerate(data["text"]):
            text = (text or "").strip()
            if int(data["level"][i]) != 5 or not text:
                continue
            key = (int(data["block_num"][i]), int(data["par_num"][i]), int(data["line_num"][i]))
            if key != line_key:
                if block_key is not None and key[:2] != block_key:
                    lines.append([])  # a blank line between paragraphs, as Tesseract prints
                lines.append([])
                line_key, block_key = key, key[:2]
            lines[-1].append(text)
            confidence = float(data["conf"][i])
            if confidence >= 0:
                confidences.append(confidence)
            if len(words) < words_left:
                words.append({
                    "text": text, "left": int(data["left"][i]), "top": int(data["top"][i]),
                    "width": int(data["width"][i]), "height": int(data["height"][i]),
                    "confidence": round(confidence, 2),
                })
        page: dict[str, Any] = {
            "number": number,
            "width": image.width,
            "height": image.height,
            "text": "\n".join(" ".join(line) for line in lines),
            "words": words,
            "mean_confidence": (round(sum(confidences) / len(confidences), 2)
                                if confidences else None),
        }
        word_count = sum(len(line) for line in lines)
        if word_count > len(words):
            page["words_truncated"] = True
            page["word_count"] = word_count
        return page


def _pytesseract() -> Any:
    try:
        import pytesseract  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the ocr extra installs it
        raise ConfigError("the OCR service needs pytesseract; install "
                          "robotframework-mvp[ocr]") from None
    return pytesseract
