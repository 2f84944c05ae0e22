"""What a module hands over as text is stored as every store can hold it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from robotframework_mvp.worker import storable_text


@given(st.text(max_size=50), st.integers(1, 60))
def test_storable_text_keeps_what_stores_hold_and_replaces_the_rest(text: str,
                                                                     limit: int) -> None:
    cleaned = storable_text(text, limit)
    assert len(cleaned) == min(len(text), limit)
    cleaned.encode("utf-8")  # no lone surrogate left
    assert "\x00" not in cleaned
    for before, after in zip(text, cleaned, strict=False):
        assert after == before or (after == "\ufffd" and (
            before == "\x00" or "\ud800" <= before <= "\udfff"))
