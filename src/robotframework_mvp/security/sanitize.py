"""Input sanitization: the one place where untrusted request data becomes trusted data.

This module owns turning a request body into a bounded, well-formed JSON object
(``parse_json_body``), normalizing a robot's payload (``sanitize_payload``: size, depth,
key-count, string-length and number limits; Unicode NFC; no NUL, control characters or
lone surrogates; only JSON types) and checking the small top-level fields of a submission
(``validate_kind``, ``validate_priority``, ``validate_idempotency_key``, ``validate_wait``).
It is framework-free so every HTTP adapter, the CLI and the Python API apply exactly the
same rules, and it sits on the hot path of every request, so the common case (short ASCII
strings, shallow objects) takes a fast path and paths for error messages are only built
when something is actually wrong. Every error names the offending place in JSONPath form
(``$.payload.items[3].name``) and says what to change, without echoing more than a short,
escaped excerpt of the caller's input.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import attrs

from ..errors import PayloadTooLargeError, ValidationError

if TYPE_CHECKING:
    from ..config import SecurityConfig

__all__ = [
    "MAX_DELAY_SECONDS",
    "PayloadLimits",
    "parse_json_body",
    "sanitize_payload",
    "validate_delay",
    "validate_idempotency_key",
    "validate_kind",
    "validate_priority",
    "validate_run_at",
    "validate_wait",
]


_positive = attrs.validators.gt(0)


@attrs.frozen
class PayloadLimits:
    """Bounds on a request body and the payload inside it.

    ``max_keys`` bounds both the keys of one object and the items of one array;
    ``max_number`` bounds the absolute value of every number (the default, 2**53, is the
    largest range in which every integer survives a trip through a JavaScript client).
    """

    max_bytes: int = attrs.field(default=65536, validator=_positive)
    max_depth: int = attrs.field(default=32, validator=_positive)
    max_keys: int = attrs.field(default=1000, validator=_positive)
    max_string_length: int = attrs.field(default=16384, validator=_positive)
    max_number: int = attrs.field(default=2**53, validator=_positive)
    max_key_length: int = attrs.field(default=256, validator=_positive)

    @classmethod
    def from_config(cls, security_config: SecurityConfig) -> PayloadLimits:
        """The limits configured by ``RFMVP_MAX_PAYLOAD_BYTES``, ``RFMVP_MAX_DEPTH`` ..."""
        return cls(
            max_bytes=security_config.max_payload_bytes,
            max_depth=security_config.max_depth,
            max_keys=security_config.max_keys,
            max_string_length=security_config.max_string_length,
        )


# --------------------------------------------------------------------------- helpers

# NUL and the other C0 controls except tab, newline and carriage return; DEL and the C1
# controls; UTF-16 surrogates (only "lone" ones can occur in a Python str).
_FORBIDDEN_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
_SHOWN_KEY_CHARS = 64
_JSON_TYPES = frozenset({str, int, float, bool, type(None), dict, list, tuple})
_ALLOWED_TYPES_HINT = "; use an object, array, string, number, true, false or null"


class _Reject(Exception):
    """A problem found while walking a payload; the walker prepends the path.

    The final message is ``f"{head} at {path}{tail}"``.
    """

    def __init__(self, head: str, tail: str) -> None:
        super().__init__(head, tail)
        self.head = head
        self.tail = tail


def _segment(in_object: bool, key: object) -> str:
    """One JSONPath step: ``.name``, ``["odd key"]`` or ``[3]``; long keys are cut short."""
    if not in_object:
        return f"[{key}]"
    if isinstance(key, str):
        if len(key) <= _SHOWN_KEY_CHARS and _IDENTIFIER.fullmatch(key):
            return "." + key
        shown = key if len(key) <= _SHOWN_KEY_CHARS else key[:_SHOWN_KEY_CHARS] + "..."
        # ensure_ascii escapes controls, NUL, non-ASCII and lone surrogates alike.
        return "[" + json.dumps(shown) + "]"
    return "[" + _short_repr(key) + "]"


def _short_repr(value: object, limit: int = _SHOWN_KEY_CHARS) -> str:
    """A short, escaped rendering of a caller's value that is safe to put in a message."""
    if isinstance(value, str):
        text = repr(value[:limit])
        return text + "..." if len(value) > limit else text
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, float) or (isinstance(value, int) and -(10**30) < value < 10**30):
        return repr(float.__float__(value) if isinstance(value, float) else int.__int__(value))
    if isinstance(value, int):
        return "a very large integer"  # repr() of a huge int may itself be refused
    return f"<{_type_name(value)}>"


