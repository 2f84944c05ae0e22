"""Specification of input sanitization: request bodies, payloads and submission fields."""

from __future__ import annotations

import enum
import json
import math
import unicodedata
from collections import OrderedDict
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from robotframework_mvp.config import SecurityConfig
from robotframework_mvp.errors import PayloadTooLargeError, ValidationError
from robotframework_mvp.security.sanitize import (
    PayloadLimits,
    parse_json_body,
    sanitize_payload,
    validate_idempotency_key,
    validate_kind,
    validate_priority,
    validate_wait,
)

LIMITS = PayloadLimits()
JSON_TYPES = (dict, list, str, int, float, bool, type(None))


# --- helpers -------------------------------------------------------------------------------


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def nfc_deep(value: Any) -> Any:
    """What sanitization should return for an acceptable value: NFC strings, lists."""
    if isinstance(value, str):
        return nfc(value)
    if isinstance(value, dict):
        return {nfc(k): nfc_deep(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nfc_deep(v) for v in value]
    return value


def depth_of(value: Any) -> int:
    """Container nesting depth: a flat object is 1."""
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list | tuple):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def segment(in_object: bool, key: Any) -> str:
    """The documented path step: .name for identifiers, ["..."] otherwise, [i] in arrays."""
    if not in_object:
        return f"[{key}]"
    if key and (key[0].isascii() and (key[0].isalpha() or key[0] == "_")) and all(
        c.isascii() and (c.isalnum() or c == "_") for c in key
    ):
        return f".{key}"
    return f"[{json.dumps(key)}]"


def nested_lists(depth: int) -> list[Any]:
    """``depth`` nested lists, built without recursion."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def nested_objects(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def assert_only_json_types(value: Any) -> None:
    pending = [value]
    while pending:
        item = pending.pop()
        assert type(item) in JSON_TYPES, type(item)
        if type(item) is dict:
            assert all(type(k) is str for k in item)
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)


# --- strategies ----------------------------------------------------------------------------

# Text that sanitization accepts: no controls but tab/newline/CR, no lone surrogates.
safe_chars = st.characters(exclude_categories=("Cc", "Cs")) | st.sampled_from("\t\n\r")
# Sequences whose NFC form differs, so normalization is actually exercised.
decomposed = st.sampled_from(["e\u0301", "A\u030a", "\u1100\u1161", "o\u0308\u0304", "\u212b"])
safe_text = st.one_of(
    st.text(safe_chars, max_size=12),
    st.lists(st.text(safe_chars, max_size=3) | decomposed, max_size=4).map("".join),
)
keys = st.text(safe_chars, max_size=10) | decomposed | st.sampled_from(["a", "name", "we ird"])
numbers = st.integers(-(2**53), 2**53) | st.floats(-(2.0**53), 2.0**53, allow_nan=False)
scalars = st.none() | st.booleans() | numbers | safe_text


def objects(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts whose keys stay distinct after NFC normalization."""
    return st.lists(
        st.tuples(keys, values), max_size=5, unique_by=lambda kv: nfc(kv[0])
    ).map(dict)


json_values = st.recursive(
    scalars, lambda children: st.lists(children, max_size=5) | objects(children), max_leaves=25
)
payloads = objects(json_values).filter(lambda p: depth_of(p) <= LIMITS.max_depth)


class Colour(enum.IntEnum):
    RED = 1


class Name(enum.StrEnum):
    ADA = "Ada"


# Python-side payloads may hold tuples and subclasses of the JSON types.
python_scalars = scalars | st.just(Colour.RED) | st.just(Name.ADA)
python_values = st.recursive(
    python_scalars,
    lambda children: (
        st.tuples(st.booleans(), st.lists(children, max_size=4)).map(
            lambda pair: tuple(pair[1]) if pair[0] else pair[1]
        )
        | st.tuples(st.booleans(), objects(children)).map(
            lambda pair: OrderedDict(pair[1]) if pair[0] else pair[1]
        )
    ),
    max_leaves=20,
)


