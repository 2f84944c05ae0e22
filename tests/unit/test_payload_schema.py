"""Specification of payload schemas: ``@module(payload_schema=...)`` and the hook."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robotframework_mvp import (
    ModuleContext,
    Robot,
    SubmitRequest,
    ValidationError,
    hookimpl,
    module,
)
from robotframework_mvp.http import HttpApi
from robotframework_mvp.security.schemas import PayloadSchemas, check_schema
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator

pytestmark = pytest.mark.anyio

ORDER = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "minLength": 1, "maxLength": 40},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
                           "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"], "additionalProperties": False}},
    },
    "required": ["customer", "items"],
    "additionalProperties": False,
}


@module("orders", payload_schema=ORDER)
async def orders(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {"n": len(robot.payload["items"])}


@module("free")
async def free(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    return {}


GOOD = {"customer": "acme", "items": [{"sku": "ABC-1", "qty": 2}]}


@pytest.mark.parametrize(("payload", "path"), [
    ({"items": [{"sku": "ABC-1", "qty": 1}]}, "$.payload"),
    ({**GOOD, "extra": 1}, "$.payload"),
    ({**GOOD, "customer": ""}, "$.payload.customer"),
    ({**GOOD, "items": [{"sku": "ABC-1", "qty": 1}, {"sku": "nope", "qty": 1}]},
     "$.payload.items[1].sku"),
    ({**GOOD, "items": [{"sku": "ABC-1", "qty": 0}]}, "$.payload.items[0].qty"),
    ({**GOOD, "items": [{"sku": "ABC-1", "qty": "2"}]}, "$.payload.items[0].qty"),
])
async def test_a_payload_that_breaks_the_module_schema_is_422_naming_the_field(
    anyio_backend: str, payload: dict[str, Any], path: str,
) -> None:
    async with running_orchestrator(orders, worker={"enabled": False}) as orch:
        with pytest.raises(ValidationError) as caught:
            await orch.submit("orders", payload, api_key=TEST_API_KEY)
        assert caught.value.status == 422
        assert caught.value.path == path
        assert "orders" in caught.value.message


async def test_a_payload_that_meets_the_schema_is_accepted_and_others_kinds_are_free(
    anyio_backend: str,
) -> None:
    async with running_orchestrator(orders, free) as orch:
        robot = await orch.process_robot("orders", GOOD, api_key=TEST_API_KEY, timeout=10)
        assert robot.result == {"n": 1}
        assert (await orch.submit("free", {"anything": [1, 2]}, api_key=TEST_API_KEY)).id


async def test_in_a_batch_the_path_names_the_robot(anyio_backend: str) -> None:
    async with running_orchestrator(orders, worker={"enabled": False}) as orch:
        with pytest.raises(ValidationError) as caught:
            await orch.submit_many([SubmitRequest("orders", GOOD),
                                    SubmitRequest("orders", {**GOOD, "customer": 5})],
                                   api_key=TEST_API_KEY)
        assert caught.value.path == "$.robots[1].payload.customer"
        assert await orch.list(api_key=TEST_API_KEY) is not None


async def test_over_http_the_error_carries_the_path_and_no_long_echo(anyio_backend: str) -> None:
    async with running_orchestrator(orders, worker={"enabled": False}) as orch:
        api = HttpApi(orch)
        body = json.dumps({"kind": "orders", "payload": {**GOOD, "customer": "x" * 5000}})
        response = await api.submit_robot(body.encode(), {"X-API-Key": TEST_API_KEY}, "c")
        assert response.status == 422
        error = response.body["error"]
        assert error["path"] == "$.payload.customer"
        assert len(error["message"]) < 400


class SchemaPlugin:
    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def payload_schema(self, kind: str) -> dict[str, Any] | None:
        self.asked.append(kind)
        if kind == "free":
            return {"type": "object", "properties": {"n": {"type": "number"}}}
        return None


async def test_a_plugin_declares_a_schema_and_is_asked_once_per_kind(anyio_backend: str) -> None:
    plugin = SchemaPlugin()
    async with running_orchestrator(orders, free, plugins=[plugin],
                                    worker={"enabled": False}) as orch:
        for _ in range(3):
            await orch.submit("free", {"n": 1}, api_key=TEST_API_KEY)
        with pytest.raises(ValidationError) as caught:
            await orch.submit("free", {"n": "one"}, api_key=TEST_API_KEY)
        assert caught.value.path == "$.payload.n"
        # The module's own schema still applies to its kind (the plugin answered None).
        with pytest.raises(ValidationError):
            await orch.submit("orders", {}, api_key=TEST_API_KEY)
        assert plugin.asked.count("free") == 1
        assert plugin.asked.count("orders") == 1


def test_a_module_with_an_invalid_schema_fails_where_it_is_defined() -> None:
    with pytest.raises(ValidationError, match="not a valid JSON Schema"):
        @module("broken", payload_schema={"type": "no-such-type"})
        async def broken(robot: Robot, ctx: ModuleContext) -> None: ...


def test_schemas_never_fetch_a_remote_ref() -> None:
    schemas = PayloadSchemas(lambda kind: {"$ref": "https://example.invalid/schema.json"})
    from robotframework_mvp import ConfigError

    with pytest.raises(ConfigError, match="cannot be applied"):
        schemas.validate("k", {})


def test_a_schema_must_be_an_object() -> None:
    from robotframework_mvp import ConfigError

    with pytest.raises(ConfigError):
        check_schema(["not", "a", "schema"], "kind 'x'")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20,
))
def test_any_payload_is_accepted_or_refused_with_a_path_under_payload(payload: Any) -> None:
    schemas = PayloadSchemas(lambda kind: ORDER)
    refusal: ValidationError | None = None
    try:
        schemas.validate("orders", payload)
    except ValidationError as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.path is not None
        assert refusal.path.startswith("$.payload")
        assert len(refusal.message) < 400
