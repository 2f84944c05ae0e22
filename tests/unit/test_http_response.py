"""HttpResponse bodies: the JSON a client parses back, whatever the body holds."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from robotframework_mvp.http import HttpResponse

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(_json)
def test_a_json_body_parses_back_to_what_was_given(body: Any) -> None:
    # st.text() includes lone surrogates, as an error message may echo from hostile input
    data = HttpResponse(200, body).body_bytes()
    assert json.loads(data) == body


def test_integer_keys_are_written_as_strings() -> None:
    assert json.loads(HttpResponse(200, {1: "a"}).body_bytes()) == {"1": "a"}