# --- PayloadLimits -------------------------------------------------------------------------


def test_payload_limits_default_to_the_documented_values() -> None:
    documented = PayloadLimits(
        max_bytes=65536,
        max_depth=32,
        max_keys=1000,
        max_string_length=16384,
        max_number=2**53,
        max_key_length=256,
    )
    assert PayloadLimits() == documented


def test_payload_limits_from_config_take_the_security_settings() -> None:
    config = SecurityConfig(
        max_payload_bytes=1000, max_depth=5, max_keys=7, max_string_length=99
    )
    limits = PayloadLimits.from_config(config)
    assert (limits.max_bytes, limits.max_depth, limits.max_keys, limits.max_string_length) == (
        1000, 5, 7, 99,
    )
    assert limits.max_number == 2**53


def test_payload_limits_refuse_a_limit_of_zero() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        PayloadLimits(max_depth=0)


# --- parse_json_body -----------------------------------------------------------------------


def test_a_json_object_body_is_parsed() -> None:
    body = b'{"kind": "order.process", "payload": {"id": 1, "tags": ["a"]}}'
    assert parse_json_body(body, LIMITS) == {
        "kind": "order.process", "payload": {"id": 1, "tags": ["a"]},
    }


def test_a_body_over_the_limit_is_413_before_parsing_and_says_both_sizes() -> None:
    with pytest.raises(PayloadTooLargeError) as caught:
        parse_json_body(b"\xff" * 101, PayloadLimits(max_bytes=100))
    assert caught.value.status == 413
    assert "101 bytes" in caught.value.message
    assert "100 bytes" in caught.value.message


def test_a_body_exactly_at_the_limit_is_accepted() -> None:
    body = b'{"a": "' + b"x" * 91 + b'"}'
    assert len(body) == 100
    assert parse_json_body(body, PayloadLimits(max_bytes=100)) == {"a": "x" * 91}


def test_a_body_that_is_not_utf8_is_rejected_as_invalid_json() -> None:
    with pytest.raises(ValidationError, match="request body is not valid JSON") as caught:
        parse_json_body(b'{"a": "\xc3\x28"}', LIMITS)
    assert caught.value.status == 422
    assert caught.value.path == "$"


def test_invalid_json_is_rejected_with_line_and_column() -> None:
    with pytest.raises(ValidationError, match="request body is not valid JSON") as caught:
        parse_json_body(b'{\n  "a": 1,\n  "b": }', LIMITS)
    assert "line 3" in caught.value.message
    assert "column" in caught.value.message


def test_invalid_json_errors_never_echo_the_body() -> None:
    secret = "hunter2-" * 50
    body = ('{"password": "' + secret + '", oops}').encode()
    with pytest.raises(ValidationError) as caught:
        parse_json_body(body, LIMITS)
    assert "hunter2" not in caught.value.message
    assert len(caught.value.message) < 200


@pytest.mark.parametrize("body", [b"[]", b'"text"', b"1", b"null", b"true"])
def test_a_body_whose_top_level_is_not_an_object_is_rejected(body: bytes) -> None:
    with pytest.raises(ValidationError, match="request body must be a JSON object"):
        parse_json_body(body, LIMITS)


@pytest.mark.parametrize("body", [b"", b"  \n"])
def test_an_empty_body_is_rejected(body: bytes) -> None:
    with pytest.raises(ValidationError, match="empty"):
        parse_json_body(body, LIMITS)


def test_a_duplicate_key_is_rejected_with_its_path() -> None:
    body = b'{"payload": {"items": [{"name": 1, "name": 2}]}}'
    with pytest.raises(ValidationError, match="repeats the key") as caught:
        parse_json_body(body, LIMITS)
    assert caught.value.path == "$.payload.items[0].name"


