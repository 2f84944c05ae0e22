"""``json_loads`` and ``json_bytes``: orjson's speed, never a value read or written
differently from the standard library's ``json``."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from robotframework_mvp.models import json_bytes, json_loads

#: every JSON value the standard library writes, big integers and non-finite floats included
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def canonical(value: Any) -> str:
    """A comparable form: NaN equals NaN, and 1 stays apart from 1.0 and True."""
    return json.dumps(value, sort_keys=True, default=repr) + repr(_types(value))


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


@given(values)
def test_json_loads_reads_what_json_writes_exactly_as_json_reads_it(value: Any) -> None:
    text = json.dumps(value)
    expected = canonical(json.loads(text))
    assert canonical(json_loads(text)) == expected
    assert canonical(json_loads(text.encode())) == expected


@given(values.filter(lambda v: "NaN" not in json.dumps(v) and "Infinity" not in json.dumps(v)))
def test_what_json_bytes_writes_json_loads_reads_back_as_it_was(value: Any) -> None:
    assert canonical(json_loads(json_bytes(value))) == canonical(value)


def test_an_integer_beyond_64_bits_stays_an_exact_integer() -> None:
    # orjson alone reads it as a float (2**70 would come back as 1.1805916207174113e+21).
    for number in (2**63, 2**64, 2**70, -(2**65), 10**30):
        for text in (f'{{"n": {number}}}', f'{{"n": {number}}}'.encode()):
            read = json_loads(text)["n"]
            assert type(read) is int
            assert read == number


def test_what_orjson_refuses_is_read_as_json_reads_it() -> None:
    assert math.isnan(json_loads('{"x": NaN}')["x"])
    assert json_loads('"\\ud800"') == "\ud800"  # a lone surrogate escape
