"""OcrConfig: what the OCR module may read and how much it may produce (``RFMVP_OCR_*``)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from dotenv import dotenv_values

from ...config import _lookup
from ...errors import ConfigError

__all__ = ["ENV_VARIABLES", "LANGUAGE", "OcrConfig"]

#: variables this plugin reads (listed in ``config._NOT_SETTINGS``)
ENV_VARIABLES = ("OCR_ROOT", "OCR_LANGUAGES", "OCR_DPI", "OCR_MAX_PAGES", "OCR_MAX_FILE_BYTES",
                 "OCR_MAX_PIXELS", "OCR_MAX_WORDS", "OCR_PAGE_TIMEOUT", "OCR_CAPACITY",
                 "OCR_TESSERACT_CMD")

LANGUAGE = re.compile(r"[A-Za-z0-9_]{1,32}")


def _languages(text: str) -> tuple[str, ...]:
    languages = tuple(part.strip() for part in re.split(r"[,+]", text) if part.strip())
    if not languages or not all(LANGUAGE.fullmatch(lang) for lang in languages):
        raise ValueError("comma-separated Tesseract language codes (e.g. eng,deu)")
    return languages


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text.strip())
        if not value > 0 or not math.isfinite(value):
            raise ValueError("a number above 0")
        return value

    return parse


@attrs.frozen
class OcrConfig:
    """What the OCR module may read and how much it may produce.

    ``root`` is the only directory ``file://`` sources may come from; without it they are
    refused. ``max_words`` bounds the words (with boxes) kept across all pages of one
    robot, so a result stays a reasonable JSON document in the store.
    """

    root: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    languages: tuple[str, ...] = ("eng",)
    dpi: int = 200
    max_pages: int = 50
    max_file_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 60_000_000
    max_words: int = 5000
    page_timeout: float = 120.0
    capacity: int = 2
    tesseract_cmd: str | None = None

    def __attrs_post_init__(self) -> None:
        if not self.languages or not all(LANGUAGE.fullmatch(lang) for lang in self.languages):
            raise ConfigError("RFMVP_OCR_LANGUAGES has a bad value; expected comma-separated "
                              "Tesseract language codes (e.g. eng,deu)")
        if not 50 <= self.dpi <= 600:
            raise ConfigError("RFMVP_OCR_DPI has a bad value; expected 50 to 600")
        for name in ("max_pages", "max_file_bytes", "max_pixels", "max_words", "capacity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RFMVP_OCR_{name.upper()} has a bad value; expected a "
                                  "whole number above 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 env_file: str | os.PathLike[str] | None = ".env") -> OcrConfig:
        """Read ``RFMVP_OCR_*`` (each also as ``<NAME>_FILE``), like ``Settings.from_env``."""
        values: dict[str, str] = {}
        if environ is None:
            if env_file is not None and Path(env_file).is_file():
                values.update({k: v for k, v in dotenv_values(env_file).items()
                               if v is not None})
            values.update(os.environ)
        else:
            values.update(environ)
        parsers: dict[str, tuple[str, Callable[[str], Any], str]] = {
            "root": ("RFMVP_OCR_ROOT", lambda t: Path(t.strip()) if t.strip() else None,
                     "a directory"),
            "languages": ("RFMVP_OCR_LANGUAGES", _languages, "comma-separated language codes"),
            "dpi": ("RFMVP_OCR_DPI", _positive(int), "a whole number from 50 to 600"),
            "max_pages": ("RFMVP_OCR_MAX_PAGES", _positive(int), "a whole number above 0"),
            "max_file_bytes": ("RFMVP_OCR_MAX_FILE_BYTES", _positive(int),
                               "a whole number above 0"),
            "max_pixels": ("RFMVP_OCR_MAX_PIXELS", _positive(int), "a whole number above 0"),
            "max_words": ("RFMVP_OCR_MAX_WORDS", _positive(int), "a whole number above 0"),
            "page_timeout": ("RFMVP_OCR_PAGE_TIMEOUT", _positive(float),
                             "a number of seconds above 0"),
            "capacity": ("RFMVP_OCR_CAPACITY", _positive(int), "a whole number above 0"),
            "tesseract_cmd": ("RFMVP_OCR_TESSERACT_CMD", lambda t: t.strip() or None,
                              "the tesseract program"),
        }
        kwargs: dict[str, Any] = {}
        for field, (name, parse, form) in parsers.items():
            raw = _lookup(values, name)
            if raw is None:
                continue
            try:
                kwargs[field] = parse(raw)
            except ValueError:
                raise ConfigError(f"{name} has a bad value; expected {form}") from None
        return cls(**kwargs)
