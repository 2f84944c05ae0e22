"""The docs say what the code does: these tests fail when one drifts from the other.

Each check compares a page of ``docs/`` with its source of truth: the hook
specifications, the settings reference, the public API, the HTTP contract, and the files
that links point at.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import robotframework_mvp
from robotframework_mvp import hookspecs
from robotframework_mvp.config import settings_reference
from robotframework_mvp.http import API_PREFIX

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

# The HTTP contract (DESIGN section 9, as served by ``robotframework_mvp.http.HttpApi``
# through the example adapters). ``{id}`` is the robot id.
ROUTES = (
    "POST /api/v1/robots",
    "POST /api/v1/robots:batch",
    "GET /api/v1/robots/{id}",
    "GET /api/v1/robots",
    "POST /api/v1/robots/{id}/cancel",
    "POST /api/v1/robots/{id}/retry",
    "GET /api/v1/robots/{id}/executions",
    "GET /api/v1/modules",
    "POST /api/v1/schedules",
    "GET /api/v1/schedules",
    "GET /api/v1/schedules/{id}",
    "DELETE /api/v1/schedules/{id}",
    "POST /api/v1/schedules/{id}/pause",
    "POST /api/v1/schedules/{id}/resume",
    "GET /health",
    "GET /health/ready",
    "GET /metrics",
    "GET /dashboard",
    "GET /dashboard/data",
)

PAGES = ("index", "quickstart", "concepts", "modules", "hooks", "configuration", "http",
         "architecture", "deployment", "scheduling", "operations", "security", "resilience",
         "performance")


def _read(name: str) -> str:
    return (DOCS / f"{name}.md").read_text(encoding="utf-8")


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _hookspecs() -> dict[str, object]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {name: fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, marker)}


def _signature_line(name: str, fn: object) -> str:
    """``def name(arg: Type, ...) -> Return`` with the annotations as written in the source
    (hookspecs.py uses ``from __future__ import annotations``, so they are strings)."""
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {name}({params}) -> {sig.return_annotation}"


def _sections(text: str) -> dict[str, str]:
    """``## heading`` -> the text up to the next ``## `` heading (fenced code is skipped)."""
    sections: dict[str, str] = {}
    current: str | None = None
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            current = line[3:].strip().strip("`")
            sections[current] = ""
            continue
        if current is not None:
            sections[current] += line + "\n"
    return sections


# -- pages -----------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_every_page_exists_and_is_linked_from_the_index(page: str) -> None:
    assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"
    if page != "index":
        assert f"({page}.md" in _read("index"), f"docs/index.md does not link {page}.md"


# -- hooks -----------------------------------------------------------------------------


def test_hookspecs_are_found() -> None:
    assert len(_hookspecs()) >= 10


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_every_hook_has_a_section_with_its_exact_signature(name: str) -> None:
    sections = _sections(_read("hooks"))
    assert name in sections, f"docs/hooks.md has no '## {name}' section"
    section = sections[name]
    expected = _signature_line(name, _hookspecs()[name])
    assert _squash(expected) in _squash(section), (
        f"the '## {name}' section of docs/hooks.md lacks the signature line:\n{expected}"
    )
    assert "@hookimpl" in section, f"the '## {name}' section has no example plugin"


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_firstresult_hooks_say_so_and_broadcast_hooks_do_not(name: str) -> None:
    spec = getattr(_hookspecs()[name], f"{hookspecs.PROJECT_NAME}_spec")
    section = _sections(_read("hooks"))[name]
    says_first = "Stops at the first non-None result" in _squash(section)
    assert says_first == bool(spec["firstresult"]), (
        f"'## {name}': firstresult is {spec['firstresult']}, the docs say otherwise"
    )


def test_hooks_page_documents_no_hook_that_does_not_exist() -> None:
    headings = [h for h in _sections(_read("hooks")) if re.fullmatch(r"[a-z]+(_[a-z]+)+", h)]
    stale = sorted(set(headings) - set(_hookspecs()))
    assert not stale, f"docs/hooks.md documents hooks that do not exist: {stale}"


