"""Payload schemas: a module (or a plugin) declares the JSON Schema its payload must meet.

Schemas come from the ``payload_schema`` hook; a built-in implementation serves the
``payload_schema=`` of ``@module``. Each kind's schema is asked for once per
orchestrator and compiled once (a ``jsonschema`` validator for the schema's own draft).
Validation runs after the sanitizer, so it sees only bounded, normalized JSON, and it
never fetches a remote ``$ref``. A refusal is a 422 whose ``path`` names the offending
field (``$.payload.items[2].sku``); the message quotes at most a short part of the input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.protocols

from ..errors import ConfigError, ValidationError
from ..hookspecs import hookimpl
from ..modules import Module

__all__ = ["ModuleSchemaPlugin", "PayloadSchemas", "check_schema"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_MESSAGE = 200


def check_schema(schema: Mapping[str, Any], owner: str) -> jsonschema.protocols.Validator:
    """A validator for ``schema``; ConfigError naming ``owner`` when it is not valid."""
    if not isinstance(schema, Mapping):
        raise ConfigError(f"the payload schema of {owner} must be a JSON Schema object")
    document = dict(schema)
    cls = jsonschema.validators.validator_for(document, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(document)
    except jsonschema.exceptions.SchemaError as exc:
        raise ConfigError(
            f"the payload schema of {owner} is not a valid JSON Schema: {exc.message[:200]}"
        ) from None
    validator: jsonschema.protocols.Validator = cls(document)
    return validator


def _path(parts: Iterable[str | int]) -> str:
    out = "$.payload"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part) and len(part) <= 64:
            out += "." + part
        else:
            out += "[" + json.dumps(part[:64]) + "]"
    return out


class PayloadSchemas:
    """Each kind's compiled schema (or None), asked for through ``lookup(kind)`` once."""

    def __init__(self, lookup: Callable[[str], Mapping[str, Any] | None]) -> None:
        self._lookup = lookup
        self._validators: dict[str, jsonschema.protocols.Validator | None] = {}

    def validator(self, kind: str) -> jsonschema.protocols.Validator | None:
        if kind not in self._validators:
            schema = self._lookup(kind)
            self._validators[kind] = (
                None if schema is None else check_schema(schema, f"kind {kind!r}"))
        return self._validators[kind]

    def validate(self, kind: str, payload: Any) -> None:
        """Raise a 422 ValidationError when ``payload`` breaks ``kind``'s schema."""
        validator = self.validator(kind)
        if validator is None:
            return
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(payload))
        except jsonschema.exceptions.SchemaError as exc:  # pragma: no cover - checked above
            raise ConfigError(f"the payload schema of kind {kind!r} is broken: {exc.message}") \
                from None
        except Exception as exc:  # an unresolvable $ref: a bug in the schema, not the input
            raise ConfigError(
                f"the payload schema of kind {kind!r} cannot be applied "
                f"({type(exc).__name__}); fix the schema") from None
        if error is None:
            return
        path = _path(error.absolute_path)
        message = error.message
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "..."
        raise ValidationError(
            f"payload does not match the schema of kind {kind!r} at {path}: {message}",
            path=path)


class ModuleSchemaPlugin:
    """The built-in ``payload_schema`` implementation: ``@module(payload_schema=...)``."""

    def __init__(self, modules: Mapping[str, Module]) -> None:
        self.modules = modules

    @hookimpl(trylast=True)
    def payload_schema(self, kind: str) -> dict[str, Any] | None:
        for module in self.modules.values():
            if kind in module.kinds and module.payload_schema is not None:
                return dict(module.payload_schema)
        return None
