"""The example plugin package (``examples/plugin_package``), served over HTTP.

It is registered by module here rather than installed, so it never leaks into other
tests' orchestrators through the entry-point group.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from robotframework_mvp.testing import TEST_API_KEY

PACKAGE = Path(__file__).resolve().parents[2] / "examples" / "plugin_package"
sys.path.insert(0, str(PACKAGE / "src"))

import rfmvp_example_plugin as plugin  # noqa: E402

pytestmark = pytest.mark.anyio
AUTH = {"X-API-Key": TEST_API_KEY}


def test_the_package_declares_its_entry_point() -> None:
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "rfmvp-example-plugin"
    assert project["entry-points"]["robotframework_mvp"] == {
        "rfmvp_example_plugin": "rfmvp_example_plugin"}
    assert "pip install -e examples/plugin_package" in (PACKAGE / "README.md").read_text()


async def test_reverse_module_validation_and_observer(serve: Any) -> None:
    before = plugin.FINISHED["reverse", "succeeded"]
    async with serve(plugins=(plugin,)) as client:
        resp = await client.post("/api/v1/robots", headers=AUTH, json={
            "kind": "reverse", "payload": {"text": "stressed"}, "wait": 5})
        assert resp.status_code == 200, resp.text
        assert resp.json()["result"] == {"reversed": "desserts"}
        refused = await client.post("/api/v1/robots", headers=AUTH, json={
            "kind": "reverse", "payload": {"txt": "oops"}})
        assert refused.status_code == 422
        assert refused.json()["error"] == {
            "type": "validation_error", "path": "$.payload",
            "message": "a reverse robot needs payload.text, a string"}
        modules = (await client.get("/api/v1/modules", headers=AUTH)).json()["items"]
        assert {m["name"] for m in modules} == {"echo", "sleep", "reverse"}
    assert plugin.FINISHED["reverse", "succeeded"] == before + 1