def test_a_duplicate_top_level_key_is_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_json_body(b'{"kind": "a", "kind": "b"}', LIMITS)
    assert caught.value.path == "$.kind"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_in_a_body_are_rejected_with_their_path(literal: str) -> None:
    body = ('{"payload": {"x": [1, ' + literal + "]}}").encode()
    with pytest.raises(ValidationError, match="not finite") as caught:
        parse_json_body(body, LIMITS)
    assert caught.value.path == "$.payload.x[1]"


def test_a_problem_found_late_is_still_reported_when_the_body_is_also_malformed() -> None:
    with pytest.raises(ValidationError, match="not valid JSON"):
        parse_json_body(b'{"a": NaN, "b": ', LIMITS)


def test_hostile_nesting_in_a_body_is_a_validation_error_not_a_recursion_error() -> None:
    with pytest.raises(ValidationError, match="nested too deeply"):
        parse_json_body(b"[" * 60000, LIMITS)
    with pytest.raises(ValidationError, match="nested too deeply"):
        parse_json_body(b'{"a":' * 50000, PayloadLimits(max_bytes=10**6))


def test_an_integer_with_too_many_digits_is_rejected() -> None:
    with pytest.raises(ValidationError, match="too many digits"):
        parse_json_body(b'{"a": ' + b"9" * 5000 + b"}", LIMITS)


def test_a_leading_byte_order_mark_is_ignored() -> None:
    assert parse_json_body(b'\xef\xbb\xbf{"a": 1}', LIMITS) == {"a": 1}


def test_escaped_nul_parses_and_is_then_refused_by_sanitize_payload() -> None:
    body = parse_json_body(b'{"payload": {"a": "x\\u0000"}}', LIMITS)
    with pytest.raises(ValidationError) as caught:
        sanitize_payload(body["payload"], LIMITS)
    assert caught.value.path == "$.payload.a"


# --- sanitize_payload: examples ------------------------------------------------------------


@pytest.mark.parametrize("payload", [[], "x", 1, None, True, {1, 2}])
def test_a_payload_must_be_an_object(payload: object) -> None:
    with pytest.raises(ValidationError, match="payload must be a JSON object") as caught:
        sanitize_payload(payload, LIMITS)
    assert caught.value.path == "$.payload"


def test_sanitize_returns_a_new_structure_that_shares_no_containers() -> None:
    payload = {"a": {"b": [1, 2]}}
    result = sanitize_payload(payload, LIMITS)
    assert result == payload
    assert result is not payload
    assert result["a"] is not payload["a"]
    assert result["a"]["b"] is not payload["a"]["b"]


def test_tuples_become_lists() -> None:
    assert sanitize_payload({"a": (1, (2, "x"))}, LIMITS) == {"a": [1, [2, "x"]]}


def test_strings_and_keys_are_nfc_normalized() -> None:
    result = sanitize_payload({"caf\u0065\u0301": ["\u0041\u030a"]}, LIMITS)
    assert result == {"caf\u00e9": ["\u00c5"]}


def test_tab_newline_and_carriage_return_are_allowed() -> None:
    assert sanitize_payload({"a\tb": "x\ny\r\n"}, LIMITS) == {"a\tb": "x\ny\r\n"}


def test_a_nul_character_is_rejected_with_its_path() -> None:
    with pytest.raises(ValidationError, match="NUL") as caught:
        sanitize_payload({"items": [{}, {}, {}, {"name": "bad\x00name"}]}, LIMITS)
    assert caught.value.path == "$.payload.items[3].name"
    assert caught.value.message.startswith("string at $.payload.items[3].name")
    assert caught.value.status == 422