def _type_name(value: object) -> str:
    return type(value).__name__[:_SHOWN_KEY_CHARS]


def _json_kind(value: object) -> str:
    """How a value reads in JSON terms, for "must be a JSON object, not ..." messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a value of type {_type_name(value)}"


def _describe_char(char: str, position: int) -> str:
    code = ord(char)
    if code == 0:
        return f" contains a NUL character (U+0000) at position {position}; remove it"
    if 0xD800 <= code <= 0xDFFF:
        return (
            f" contains a lone surrogate (U+{code:04X}) at position {position}; "
            "send well-formed Unicode text"
        )
    return (
        f" contains the control character U+{code:04X} at position {position}; "
        "only tab, newline and carriage return are allowed"
    )


def _clean_text(text: str, limit: int, what: str) -> str:
    """``text`` checked (length, forbidden characters) and NFC-normalized."""
    length = len(text)
    if length > limit:
        raise _Reject(what, f" is {length} characters; the limit is {limit}")
    bad = _FORBIDDEN_CHAR.search(text)
    if bad is not None:
        raise _Reject(what, _describe_char(bad.group(), bad.start()))
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        if len(text) > limit:
            raise _Reject(
                what, f" is {len(text)} characters once NFC-normalized; the limit is {limit}"
            )
    return text


def _clean_key(key: object, limit: int) -> str:
    if type(key) is not str:
        if not isinstance(key, str):
            raise _Reject(f"key of type {_type_name(key)}", "; object keys must be strings")
        key = str.__str__(key)  # a str subclass (e.g. a StrEnum member) as a plain str
    return _clean_text(key, limit, "key")


def _coerce(value: object) -> Any:
    """A subclass of a JSON type as its exact base type; anything else is rejected."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # bool cannot be subclassed, so this is an int subclass
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return dict(dict.items(value))
    if isinstance(value, list | tuple):
        return list(value)
    raise _Reject(f"unsupported value of type {_type_name(value)}", _ALLOWED_TYPES_HINT)


def _number_problem(value: float, limit: int) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f" is not finite ({value}); use a finite number"
    return f" is out of range; numbers must be between -{limit} and {limit}"


# --------------------------------------------------------------------------- payload


def sanitize_payload(
    payload: object, limits: PayloadLimits, *, path: str = "$.payload"
) -> dict[str, Any]:
    """A new, normalized copy of ``payload``, or a ``ValidationError`` naming what is wrong.

    The walk is iterative and checks depth before descending, so no input can cause a
    ``RecursionError``. Strings and keys come back NFC-normalized, tuples as lists and
    subclasses of JSON types as the plain types. When the strings and keys together hold
    more than ``limits.max_bytes`` characters, ``PayloadTooLargeError`` is raised.
    """
    if not isinstance(payload, dict):
        raise ValidationError(
            f"payload must be a JSON object, not {_json_kind(payload)}", path=path
        )
    return _walk(payload, limits, path)


_Frame = tuple[Iterator[tuple[Any, Any]], Any, bool]


