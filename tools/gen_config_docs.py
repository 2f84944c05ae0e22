"""Rewrite the settings table of docs/configuration.md from ``settings_reference()``.

Run after adding or changing a setting: ``python tools/gen_config_docs.py``.
"""

from __future__ import annotations

from pathlib import Path

from robotframework_mvp.config import settings_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
HEADER = "| Variable | Default | Accepted values | Meaning |"


def table() -> list[str]:
    lines = [HEADER, "| --- | --- | --- | --- |"]
    for row in settings_reference():
        variable, default, form, meaning = (cell.replace("|", "\\|") for cell in row)
        lines.append(f"| `{variable}` | `{default}` | {form} | {meaning} |")
    return lines


def main() -> None:
    lines = DOC.read_text().splitlines()
    start = lines.index(HEADER)
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    DOC.write_text("\n".join([*lines[:start], *table(), *lines[end:]]) + "\n")


if __name__ == "__main__":
    main()