@pytest.mark.parametrize("char", ["\x01", "\x08", "\x0b", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"])
def test_other_control_characters_are_rejected(char: str) -> None:
    with pytest.raises(ValidationError, match=f"U\\+{ord(char):04X}") as caught:
        sanitize_payload({"a": ["ok", "x" + char]}, LIMITS)
    assert caught.value.path == "$.payload.a[1]"


def test_a_lone_surrogate_is_rejected() -> None:
    with pytest.raises(ValidationError, match="lone surrogate") as caught:
        sanitize_payload({"a": "x\ud800"}, LIMITS)
    assert caught.value.path == "$.payload.a"


def test_control_characters_in_keys_are_rejected_and_escaped_in_the_path() -> None:
    with pytest.raises(ValidationError, match="key at") as caught:
        sanitize_payload({"a": {"x\x00y": 1}}, LIMITS)
    assert caught.value.path == '$.payload.a["x\\u0000y"]'
    assert "\x00" not in caught.value.message


def test_keys_with_odd_characters_are_quoted_in_paths() -> None:
    with pytest.raises(ValidationError) as caught:
        sanitize_payload({"we ird": {"ok_1": "\x00"}}, LIMITS)
    assert caught.value.path == '$.payload["we ird"].ok_1'


def test_a_custom_base_path_is_used_in_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        sanitize_payload({"a": "\x00"}, LIMITS, path="$.result")
    assert caught.value.path == "$.result.a"


def test_non_string_keys_are_rejected() -> None:
    with pytest.raises(ValidationError, match="keys must be strings") as caught:
        sanitize_payload({"a": {1: "x"}}, LIMITS)
    assert caught.value.path == "$.payload.a[1]"


def test_keys_longer_than_the_limit_are_rejected_and_cut_short_in_the_path() -> None:
    sanitize_payload({"k" * 256: 1}, LIMITS)
    with pytest.raises(ValidationError, match="257 characters; the limit is 256") as caught:
        sanitize_payload({"k" * 257: 1}, LIMITS)
    assert caught.value.path is not None
    assert len(caught.value.path) < 100


def test_strings_longer_than_the_limit_are_rejected_with_a_message_saying_what_to_fix() -> None:
    with pytest.raises(ValidationError) as caught:
        sanitize_payload({"a": "x" * 20000}, LIMITS)
    assert caught.value.message == "string at $.payload.a is 20000 characters; the limit is 16384"


def test_a_string_exactly_at_the_limit_is_accepted() -> None:
    limits = PayloadLimits(max_string_length=5)
    assert sanitize_payload({"a": "é" * 5}, limits) == {"a": "é" * 5}


def test_keys_that_collide_once_normalized_are_rejected() -> None:
    with pytest.raises(ValidationError, match="NFC"):
        sanitize_payload({"e\u0301": 1, "\u00e9": 2}, LIMITS)


def test_objects_with_too_many_keys_are_rejected() -> None:
    limits = PayloadLimits(max_keys=3)
    sanitize_payload({"a": 1, "b": 2, "c": 3}, limits)
    with pytest.raises(ValidationError, match="4 keys; the limit is 3") as caught:
        sanitize_payload({"x": {"a": 1, "b": 2, "c": 3, "d": 4}}, limits)
    assert caught.value.path == "$.payload.x"
    with pytest.raises(ValidationError, match="4 keys; the limit is 3") as caught:
        sanitize_payload({"a": 1, "b": 2, "c": 3, "d": 4}, limits)
    assert caught.value.path == "$.payload"


def test_arrays_with_too_many_items_are_rejected() -> None:
    with pytest.raises(ValidationError, match="4 items; the limit is 3") as caught:
        sanitize_payload({"x": [[1, 2, 3, 4]]}, PayloadLimits(max_keys=3))
    assert caught.value.path == "$.payload.x[0]"


@pytest.mark.parametrize("number", [2**53, -(2**53), 2.0**53, 0, -0.0, 1.5])
def test_numbers_up_to_max_number_are_accepted(number: float) -> None:
    assert sanitize_payload({"n": number}, LIMITS) == {"n": number}


@pytest.mark.parametrize("number", [2**53 + 1, -(2**53) - 1, 1e16, -1e300, 10**400])
def test_numbers_beyond_max_number_are_rejected(number: float) -> None:
    with pytest.raises(ValidationError, match="out of range") as caught:
        sanitize_payload({"n": [number]}, LIMITS)
    assert caught.value.path == "$.payload.n[0]"


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_rejected(number: float) -> None:
    with pytest.raises(ValidationError, match="not finite"):
        sanitize_payload({"n": number}, LIMITS)


def test_booleans_stay_booleans() -> None:
    result = sanitize_payload({"t": True, "f": False}, LIMITS)
    assert type(result["t"]) is bool
    assert type(result["f"]) is bool


@pytest.mark.parametrize(
    ("value", "name"),
    [({1}, "set"), (b"x", "bytes"), (Decimal(1), "Decimal"), (datetime(2024, 1, 1), "datetime"),
     (object(), "object")],
)
def test_values_of_other_types_are_rejected(value: object, name: str) -> None:
    with pytest.raises(ValidationError, match=f"unsupported value of type {name}") as caught:
        sanitize_payload({"a": {"b": value}}, LIMITS)
    assert caught.value.path == "$.payload.a.b"


def test_subclasses_of_json_types_come_back_as_the_plain_types() -> None:
    result = sanitize_payload(OrderedDict(c=Colour.RED, n=Name.ADA, d=OrderedDict(x=1)), LIMITS)
    assert result == {"c": 1, "n": "Ada", "d": {"x": 1}}
    assert type(result["c"]) is int
    assert type(result["n"]) is str
    assert type(result["d"]) is dict


def test_the_total_size_of_strings_and_keys_is_bounded() -> None:
    limits = PayloadLimits(max_bytes=100)
    sanitize_payload({"a": "x" * 49, "b": "y" * 49}, limits)
    with pytest.raises(PayloadTooLargeError) as caught:
        sanitize_payload({"a": "x" * 49, "b": "y" * 50}, limits)
    assert caught.value.status == 413
    assert "the limit is 100" in caught.value.message


def test_the_total_size_counts_keys_of_empty_containers_too() -> None:
    with pytest.raises(PayloadTooLargeError):
        sanitize_payload({"k" * 60: {}, "j" * 60: []}, PayloadLimits(max_bytes=100))


def test_a_payload_exactly_max_depth_deep_is_accepted_and_one_deeper_is_rejected() -> None:
    limits = PayloadLimits(max_depth=5)
    assert sanitize_payload(nested_objects(5), limits) == nested_objects(5)
    with pytest.raises(ValidationError, match="nested 6 levels deep; the limit is 5") as caught:
        sanitize_payload(nested_objects(6), limits)
    assert caught.value.path == "$.payload.a.a.a.a.a"


# --- sanitize_payload: properties ----------------------------------------------------------


@settings(max_examples=200)
@given(payloads)
def test_any_json_value_within_limits_round_trips_as_its_nfc_form(payload: dict[str, Any]) -> None:
    assert sanitize_payload(payload, LIMITS) == nfc_deep(payload)


@settings(max_examples=200)
@given(payloads)
def test_sanitization_is_idempotent(payload: dict[str, Any]) -> None:
    once = sanitize_payload(payload, LIMITS)
    assert sanitize_payload(once, LIMITS) == once


@st.composite
def payloads_with_one_nul(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid payload with one NUL put into a key or a string somewhere, and its path."""
    payload = draw(payloads)
    containers: list[tuple[Any, str]] = []
    pending: list[tuple[Any, str]] = [(payload, "$.payload")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, dict):
            containers.append((value, where))
            pending.extend((v, where + segment(True, k)) for k, v in value.items())
        elif isinstance(value, list):
            containers.append((value, where))
            pending.extend((v, where + segment(False, i)) for i, v in enumerate(value))
    target, where = draw(st.sampled_from(containers))
    text = draw(st.text(safe_chars, max_size=8))
    position = draw(st.integers(0, len(text)))
    poisoned = text[:position] + "\x00" + text[position:]
    if isinstance(target, list):
        index = draw(st.integers(0, len(target)))
        target.insert(index, poisoned)
        return payload, where + segment(False, index)
    if draw(st.booleans()):
        target[poisoned] = draw(scalars)
        return payload, where + segment(True, poisoned)
    name = draw(keys)
    assume(all(nfc(k) != nfc(name) for k in target))
    target[name] = poisoned
    return payload, where + segment(True, name)


@settings(max_examples=200, suppress_health_check=[HealthCheck.filter_too_much])
@given(payloads_with_one_nul())
def test_a_nul_anywhere_is_rejected_with_a_path_pointing_at_it(
    case: tuple[dict[str, Any], str],
) -> None:
    payload, where = case
    with pytest.raises(ValidationError, match="NUL") as caught:
        sanitize_payload(payload, LIMITS)
    assert caught.value.path == where


@pytest.mark.parametrize("build", [nested_lists, nested_objects])
def test_nesting_far_deeper_than_max_depth_is_rejected_without_recursion_error(
    build: Any,
) -> None:
    payload = {"deep": build(100_000)}
    with pytest.raises(ValidationError, match="nested 33 levels deep; the limit is 32") as caught:
        sanitize_payload(payload, LIMITS)
    assert caught.value.path is not None
    assert caught.value.path.startswith("$.payload.deep")


@settings(max_examples=150)
@given(python_values.filter(lambda v: depth_of(v) < LIMITS.max_depth))
def test_the_output_contains_only_json_types(value: Any) -> None:
    result = sanitize_payload({"v": value}, LIMITS)
    assert_only_json_types(result)
    assert json.loads(json.dumps(result, allow_nan=False)) == result


# --- parse_json_body: properties -----------------------------------------------------------

json_tokens = st.sampled_from([
    "{", "}", "[", "]", ":", ",", '"a"', '"b"', '"\\u0000"', '"\\ud800"', "1", "-0.5", "1e999",
    "NaN", "Infinity", "true", "null", " ", "\n", '"', "\\", "9" * 20,
])
json_like = st.lists(json_tokens, max_size=40).map("".join)


@settings(max_examples=300)
@given(st.binary(max_size=300) | json_like.map(str.encode))
def test_parse_json_body_raises_only_its_own_errors_on_arbitrary_bytes(body: bytes) -> None:
    try:
        result = parse_json_body(body, LIMITS)
    except (ValidationError, PayloadTooLargeError):
        return
    assert type(result) is dict


@settings(max_examples=300)
@given(st.text(max_size=300) | json_like)
def test_parse_json_body_raises_only_its_own_errors_on_arbitrary_text(text: str) -> None:
    try:
        result = parse_json_body(text.encode("utf-8", "surrogatepass"), LIMITS)
    except (ValidationError, PayloadTooLargeError):
        return
    assert type(result) is dict


@settings(max_examples=100)
@given(st.binary(min_size=65, max_size=400) | payloads.map(lambda p: json.dumps(p).encode()))
def test_a_body_over_max_bytes_is_413_whatever_it_holds(body: bytes) -> None:
    limits = PayloadLimits(max_bytes=64)
    assume(len(body) > 64)
    with pytest.raises(PayloadTooLargeError) as caught:
        parse_json_body(body, limits)
    assert caught.value.status == 413


@settings(max_examples=100)
@given(payloads)
def test_a_serialized_payload_parses_back_to_itself(payload: dict[str, Any]) -> None:
    body = json.dumps({"payload": payload}).encode()
    assume(len(body) <= LIMITS.max_bytes)
    assert parse_json_body(body, LIMITS) == {"payload": payload}


# --- validate_kind -------------------------------------------------------------------------

KINDS = ["order.process", "report:daily", "sync-users", "a_b"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_known_well_formed_kind_is_returned(kind: str) -> None:
    assert validate_kind(kind, KINDS) == kind


@pytest.mark.parametrize("kind", [None, 1, ["a"], b"a"])
def test_a_kind_must_be_a_string(kind: object) -> None:
    with pytest.raises(ValidationError, match="kind must be a string") as caught:
        validate_kind(kind, KINDS)
    assert caught.value.path == "$.kind"


def test_an_empty_kind_is_rejected() -> None:
    with pytest.raises(ValidationError, match="must not be empty"):
        validate_kind("", KINDS)


def test_a_kind_over_128_characters_is_rejected() -> None:
    with pytest.raises(ValidationError, match="129 characters; the limit is 128"):
        validate_kind("k" * 129, ["k" * 129])


@pytest.mark.parametrize("kind", ["bad kind", "-x", ".x", "a/b", "ä", "x\n", "x\x00"])
def test_a_malformed_kind_is_rejected_and_shown_escaped(kind: str) -> None:
    with pytest.raises(ValidationError, match="not a valid kind name") as caught:
        validate_kind(kind, [kind])
    assert repr(kind) in caught.value.message
    assert "\x00" not in caught.value.message
    assert "\n" not in caught.value.message


def test_an_unknown_kind_lists_the_known_kinds_sorted() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_kind("x", ["c", "a", "b"])
    assert caught.value.message == "unknown kind 'x'; known kinds: a, b, c"
    assert caught.value.path == "$.kind"


def test_an_unknown_kind_lists_at_most_20_known_kinds_and_truncates_the_echo() -> None:
    known = [f"kind{i:02}" for i in range(30)]
    with pytest.raises(ValidationError) as caught:
        validate_kind("x" * 128, known)
    message = caught.value.message
    assert "kind19" in message
    assert "kind20" not in message
    assert "10 more" in message
    assert "x" * 65 not in message
    assert repr("x" * 64) in message


def test_an_unknown_kind_with_nothing_registered_says_so() -> None:
    with pytest.raises(ValidationError, match="no kinds are registered"):
        validate_kind("x", [])


# --- validate_priority, validate_idempotency_key, validate_wait ----------------------------


@pytest.mark.parametrize("value", [-1000, 0, 5, 1000])
def test_a_priority_from_minus_1000_to_1000_is_accepted(value: int) -> None:
    assert validate_priority(value) == value


@pytest.mark.parametrize(
    "value", [1001, -1001, pytest.param(10**5000, id="huge"), True, False, 1.0, "1", None]
)
def test_any_other_priority_is_rejected(value: object) -> None:
    with pytest.raises(ValidationError, match="priority must be a whole number") as caught:
        validate_priority(value)
    assert caught.value.path == "$.priority"


@pytest.mark.parametrize("value", [None, "a", "order-42/retry 1", "ключ", "k" * 200])
def test_a_printable_idempotency_key_of_1_to_200_characters_or_none_is_accepted(
    value: str | None,
) -> None:
    assert validate_idempotency_key(value) == value


@pytest.mark.parametrize("value", ["", "k" * 201, "a\x00b", "a\nb", "a\x7f", "\ud800", 5, ["k"]])
def test_any_other_idempotency_key_is_rejected(value: object) -> None:
    with pytest.raises(ValidationError, match="idempotency_key") as caught:
        validate_idempotency_key(value)
    assert caught.value.path == "$.idempotency_key"


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, 0.0), (0.5, 0.5), (60, 60.0)])
def test_a_wait_from_0_to_max_wait_or_none_is_accepted(
    value: float | None, expected: float | None
) -> None:
    result = validate_wait(value, 60.0)
    assert result == expected
    assert result is None or type(result) is float


@pytest.mark.parametrize("value", [-1, -0.001, 60.5, True, "1", math.nan, math.inf, [1]])
def test_any_other_wait_is_rejected(value: object) -> None:
    with pytest.raises(ValidationError, match="wait must be a number of seconds") as caught:
        validate_wait(value, 60.0)
    assert caught.value.path == "$.wait"