def _walk(root: dict[Any, Any], limits: PayloadLimits, base: str) -> dict[str, Any]:
    max_depth = limits.max_depth
    max_items = limits.max_keys
    max_string = limits.max_string_length
    max_key = limits.max_key_length
    max_number = limits.max_number
    budget = limits.max_bytes
    if len(root) > max_items:
        raise ValidationError(
            f"object at {base} has {len(root)} keys; the limit is {max_items}", path=base
        )
    result: dict[str, Any] = {}
    # stack[i] = (items of a container, its output, whether it is an object);
    # trail[i] = the key or index in stack[i] that leads to stack[i + 1].
    stack: list[_Frame] = [(iter(dict.items(root)), result, True)]
    trail: list[Any] = []
    key: Any = None
    try:
        while stack:
            items, out, in_object = stack[-1]
            for key, value in items:
                if in_object:
                    if (
                        type(key) is str
                        and len(key) <= max_key
                        and key.isascii()
                        and key.isprintable()
                    ):
                        name = key
                    else:
                        name = _clean_key(key, max_key)
                    if name in out:
                        raise _Reject(
                            "key",
                            " is the same as another key of its object once both are "
                            "Unicode NFC-normalized; use distinct keys",
                        )
                    budget -= len(name)
                kind = type(value)
                if kind not in _JSON_TYPES:
                    value = _coerce(value)
                    kind = type(value)
                if kind is str:
                    if len(value) > max_string or not (value.isascii() and value.isprintable()):
                        value = _clean_text(value, max_string, "string")
                    budget -= len(value)
                elif kind is int:
                    if value > max_number or value < -max_number:
                        raise _Reject("number", _number_problem(value, max_number))
                elif kind is float:
                    if not -max_number <= value <= max_number:  # also catches NaN
                        raise _Reject("number", _number_problem(value, max_number))
                elif kind is dict or kind is list or kind is tuple:
                    is_object = kind is dict
                    noun = "object" if is_object else "array"
                    depth = len(stack) + 1
                    if depth > max_depth:
                        raise _Reject(
                            noun, f" is nested {depth} levels deep; the limit is {max_depth}"
                        )
                    count = len(value)
                    if count > max_items:
                        unit = "keys" if is_object else "items"
                        raise _Reject(noun, f" has {count} {unit}; the limit is {max_items}")
                    child: Any = {} if is_object else []
                    if in_object:
                        out[name] = child
                    else:
                        out.append(child)
                    trail.append(key)
                    entries = iter(dict.items(value)) if is_object else enumerate(value)
                    stack.append((entries, child, is_object))
                    break
                # else: bool or None, kept as is
                if budget < 0:
                    raise PayloadTooLargeError(
                        f"payload at {base} is too large: its strings and keys hold more "
                        f"than {limits.max_bytes} characters; the limit is {limits.max_bytes}",
                        path=base,
                    )
                if in_object:
                    out[name] = value
                else:
                    out.append(value)
            else:
                stack.pop()
                if stack:
                    trail.pop()
    except _Reject as problem:
        where = base + "".join(
            _segment(stack[i][2], step) for i, step in enumerate(trail)
        ) + _segment(stack[-1][2], key)
        raise ValidationError(f"{problem.head} at {where}{problem.tail}", path=where) from None
    if budget < 0:  # the last value was a container holding nothing but its own key
        raise PayloadTooLargeError(
            f"payload at {base} is too large: its strings and keys hold more than "
            f"{limits.max_bytes} characters; the limit is {limits.max_bytes}",
            path=base,
        )
    return result


# --------------------------------------------------------------------------- JSON body


class _NeedsLocating(Exception):
    """Raised by the fast decoder's hooks; the slow decoder then finds where and why."""


class _DuplicateKeys(dict[str, Any]):
    """Marker left by the locating decoder: an object with ``duplicate`` repeated."""

    duplicate: str


