"""The OCR service reads what it is shown, page by page, and nothing it is not allowed to.

Every image here is rendered by the test with Pillow from known text, so the expected
text is exact; the engine is the real Tesseract.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from robotframework_mvp import ConfigError, Robot, RobotStatus, hookimpl
from robotframework_mvp.services.ocr import OcrConfig, OCREngine
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator, test_settings

pytestmark = pytest.mark.anyio

INVOICE = [
    "INVOICE 2024-0117",
    "Acme Robotics Ltd, 12 Harbour Street, Bristol",
    "Widget assembly kit x 3        129.00",
    "Calibration service             45.50",
    "Shipping and handling           12.75",
    "TOTAL DUE EUR 187.25",
    "Payment within 30 days to account 4471 0092.",
]

#: the accuracy every clean render must reach (the issue asks for at least 95 %)
THRESHOLD = 0.95


def normalize(text: str) -> str:
    """Compare characters, not layout: runs of whitespace count as one space."""
    return " ".join(text.split())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_accuracy(expected: str, got: str) -> float:
    """1 - (edit distance / length of the expected text), on normalized text."""
    expected, got = normalize(expected), normalize(got)
    return max(0.0, 1 - levenshtein(expected, got) / len(expected))


@attrs.define(eq=False)  # pluggy keeps plugins in a set
class ProgressLog:
    """A plugin that records every progress report, as any third party could."""

    reports: list[tuple[str, float, str | None]] = attrs.field(factory=list)

    @hookimpl
    def on_robot_progress(self, robot: Robot) -> None:
        self.reports.append((robot.id, robot.progress, robot.progress_message))


@pytest.fixture
def engine(tesseract: str, ocr_root: Path) -> OCREngine:
    return OCREngine(OcrConfig(root=ocr_root))


async def run_ocr(engine: OCREngine, payload: dict[str, Any], *plugins: object) -> Robot:
    async with running_orchestrator(plugins=[engine, *plugins]) as orch:
        return await orch.process_robot("ocr", payload, api_key=TEST_API_KEY, timeout=120)


def save_pdf(path: Path, pages: list[Any]) -> None:
    pages[0].save(path, "PDF", save_all=True, append_images=pages[1:], resolution=150)


# -- reading ---------------------------------------------------------------------------


@pytest.mark.parametrize(("font", "size"), [(0, 32), (1, 28)], ids=["sans-32px", "serif-28px"])
async def test_a_clean_render_is_read_with_at_least_95_percent_character_accuracy(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any], font: int, size: int,
) -> None:
    render(INVOICE, size=size, font=font).save(ocr_root / "invoice.png")
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'invoice.png'}"})
    assert robot.status == RobotStatus.SUCCEEDED, robot.error
    assert robot.result is not None
    accuracy = character_accuracy("\n".join(INVOICE), robot.result["text"])
    print(f"character accuracy ({font=}, {size=}): {accuracy:.4f}")
    assert accuracy >= THRESHOLD, f"accuracy {accuracy:.3f}: {robot.result['text']!r}"
    assert robot.result["languages"] == ["eng"]
    assert robot.progress == 100


async def test_each_word_has_a_box_inside_the_page_and_a_confidence(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any],
) -> None:
    image = render(INVOICE)
    image.save(ocr_root / "invoice.png")
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'invoice.png'}"})
    assert robot.result is not None
    (page,) = robot.result["pages"]
    assert page["number"] == 1
    assert (page["width"], page["height"]) == image.size
    words = page["words"]
    assert len(words) == sum(len(line.split()) for line in INVOICE)
    for word in words:
        assert set(word) == {"text", "left", "top", "width", "height", "confidence"}
        assert word["left"] >= 0
        assert word["left"] + word["width"] <= image.width
        assert word["top"] >= 0
        assert word["top"] + word["height"] <= image.height
        assert 0 <= word["confidence"] <= 100
    total = next(w for w in words if w["text"] == "187.25")
    # The total is on the sixth line: its box is below the first five.
    assert total["top"] > max(w["top"] for w in words if w["text"] == "INVOICE")
    assert page["mean_confidence"] > 80
    assert robot.result["truncated"] is False


async def test_a_three_page_pdf_is_read_page_by_page_with_progress_after_each(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any],
) -> None:
    texts = [INVOICE[:2], INVOICE[2:5], INVOICE[5:]]
    save_pdf(ocr_root / "invoice.pdf", [render(lines) for lines in texts])
    progress = ProgressLog()
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'invoice.pdf'}"}, progress)
    assert robot.status == RobotStatus.SUCCEEDED, robot.error
    assert robot.result is not None
    pages = robot.result["pages"]
    assert [p["number"] for p in pages] == [1, 2, 3]
    assert robot.result["page_count"] == 3
    for page, lines in zip(pages, texts, strict=True):
        assert character_accuracy("\n".join(lines), page["text"]) >= THRESHOLD, page["text"]
        assert page["words"], "every page has word boxes"
        assert all(0 <= w["confidence"] <= 100 for w in page["words"])
        assert page["mean_confidence"] is not None
    messages = [m for rid, _, m in progress.reports if rid == robot.id]
    assert messages == ["page 1/3", "page 2/3", "page 3/3"]
    percents = [p for rid, p, _ in progress.reports if rid == robot.id]
    assert percents == sorted(percents)
    assert percents[0] < 50
    assert percents[-1] == 100


async def test_pages_reads_only_the_pages_asked_for(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any],
) -> None:
    save_pdf(ocr_root / "doc.pdf", [render([f"This is page number {n}"]) for n in "ABC"])
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'doc.pdf'}", "pages": [2]})
    assert robot.result is not None
    assert [p["number"] for p in robot.result["pages"]] == [2]
    assert "page number B" in robot.result["text"]


async def test_a_multi_frame_tiff_is_one_page_per_frame(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any],
) -> None:
    frames = [render([f"Frame {word}"]) for word in ("alpha", "bravo")]
    frames[0].save(ocr_root / "scan.tiff", save_all=True, append_images=frames[1:])
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'scan.tiff'}"})
    assert robot.result is not None
    assert [normalize(p["text"]) for p in robot.result["pages"]] == ["Frame alpha",
                                                                     "Frame bravo"]


async def test_a_data_url_is_read_without_any_file(
    tesseract: str, render: Callable[..., Any],
) -> None:
    buffer = io.BytesIO()
    render(["Hello from a data URL"], size=24, width=600).save(buffer, "PNG", optimize=True)
    source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert len(source) < 16 * 1024  # the sanitizer's default longest string
    robot = await run_ocr(OCREngine(OcrConfig()), {"source": source})
    assert robot.status == RobotStatus.SUCCEEDED, robot.error
    assert robot.result is not None
    assert normalize(robot.result["text"]) == "Hello from a data URL"


async def test_the_word_budget_truncates_boxes_and_says_so(
    tesseract: str, ocr_root: Path, render: Callable[..., Any],
) -> None:
    render(INVOICE).save(ocr_root / "invoice.png")
    engine = OCREngine(OcrConfig(root=ocr_root, max_words=5))
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'invoice.png'}"})
    assert robot.result is not None
    (page,) = robot.result["pages"]
    assert len(page["words"]) == 5
    assert page["words_truncated"] is True
    assert page["word_count"] > 5
    assert robot.result["truncated"] is True
    assert character_accuracy("\n".join(INVOICE), robot.result["text"]) >= THRESHOLD


# -- refusing --------------------------------------------------------------------------


def assert_failed_permanently(robot: Robot, *fragments: str) -> None:
    assert robot.status == RobotStatus.FAILED
    assert robot.attempts == 1, "a permanent error is not retried"
    assert robot.error is not None
    assert robot.error.type == "PermanentError"
    for fragment in fragments:
        assert fragment in robot.error.message


@pytest.fixture
def outside(tmp_path: Path, render: Callable[..., Any]) -> Path:
    """A readable image next to the root, not below it."""
    secret = tmp_path / "secret.png"
    render(["TOP SECRET"]).save(secret)
    return secret


@pytest.mark.parametrize("source", [
    "file://{root}/../secret.png",
    "file://{root}/%2e%2e/secret.png",
    "file://{outside}",
    "file:///etc/passwd",
    "file://{root}/link-out.png",
    "file://{root}/missing.png",
    "file://evil.example{outside}",
    "file:{root}/../secret.png",
], ids=["dot-dot", "encoded-dot-dot", "absolute-outside", "etc-passwd", "symlink-out",
        "missing", "remote-host", "no-slashes"])
async def test_files_outside_the_root_are_refused_at_once(
    engine: OCREngine, ocr_root: Path, outside: Path, source: str,
) -> None:
    (ocr_root / "link-out.png").symlink_to(outside)
    robot = await run_ocr(engine, {"source": source.format(root=ocr_root, outside=outside)})
    assert_failed_permanently(robot)
    assert "TOP SECRET" not in str(robot.result)
    assert str(outside) not in robot.error.message if robot.error else True


async def test_missing_and_forbidden_files_get_the_same_answer(
    engine: OCREngine, ocr_root: Path, outside: Path,
) -> None:
    forbidden = await run_ocr(engine, {"source": f"file://{outside}"})
    missing = await run_ocr(engine, {"source": f"file://{ocr_root}/nothing.png"})
    assert forbidden.error is not None
    assert missing.error is not None
    assert forbidden.error.message == missing.error.message


async def test_file_sources_are_refused_when_no_root_is_configured(
    tesseract: str, outside: Path,
) -> None:
    robot = await run_ocr(OCREngine(OcrConfig()), {"source": f"file://{outside}"})
    assert_failed_permanently(robot, "RFMVP_OCR_ROOT")


@pytest.mark.parametrize(("name", "content"), [
    ("notes.png", b"this is plain text, not an image"),
    ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage"),
    ("empty.png", b""),
], ids=["text-as-png", "corrupt-pdf", "empty"])
async def test_corrupt_input_fails_at_once_with_a_permanent_error(
    engine: OCREngine, ocr_root: Path, name: str, content: bytes,
) -> None:
    (ocr_root / name).write_bytes(content)
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / name}"})
    assert_failed_permanently(robot)


async def test_a_truncated_png_fails_at_once(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any],
) -> None:
    buffer = io.BytesIO()
    render(INVOICE).save(buffer, "PNG")
    (ocr_root / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'cut.png'}"})
    assert_failed_permanently(robot, "corrupt")


@pytest.mark.parametrize(("payload", "fragment"), [
    ({"source": "https://example.com/a.png"}, "file:// URL or a data: URL"),
    ({"source": "data:image/png,notbase64"}, "base64"),
    ({"source": "data:image/png;base64,@@@"}, "not valid base64"),
    ({"source": "file:///x.png", "languages": "eng"}, "payload.languages"),
    ({"source": "file:///x.png", "dpi": 5000}, "payload.dpi"),
    ({}, "payload.source"),
])
async def test_bad_payloads_fail_at_once_saying_what_to_change(
    engine: OCREngine, payload: dict[str, Any], fragment: str,
) -> None:
    robot = await run_ocr(engine, payload)
    assert_failed_permanently(robot, fragment)


async def test_an_uninstalled_language_fails_at_once_and_names_the_installed_ones(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any],
) -> None:
    render(["Hallo Welt"]).save(ocr_root / "de.png")
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'de.png'}",
                                   "languages": ["xyz"]})
    assert_failed_permanently(robot, "'xyz'", "eng")


async def test_asking_for_a_page_the_document_lacks_fails_at_once(
    engine: OCREngine, ocr_root: Path, render: Callable[..., Any],
) -> None:
    render(["one page"]).save(ocr_root / "one.png")
    robot = await run_ocr(engine, {"source": f"file://{ocr_root / 'one.png'}", "pages": [4]})
    assert_failed_permanently(robot, "page 4")


# -- health and configuration ----------------------------------------------------------


async def test_the_health_check_passes_when_tesseract_and_the_languages_are_there(
    engine: OCREngine,
) -> None:
    assert await engine.check_health() is True
    assert "eng" in engine.installed_languages()


async def test_a_missing_tesseract_fails_the_health_check_with_a_clear_message(
    tesseract: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    engine = OCREngine(OcrConfig())
    with caplog.at_level(logging.ERROR):
        assert await engine.check_health() is False
    assert engine.last_health_problem is not None
    assert "tesseract" in engine.last_health_problem
    assert "was not found" in engine.last_health_problem
    assert "tesseract-ocr" in caplog.text  # what to install


async def test_a_language_without_a_model_fails_the_health_check(tesseract: str) -> None:
    engine = OCREngine(OcrConfig(languages=("eng", "klingon")))
    assert await engine.check_health() is False
    assert engine.last_health_problem is not None
    assert "tesseract-ocr-klingon" in engine.last_health_problem


def test_configuration_comes_from_rfmvp_ocr_variables(tmp_path: Path) -> None:
    secret_file = tmp_path / "langs"
    secret_file.write_text("eng,deu\n")
    config = OcrConfig.from_env({
        "RFMVP_OCR_ROOT": str(tmp_path), "RFMVP_OCR_LANGUAGES_FILE": str(secret_file),
        "RFMVP_OCR_DPI": "300", "RFMVP_OCR_MAX_WORDS": "10", "RFMVP_OCR_CAPACITY": "1",
    })
    assert config.root == tmp_path
    assert config.languages == ("eng", "deu")
    assert (config.dpi, config.max_words, config.capacity) == (300, 10, 1)
    assert OcrConfig.from_env({}) == OcrConfig()


@pytest.mark.parametrize(("variable", "value"), [
    ("RFMVP_OCR_DPI", "lots"), ("RFMVP_OCR_DPI", "5"), ("RFMVP_OCR_LANGUAGES", "en g"),
    ("RFMVP_OCR_MAX_PAGES", "0"),
])
def test_a_bad_variable_fails_naming_it(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        OcrConfig.from_env({variable: value})


def test_ocr_variables_do_not_trigger_the_unknown_setting_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from robotframework_mvp import Settings
    from robotframework_mvp.services.ocr.config import ENV_VARIABLES

    with caplog.at_level(logging.WARNING):
        Settings.from_env(env_file=None, environ={f"RFMVP_{n}": "1" for n in ENV_VARIABLES})
    assert "is not a setting" not in caplog.text


async def test_listing_the_plugin_in_rfmvp_plugins_registers_the_ocr_module(
    tesseract: str, tmp_path: Path, ocr_root: Path, render: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RFMVP_OCR_ROOT", str(ocr_root))
    monkeypatch.chdir(tmp_path)  # no stray .env file
    render(["Registered by name"]).save(ocr_root / "a.png")
    settings = test_settings(f"sqlite:///{tmp_path / 'robots.db'}",
                             plugins=("robotframework_mvp.services.ocr",))
    async with running_orchestrator(settings=settings) as orch:
        assert "ocr" in orch.modules
        robot = await orch.process_robot("ocr", {"source": f"file://{ocr_root / 'a.png'}"},
                                         api_key=TEST_API_KEY, timeout=60)
    assert robot.status == RobotStatus.SUCCEEDED, robot.error
    assert robot.result is not None
    assert normalize(robot.result["text"]) == "Registered by name"
