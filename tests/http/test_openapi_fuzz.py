"""Schemathesis against the FastAPI example's own OpenAPI schema: every operation, with
generated valid and invalid input, never answers 5xx and always answers as documented
(status code, content type, headers and body schema).

The app runs its own orchestrator (SQLite in a temporary directory, the demo modules) in
Schemathesis's event loop, and every request carries a valid key, so the fuzzing reaches
past authentication into validation and the store.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from robotframework_mvp.testing import TEST_API_KEY, test_settings  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


def _app() -> Any:
    import fastapi_app
    from modules import demo

    return fastapi_app.create_app(
        test_settings(f"sqlite:///{STORE}/robots.db", worker={"concurrency": 4},
                      security={"auth_failure_limit": None}),
        modules=[demo.echo, demo.sleep], plugins=[demo])


# Building the app does no I/O: its orchestrator starts (in Schemathesis's event loop) at
# the first request, and the store's directory is created then.
STORE = Path(tempfile.gettempdir()) / f"rfmvp-fuzz-{uuid.uuid4().hex}"
APP = _app()
schema = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module", autouse=True)
def _stop_the_app() -> Iterator[None]:
    yield
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()  # stops the app's orchestrator
    shutil.rmtree(STORE, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented_and_never_5xx(case: Any) -> None:
    case.call_and_validate(app=APP, headers={"X-API-Key": TEST_API_KEY}, checks=CHECKS)