class _NonFinite:
    """Marker left by the locating decoder where NaN, Infinity or 1e999 stood."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _strict_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _NeedsLocating
    return obj


def _strict_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _NeedsLocating
    return value


def _reject_constant(literal: str) -> NoReturn:
    raise _NeedsLocating


def _marking_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    marked = _DuplicateKeys(obj)
    for name, _ in pairs:
        if name in seen:
            marked.duplicate = name
            break
        seen.add(name)
    return marked


def _marking_float(literal: str) -> float | _NonFinite:
    value = float(literal)
    return value if math.isfinite(value) else _NonFinite(literal)


# Module-level decoders, as json.loads itself shares one: building a decoder per call
# would cost more than parsing a small body.
_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_strict_pairs, parse_float=_strict_float, parse_constant=_reject_constant
)
_LOCATING_DECODER = json.JSONDecoder(
    object_pairs_hook=_marking_pairs, parse_float=_marking_float, parse_constant=_NonFinite
)


def parse_json_body(body: bytes, limits: PayloadLimits) -> dict[str, Any]:
    """The JSON object in a request body, parsed strictly.

    Raises ``PayloadTooLargeError`` (before parsing) when the body is over
    ``limits.max_bytes``, and ``ValidationError`` when it is not UTF-8, not JSON, not an
    object, repeats a key in an object or holds NaN, Infinity or a number too large for a
    float. Error messages give a line and column or a path, never the body itself.
    """
    size = len(body)
    if size > limits.max_bytes:
        raise PayloadTooLargeError(
            f"request body is {size} bytes; the limit is {limits.max_bytes} bytes"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"request body is not valid JSON: it is not UTF-8 text (invalid byte at offset "
            f"{exc.start})",
            path="$",
        ) from None
    if text.startswith("\ufeff"):  # RFC 8259 lets parsers ignore a byte order mark
        text = text[1:]
    if not text.strip(" \t\r\n"):
        raise ValidationError("request body is empty; send a JSON object", path="$")
    try:
        document = _decode(_STRICT_DECODER, text)
    except _NeedsLocating:
        _raise_located(_decode(_LOCATING_DECODER, text))
    if type(document) is not dict:
        raise ValidationError(
            f"request body must be a JSON object, not {_json_kind(document)}", path="$"
        )
    return document


def _decode(decoder: json.JSONDecoder, text: str) -> Any:
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as exc:
        reason = exc.msg[:1].lower() + exc.msg[1:]
        raise ValidationError(
            f"request body is not valid JSON: {reason} at line {exc.lineno}, "
            f"column {exc.colno}",
            path="$",
        ) from None
    except RecursionError:
        raise ValidationError(
            "request body is not valid JSON: it is nested too deeply", path="$"
        ) from None
    except ValueError:  # an integer literal past Python's digit limit
        raise ValidationError(
            "request body is not valid JSON: a number in it has too many digits", path="$"
        ) from None


def _raise_located(document: Any) -> NoReturn:
    """Find the first marker the locating decoder left and report it with its path."""
    pending: list[tuple[Any, str]] = [(document, "$")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, _NonFinite):
            shown = value.literal if len(value.literal) <= 32 else value.literal[:32] + "..."
            raise ValidationError(
                f"request body is not valid JSON: the number at {where} ({shown}) is not "
                "finite; JSON numbers must be finite",
                path=where,
            )
        if isinstance(value, _DuplicateKeys):
            at = where + _segment(True, value.duplicate)
            raise ValidationError(
                f"request body repeats the key at {at}; each key may appear only once in "
                "an object",
                path=at,
            )
        if isinstance(value, dict):
            children = [(v, where + _segment(True, k)) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(v, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        pending.extend(reversed(children))
    raise ValidationError("request body is not valid JSON", path="$")  # pragma: no cover


# --------------------------------------------------------------------------- fields


def validate_kind(kind: object, known_kinds: Collection[str]) -> str:
    """``kind`` if it is a well-formed name in ``known_kinds``; else a ``ValidationError``."""
    if not isinstance(kind, str):
        raise ValidationError(f"kind must be a string, not {_json_kind(kind)}", path="$.kind")
    if not kind:
        raise ValidationError("kind must not be empty", path="$.kind")
    if len(kind) > 128:
        raise ValidationError(
            f"kind is {len(kind)} characters; the limit is 128", path="$.kind"
        )
    if not _KIND.fullmatch(kind):
        raise ValidationError(
            f"kind {_short_repr(kind)} is not a valid kind name; use letters, digits and "
            "_ . : -, starting with a letter or digit",
            path="$.kind",
        )
    if kind not in known_kinds:
        names = sorted(known_kinds)
        if not names:
            known = "no kinds are registered"
        else:
            known = "known kinds: " + ", ".join(names[:20])
            if len(names) > 20:
                known += f", ... ({len(names) - 20} more)"
        raise ValidationError(f"unknown kind {_short_repr(kind)}; {known}", path="$.kind")
    return kind


def validate_priority(value: object) -> int:
    """``value`` as an ``int`` from -1000 to 1000 (booleans and floats are refused)."""
    if isinstance(value, int) and not isinstance(value, bool) and -1000 <= value <= 1000:
        return int(value)
    raise ValidationError(
        f"priority must be a whole number from -1000 to 1000, not {_describe_number(value)}",
        path="$.priority",
    )


def validate_idempotency_key(value: object) -> str | None:
    """``None``, or a string of 1 to 200 printable characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(
            f"idempotency_key must be a string or null, not {_json_kind(value)}",
            path="$.idempotency_key",
        )
    if not 1 <= len(value) <= 200:
        raise ValidationError(
            f"idempotency_key is {len(value)} characters; it must be 1 to 200",
            path="$.idempotency_key",
        )
    if not value.isprintable():
        position = next(i for i, char in enumerate(value) if not char.isprintable())
        raise ValidationError(
            f"idempotency_key has a control or other non-printable character (U+"
            f"{ord(value[position]):04X}) at position {position}; use printable characters",
            path="$.idempotency_key",
        )
    return str.__str__(value)


