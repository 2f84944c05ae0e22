"""RFMVP_EVENT_LOOP: which event loop the rfmvp commands (rfmvp worker) run on."""

from __future__ import annotations

import sys
from importlib.util import find_spec

import pytest

from robotframework_mvp import ConfigError, Settings
from robotframework_mvp.cli import backend_options


def _settings(choice: str | None) -> Settings:
    environ = {} if choice is None else {"RFMVP_EVENT_LOOP": choice}
    return Settings.from_env(env_file=None, environ=environ)


def test_auto_is_the_default_and_takes_uvloop_when_it_is_installed() -> None:
    assert _settings(None).worker.event_loop == "auto"
    installed = find_spec("uvloop") is not None
    assert backend_options(_settings(None)) == {"use_uvloop": installed}


def test_asyncio_never_takes_uvloop() -> None:
    assert backend_options(_settings("asyncio")) == {"use_uvloop": False}


def test_without_uvloop_auto_falls_back_and_an_explicit_uvloop_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    assert backend_options(_settings("auto")) == {"use_uvloop": False}
    with pytest.raises(ConfigError, match="pip install uvloop"):
        backend_options(_settings("uvloop"))


def test_an_unknown_loop_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"RFMVP_EVENT_LOOP.*auto, asyncio or uvloop"):
        _settings("trio")
