"""Robot chains: follow-up robots declared at submission, created when the parent ends.

A submission may carry ``on_success`` and ``on_failure``, each ``{"kind", "payload"}``.
When the parent's worker writes its completion, the matching follow-up is inserted in
the same transaction, with the parent's owner and tenant and ``parent_id`` set, so it
exists exactly when the parent's end does. The payload is a template with one simple,
safe rule (no expressions are evaluated): a string value exactly equal to

- ``$parent.id``: the parent's id;
- ``$parent.result``: the parent's result (an object, or null after a failure);
- ``$parent.result.<dotted.path>``: one value inside it (null when absent);
- ``$parent.error``: ``{"type", "message"}`` of the parent's failure, or null;

is replaced by that value. Any other string is kept as is; ``$$parent...`` stands for the
literal text ``$parent...``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from .errors import ValidationError
from .models import ErrorInfo, FollowUp, Robot, RobotStatus
from .security.sanitize import PayloadLimits, sanitize_payload, validate_kind

__all__ = ["TRIGGERS", "followup_for", "parse_followup", "render_payload"]

#: the follow-ups a robot may declare
TRIGGERS = ("on_success", "on_failure")
_PREFIX = "$parent."


def parse_followup(
    value: object, known_kinds: Collection[str], limits: PayloadLimits, *, path: str
) -> FollowUp | None:
    """``value`` (``{"kind", "payload"}`` or None) checked like a submission's own fields."""
    if value is None:
        return None
    if isinstance(value, FollowUp):
        value = {"kind": value.kind, "payload": value.payload}
    if not isinstance(value, Mapping):
        raise ValidationError(f"{path[2:]} must be an object with kind and payload, or null",
                              path=path)
    unknown = sorted(set(value) - {"kind", "payload"})
    if unknown:
        name = str(unknown[0])[:64]
        raise ValidationError(f"unknown field {name!r}; allowed: kind, payload",
                              path=f"{path}.{name}")
    try:
        kind = validate_kind(value.get("kind"), known_kinds)
    except ValidationError as exc:
        exc.path = f"{path}.kind"
        exc.details["path"] = exc.path
        raise
    payload = sanitize_payload(value.get("payload", {}), limits, path=f"{path}.payload")
    return FollowUp(kind=kind, payload=payload)


def followup_for(robot: Robot, status: RobotStatus) -> tuple[str, FollowUp] | None:
    """The trigger and follow-up that ``robot`` ending as ``status`` creates, if any.

    ``succeeded`` fires ``on_success``; ``failed`` and ``timed_out`` fire ``on_failure``;
    ``cancelled`` fires nothing.
    """
    if status is RobotStatus.SUCCEEDED and robot.on_success is not None:
        return "on_success", robot.on_success
    if status in (RobotStatus.FAILED, RobotStatus.TIMED_OUT) and robot.on_failure is not None:
        return "on_failure", robot.on_failure
    return None


def render_payload(
    template: Mapping[str, Any], parent_id: str, result: Mapping[str, Any] | None,
    error: ErrorInfo | None,
) -> dict[str, Any]:
    """The follow-up's payload: ``template`` with the ``$parent...`` strings replaced."""
    rendered = _render(dict(template), parent_id, result, error)
    assert isinstance(rendered, dict)
    return rendered


def _render(value: Any, parent_id: str, result: Mapping[str, Any] | None,
            error: ErrorInfo | None) -> Any:
    if isinstance(value, dict):
        return {k: _render(v, parent_id, result, error) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, parent_id, result, error) for v in value]
    if not isinstance(value, str):
        return value
    if value.startswith("$$parent."):
        return value[1:]
    if not value.startswith(_PREFIX):
        return value
    name = value[len(_PREFIX):]
    if name == "id":
        return parent_id
    if name == "error":
        return None if error is None else {"type": error.type, "message": error.message}
    if name == "result":
        return None if result is None else dict(result)
    if name.startswith("result."):
        current: Any = result
        for part in name[len("result."):].split("."):
            if isinstance(current, Mapping) and part in current:
                current = current[part]
            elif (isinstance(current, list) and part.isascii() and part.isdigit()
                  and int(part) < len(current)):
                current = current[int(part)]
            else:
                return None
        return current
    return value