def validate_wait(value: object, max_wait: float) -> float | None:
    """``None``, or a number of seconds from 0 to ``max_wait`` as a ``float``."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= max_wait:
        return float(value)
    raise ValidationError(
        f"wait must be a number of seconds from 0 to {max_wait:g}, or null; not "
        f"{_describe_number(value)}",
        path="$.wait",
    )


MAX_DELAY_SECONDS = 366 * 86400.0


def validate_delay(value: object) -> float | None:
    """``None``, or how many seconds (0 to a year) a robot waits before it may run."""
    if value is None:
        return None
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and 0 <= value <= MAX_DELAY_SECONDS):
        return float(value)
    raise ValidationError(
        f"delay must be a number of seconds from 0 to {MAX_DELAY_SECONDS:g}, or null; not "
        f"{_describe_number(value)}",
        path="$.delay",
    )


def validate_run_at(value: object, now: datetime) -> datetime | None:
    """``None``, or when a robot may run: an aware datetime (or ISO 8601 text with an
    offset) at most a year after ``now``, in UTC. A time in the past means now."""
    if value is None:
        return None
    parsed: datetime | None = value if isinstance(value, datetime) else None
    if isinstance(value, str) and len(value) <= 64:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
    if parsed is None:
        raise ValidationError(
            "run_at must be a date and time with its UTC offset (ISO 8601, e.g. "
            f"2030-01-31T09:00:00+01:00), or null; not {_short_repr(value)}", path="$.run_at")
    if parsed.tzinfo is None or parsed.tzinfo.utcoffset(parsed) is None:
        raise ValidationError(
            "run_at has no time zone; give its UTC offset (e.g. 2030-01-31T09:00:00+01:00 "
            "or ...Z), since a naive time means different instants on different servers",
            path="$.run_at")
    parsed = parsed.astimezone(UTC)
    if (parsed - now).total_seconds() > MAX_DELAY_SECONDS:
        raise ValidationError(
            f"run_at is more than {MAX_DELAY_SECONDS:g} seconds (a year) away", path="$.run_at")
    return parsed


def _describe_number(value: object) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _short_repr(value)
    return _json_kind(value)
