"""Specification of Settings: defaults, RFMVP_* variables, .env files and _FILE secrets."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from robotframework_mvp import ConfigError, RateLimit, Settings, StaticKey, WorkerConfig
from robotframework_mvp.config import settings_reference

SECRET = "s3cr3t-Key-Never-Shown-42"


def _from(environ: dict[str, str], **kwargs: Any) -> Settings:
    return Settings.from_env(environ=environ, env_file=kwargs.pop("env_file", None), **kwargs)


def _field(settings: Settings, variable: str) -> Any:
    """The parsed value behind one documented variable."""
    for section in attrs.fields(Settings):
        if section.metadata.get("env") == variable:
            return getattr(settings, section.name)
        if "env" in section.metadata:
            continue
        sub = getattr(settings, section.name)
        for field in attrs.fields(type(sub)):
            if field.metadata.get("env") == variable:
                return getattr(sub, field.name)
    raise AssertionError(f"{variable} is not a setting")


# A valid value for every documented variable, and what it parses to.
VALID: dict[str, tuple[str, Any]] = {
    "RFMVP_STORAGE_URL": ("postgresql://app@db:5432/robots", "postgresql://app@db:5432/robots"),
    "RFMVP_STORAGE_READ_URL": ("postgresql://app@replica/robots",
                               "postgresql://app@replica/robots"),
    "RFMVP_STORAGE_POOL_MIN_SIZE": ("2", 2),
    "RFMVP_STORAGE_POOL_MAX_SIZE": ("20", 20),
    "RFMVP_STORAGE_READ_POOL_MAX_SIZE": ("15", 15),
    "RFMVP_STORAGE_TIMEOUT": ("2.5", 2.5),
    "RFMVP_STORAGE_MIGRATE_ON_STARTUP": ("false", False),
    "RFMVP_STORAGE_BREAKER_OPEN_SECONDS": ("0.5", 0.5),
    "RFMVP_STORAGE_REPLICA_RETRY_SECONDS": ("10", 10.0),
    "RFMVP_CACHE_URL": ("redis://cache:6379/1", "redis://cache:6379/1"),
    "RFMVP_CACHE_MAX_ENTRIES": ("500", 500),
    "RFMVP_CACHE_KEY_PREFIX": ("app1:", "app1:"),
    "RFMVP_CACHE_TTL_ROBOT_STATUS": ("12", 12.0),
    "RFMVP_CACHE_TTL_ROBOT_FINISHED": ("2", 2.0),
    "RFMVP_CACHE_TTL_MODULE_CHOICE": ("0.5", 0.5),
    "RFMVP_CACHE_TTL_STATS": ("3", 3.0),
    "RFMVP_API_KEYS": (f"alice:{SECRET}, bob:another-key-123",
                       (StaticKey("alice", SECRET), StaticKey("bob", "another-key-123"))),
    "RFMVP_ADMIN_PRINCIPALS": ("root, ops", ("root", "ops")),
    "RFMVP_SECRET_KEY": ("pepper-pepper-pepper", "pepper-pepper-pepper"),
    "RFMVP_RATE_LIMIT": ("100/minute", RateLimit(100, 60.0)),
    "RFMVP_RATE_LIMIT_FALLBACK": (" Closed ", "closed"),
    "RFMVP_AUDIT_RETENTION_DAYS": ("90", 90.0),
    "RFMVP_API_KEY_TOUCH_INTERVAL": ("5", 5.0),
    "RFMVP_AUTH_FAILURE_LIMIT": ("5/hour", RateLimit(5, 3600.0)),
    "RFMVP_MAX_PAYLOAD_BYTES": ("1024", 1024),
    "RFMVP_MAX_DEPTH": ("8", 8),
    "RFMVP_MAX_KEYS": ("50", 50),
    "RFMVP_MAX_STRING_LENGTH": ("100", 100),
    "RFMVP_MAX_WAIT_SECONDS": ("30", 30.0),
    "RFMVP_AUDIT_FLUSH_INTERVAL": ("0.2", 0.2),
    "RFMVP_WORKER_ENABLED": ("no", False),
    "RFMVP_WORKER_CONCURRENCY": ("32", 32),
    "RFMVP_LEASE_SECONDS": ("60", 60.0),
    "RFMVP_POLL_INTERVAL": ("0.25", 0.25),
    "RFMVP_SHUTDOWN_GRACE_SECONDS": ("4", 4.0),
    "RFMVP_RETRY_BASE_SECONDS": ("0.5", 0.5),
    "RFMVP_RETRY_CAP_SECONDS": ("120", 120.0),
    "RFMVP_DEFAULT_MAX_ATTEMPTS": ("5", 5),
    "RFMVP_DEFAULT_TIMEOUT": ("90", 90.0),
    "RFMVP_RETRY_OTHER_MODULE_AFTER": ("3", 3),
    "RFMVP_NO_MODULE_DEADLINE_SECONDS": ("60", 60.0),
    "RFMVP_BREAKER_FAILURE_RATE": ("0.25", 0.25),
    "RFMVP_BREAKER_WINDOW": ("40", 40),
    "RFMVP_BREAKER_MINIMUM_CALLS": ("5", 5),
    "RFMVP_BREAKER_OPEN_SECONDS": ("12.5", 12.5),
    "RFMVP_BREAKER_HALF_OPEN_CALLS": ("2", 2),
    "RFMVP_BREAKER_SLOW_CALL_SECONDS": ("4.5", 4.5),
    "RFMVP_PERF_WINDOW_SIZE": ("1000", 1000),
    "RFMVP_BALANCER_MIN_SHARE": ("0.1", 0.1),
    "RFMVP_ALERT_LATENCY_FACTOR": ("4", 4.0),
    "RFMVP_ALERT_MIN_LATENCY_MS": ("2.5", 2.5),
    "RFMVP_ALERT_ERROR_RATE": ("0.25", 0.25),
    "RFMVP_ALERT_MIN_SAMPLES": ("20", 20),
    "RFMVP_ALERT_INTERVAL": ("10", 10.0),
    "RFMVP_LOOP_LAG_INTERVAL": ("0.25", 0.25),
    "RFMVP_LEADER_BACKEND": ("Redis", "redis"),
    "RFMVP_LEADER_INTERVAL": ("2", 2.0),
    "RFMVP_DASHBOARD_PUBLIC": ("yes", True),
    "RFMVP_HEALTH_INTERVAL": ("60", 60.0),
    "RFMVP_HEALTH_CHECK_TIMEOUT": ("2.5", 2.5),
    "RFMVP_SCORES_INTERVAL": ("120", 120.0),
    "RFMVP_CLEANUP_INTERVAL": ("3600", 3600.0),
    "RFMVP_REAPER_INTERVAL": ("2", 2.0),
    "RFMVP_RETENTION_DAYS": ("7", 7.0),
    "RFMVP_SCHEDULER_ENABLED": ("false", False),
    "RFMVP_SCHEDULER_INTERVAL": ("0.5", 0.5),
    "RFMVP_MISFIRE_GRACE_SECONDS": ("2.5", 2.5),
    "RFMVP_PLUGINS": ("acme.robots, acme.more_robots", ("acme.robots", "acme.more_robots")),
}

# Values each variable refuses (variables that accept any text have none).
INVALID: dict[str, list[str]] = {
    "RFMVP_STORAGE_URL": ["robots.db", ""],
    "RFMVP_CACHE_URL": ["localhost:6379"],
    "RFMVP_API_KEYS": [f"alice{SECRET}", "alice:short", f":{SECRET}", f"alice:{SECRET},bob"],
    "RFMVP_RATE_LIMIT": ["100", "100/fortnight", "-5/minute", "lots", "0/minute"],
    "RFMVP_AUTH_FAILURE_LIMIT": ["5 per hour"],
    "RFMVP_RATE_LIMIT_FALLBACK": ["fail", "", "shared"],
    "RFMVP_STORAGE_MIGRATE_ON_STARTUP": ["maybe", ""],
    "RFMVP_WORKER_ENABLED": ["2"],
    "RFMVP_SCHEDULER_ENABLED": ["sometimes"],
    "RFMVP_LEADER_BACKEND": ["zookeeper", ""],
    "RFMVP_DASHBOARD_PUBLIC": ["maybe"],
}
_INTS = [name for name, (_, value) in VALID.items()
         if isinstance(value, int) and not isinstance(value, bool)]
_FLOATS = [name for name, (_, value) in VALID.items() if isinstance(value, float)]
for _name in _INTS:
    INVALID[_name] = ["0", "-1", "ten", "1.5", ""]
for _name in _FLOATS:
    INVALID[_name] = ["0", "-2.5", "soon", "nan", "inf", ""]
for _name in ("RFMVP_BALANCER_MIN_SHARE", "RFMVP_ALERT_ERROR_RATE",
              "RFMVP_BREAKER_FAILURE_RATE"):
    INVALID[_name].append("1.5")  # a fraction
# An optional number of seconds: "" and "none" turn it off, so they are valid.
INVALID["RFMVP_BREAKER_SLOW_CALL_SECONDS"] = ["0", "-2.5", "soon", "nan", "inf"]


def _form(variable: str) -> str:
    return next(row[2] for row in settings_reference() if row[0] == variable)


# -- defaults and parsing ----------------------------------------------------------------


def test_with_nothing_set_from_env_gives_the_defaults() -> None:
    settings = _from({})
    assert settings == Settings()
    assert settings.storage.url == "sqlite:///robots.db"
    assert settings.cache.url == "memory://"
    assert settings.security.api_keys == ()
    assert settings.plugins == ()


def test_from_env_reads_the_process_environment_and_the_dot_env_of_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("RFMVP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env() == Settings()
    (tmp_path / ".env").write_text("RFMVP_WORKER_CONCURRENCY=3\n")
    monkeypatch.setenv("RFMVP_POLL_INTERVAL", "0.5")
    settings = Settings.from_env()
    assert settings.worker.concurrency == 3
    assert settings.worker.poll_interval == 0.5


def test_every_documented_variable_is_covered_here() -> None:
    assert {row[0] for row in settings_reference()} == set(VALID)


@pytest.mark.parametrize("variable", sorted(VALID))
def test_every_documented_variable_parses(variable: str) -> None:
    raw, expected = VALID[variable]
    settings = _from({variable: raw})
    assert _field(settings, variable) == expected
    # ... and changes nothing else
    others = {v for v in VALID if v != variable}
    for other in others:
        assert _field(settings, other) == _field(Settings(), other)


def test_all_variables_together() -> None:
    settings = _from({name: raw for name, (raw, _) in VALID.items()})
    for name, (_, expected) in VALID.items():
        assert _field(settings, name) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("none", None), ("off", None), ("0", None), ("", None),
    ("1/second", RateLimit(1, 1.0)), ("10/minutes", RateLimit(10, 60.0)),
    (" 7 / Day ", RateLimit(7, 86400.0)),
])
def test_rate_limits_are_written_as_n_per_period_or_none(
    text: str, expected: RateLimit | None
) -> None:
    assert _from({"RFMVP_RATE_LIMIT": text}).security.rate_limit == expected


@pytest.mark.parametrize("text", ["1", "true", "YES", "on", "0", "false", "No", "OFF"])
def test_booleans_accept_the_usual_spellings(text: str) -> None:
    expected = text.lower() in ("1", "true", "yes", "on")
    assert _from({"RFMVP_WORKER_ENABLED": text}).worker.enabled is expected


def test_another_prefix_replaces_rfmvp() -> None:
    settings = _from({"APP_WORKER_CONCURRENCY": "4", "RFMVP_WORKER_CONCURRENCY": "9"},
                     prefix="APP_")
    assert settings.worker.concurrency == 4


# -- bad values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "raw"), [(v, raw) for v, raws in sorted(INVALID.items()) for raw in raws]
)
def test_a_bad_value_names_the_variable_and_the_accepted_form(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _from({variable: raw})
    message = str(caught.value)
    assert variable in message
    assert _form(variable) in message


@pytest.mark.parametrize("raw", INVALID["RFMVP_API_KEYS"] + [f"bob:{SECRET}:x,carol"])
def test_a_bad_api_key_list_never_echoes_a_key(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _from({"RFMVP_API_KEYS": raw})
    error = caught.value
    for text in (str(error), repr(error), repr(error.to_dict())):
        assert SECRET not in text
        assert raw not in text
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_a_bad_value_in_the_dot_env_file_is_reported_the_same_way(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("RFMVP_WORKER_CONCURRENCY=many\n")
    with pytest.raises(ConfigError, match="RFMVP_WORKER_CONCURRENCY"):
        Settings.from_env(environ={}, env_file=env)


def test_settings_built_with_keywords_get_the_same_checks() -> None:
    with pytest.raises(ConfigError, match="RFMVP_WORKER_CONCURRENCY"):
        Settings(worker=WorkerConfig(concurrency=0))


@pytest.mark.parametrize("text", ["", "none", "OFF"])
def test_the_slow_call_limit_can_be_turned_off(text: str) -> None:
    assert _from({"RFMVP_BREAKER_SLOW_CALL_SECONDS": text}).resilience \
        .breaker_slow_call_seconds is None


def test_a_breaker_that_could_never_open_is_refused_naming_both_variables() -> None:
    with pytest.raises(ConfigError) as caught:
        _from({"RFMVP_BREAKER_WINDOW": "5", "RFMVP_BREAKER_MINIMUM_CALLS": "6"})
    assert "RFMVP_BREAKER_MINIMUM_CALLS" in str(caught.value)
    assert "RFMVP_BREAKER_WINDOW" in str(caught.value)


def test_keyword_built_breaker_settings_get_the_same_checks() -> None:
    from robotframework_mvp.config import ResilienceConfig

    with pytest.raises(ConfigError, match="RFMVP_BREAKER_SLOW_CALL_SECONDS"):
        Settings(resilience=ResilienceConfig(breaker_slow_call_seconds=-1.0))
    with pytest.raises(ConfigError, match="RFMVP_BREAKER_FAILURE_RATE"):
        Settings(resilience=ResilienceConfig(breaker_failure_rate=0.0))


def test_a_misspelt_variable_is_reported_not_silently_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = _from({"RFMVP_WORKER_CONCURENCY": "4", "RFMVP_WORKER_CONCURRENCY": "2"})
    assert settings.worker.concurrency == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("RFMVP_WORKER_CONCURENCY" in m for m in warned), warned
    assert not any("RFMVP_WORKER_CONCURRENCY " in m for m in warned)


# -- .env --------------------------------------------------------------------------------


def test_the_dot_env_file_is_read_and_the_real_environment_wins(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# deployment defaults\n"
        "RFMVP_WORKER_CONCURRENCY=7\n"
        "RFMVP_RATE_LIMIT=5/second\n"
        f'RFMVP_API_KEYS="alice:{SECRET}"\n'
    )
    settings = Settings.from_env(environ={"RFMVP_WORKER_CONCURRENCY": "3"}, env_file=env)
    assert settings.worker.concurrency == 3  # the environment wins
    assert settings.security.rate_limit == RateLimit(5, 1.0)  # from the file
    assert settings.security.api_keys == (StaticKey("alice", SECRET),)


def test_a_missing_dot_env_file_is_fine(tmp_path: Path) -> None:
    assert Settings.from_env(environ={}, env_file=tmp_path / "absent.env") == Settings()


# -- _FILE -------------------------------------------------------------------------------


def test_a_variable_can_be_read_from_the_file_its_file_variable_names(tmp_path: Path) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text(f"alice:{SECRET}\n")
    secret = tmp_path / "secret_key"
    secret.write_text("pepper-from-a-mounted-secret\n")
    settings = _from({"RFMVP_API_KEYS_FILE": str(keys), "RFMVP_SECRET_KEY_FILE": str(secret)})
    assert settings.security.api_keys == (StaticKey("alice", SECRET),)
    assert settings.security.secret_key == "pepper-from-a-mounted-secret"


def test_any_variable_has_a_file_form(tmp_path: Path) -> None:
    path = tmp_path / "url"
    path.write_text("postgresql://app@db/robots")
    assert _from({"RFMVP_STORAGE_URL_FILE": str(path)}).storage.url == "postgresql://app@db/robots"


def test_the_variable_itself_wins_over_its_file_form(tmp_path: Path) -> None:
    path = tmp_path / "concurrency"
    path.write_text("99")
    settings = _from({"RFMVP_WORKER_CONCURRENCY": "2",
                      "RFMVP_WORKER_CONCURRENCY_FILE": str(path)})
    assert settings.worker.concurrency == 2


def test_an_unreadable_file_names_the_file_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RFMVP_API_KEYS_FILE"):
        _from({"RFMVP_API_KEYS_FILE": str(tmp_path / "missing")})


def test_a_bad_value_in_a_file_names_the_variable_and_never_echoes_the_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "api_keys"
    path.write_text(f"alice{SECRET}")
    with pytest.raises(ConfigError) as caught:
        _from({"RFMVP_API_KEYS_FILE": str(path)})
    assert "RFMVP_API_KEYS" in str(caught.value)
    assert SECRET not in str(caught.value)


# -- secrets in reprs --------------------------------------------------------------------


def test_api_keys_and_the_secret_key_never_show_in_a_repr() -> None:
    settings = _from({"RFMVP_API_KEYS": f"alice:{SECRET}", "RFMVP_SECRET_KEY": "pepper-XYZ-123"})
    assert settings.security.api_keys[0].key == SECRET
    for text in (repr(settings), str(settings), repr(settings.security),
                 repr(settings.security.api_keys), repr(settings.security.api_keys[0])):
        assert SECRET not in text
        assert "pepper-XYZ-123" not in text


# -- with_changes ------------------------------------------------------------------------


def test_with_changes_edits_fields_of_a_section_and_keeps_the_rest() -> None:
    base = _from({"RFMVP_POLL_INTERVAL": "1", "RFMVP_LEASE_SECONDS": "45"})
    changed = base.with_changes(worker={"concurrency": 4}, plugins=("x.y",))
    assert changed.worker.concurrency == 4
    assert changed.worker.lease_seconds == 45.0
    assert changed.plugins == ("x.y",)
    assert base.worker.concurrency == 10  # the original is untouched (frozen)