# -- configuration ---------------------------------------------------------------------


def _config_table() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in _read("configuration").splitlines():
        match = re.match(r"\|\s*`(RFMVP_[A-Z0-9_]+)`\s*\|", line)
        if match:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[match.group(1)] = cells
    return rows


@pytest.mark.parametrize("row", settings_reference(), ids=lambda row: row[0])
def test_every_setting_is_in_the_configuration_table_with_its_default(
    row: tuple[str, str, str, str],
) -> None:
    variable, default, _form, _meaning = row
    table = _config_table()
    assert variable in table, f"docs/configuration.md has no table row for {variable}"
    shown = table[variable][1].strip("`")
    assert shown == default, (
        f"docs/configuration.md shows {variable} defaulting to {shown!r}; the code says "
        f"{default!r}"
    )


def test_configuration_table_lists_no_setting_that_does_not_exist() -> None:
    known = {row[0] for row in settings_reference()}
    stale = sorted(set(_config_table()) - known)
    assert not stale, f"docs/configuration.md documents unknown settings: {stale}"


# -- public API ------------------------------------------------------------------------


def _mentions(text: str) -> str:
    """Everything written as code: inline spans and fenced blocks."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", prose))


@pytest.mark.parametrize(
    "name",
    sorted(n for n in robotframework_mvp.__all__
           if inspect.isclass(getattr(robotframework_mvp, n))
           or inspect.isfunction(getattr(robotframework_mvp, n))),
)
def test_every_public_class_and_function_is_mentioned_in_the_docs(name: str) -> None:
    code = "\n".join(_mentions(p.read_text(encoding="utf-8")) for p in DOCS.glob("*.md"))
    assert re.search(rf"\b{re.escape(name)}\b", code), (
        f"robotframework_mvp.{name} is public but docs/ never mentions it as code"
    )


# -- HTTP ------------------------------------------------------------------------------


def test_the_contract_prefix_is_the_one_documented() -> None:
    assert API_PREFIX == "/api/v1"


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_is_documented(route: str) -> None:
    assert route in _read("http"), f"docs/http.md does not document {route}"


def test_the_starlette_adapter_serves_only_documented_routes() -> None:
    pytest.importorskip("starlette")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_docs_starlette_app", ROOT / "examples" / "starlette_app.py")
    assert spec is not None
    assert spec.loader is not None
    app_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_module)
    app = app_module.create_app()
    served = {
        f"{method} {route.path.replace('{robot_id}', '{id}').replace('{schedule_id}', '{id}')}"
        for route in app.routes
        for method in (getattr(route, "methods", None) or ())
        if method != "HEAD"
    }
    undocumented = sorted(served - set(ROUTES))
    assert not undocumented, f"the Starlette adapter serves undocumented routes: {undocumented}"


# -- links -----------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"#{1,6} (.+)", line)
        if match:
            slug = _slug(match.group(1))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _link_sources() -> list[Path]:
    return [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"),
                  flags=re.MULTILINE | re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("source", _link_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file_and_heading(source: Path) -> None:
    broken = []
    for link in _links(source):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: ...
            continue
        target, _, anchor = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        if not path.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no such heading)")
    assert not broken, f"{source.relative_to(ROOT)} has broken links: {broken}"


def test_the_testing_a_module_anchor_exists() -> None:
    assert "testing-a-module" in _anchors(DOCS / "modules.md")


# -- code blocks -----------------------------------------------------------------------


def _python_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((path.name, line, match.group(1)))
    return blocks


@pytest.mark.parametrize("block", _python_blocks(), ids=lambda b: f"{b[0]}:{b[1]}")
def test_every_python_block_compiles(block: tuple[str, int, str]) -> None:
    name, line, code = block
    if re.fullmatch(r"def \w+\(.*\) -> [^:]+", code.strip()):
        return  # a hook signature line, shown as declared
    compile(code, f"{name}:{line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
