"""Settings: every knob of the framework, from keyword arguments, ``RFMVP_*`` variables
and a ``.env`` file.

Each field declares its environment variable and how to parse it, so a bad value fails
at startup with an error that names the variable and the accepted form, and the
configuration reference in ``docs/configuration.md`` is checked against this file.
Secrets (API keys, the secret key) never appear in a repr; any variable may instead be
read from a file named by ``<VARIABLE>_FILE``, as Docker and Kubernetes mount secrets.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
from dotenv import dotenv_values

from .errors import ConfigError

__all__ = [
    "BackgroundConfig",
    "CacheConfig",
    "PerformanceConfig",
    "RateLimit",
    "ResilienceConfig",
    "SecurityConfig",
    "Settings",
    "StaticKey",
    "StorageConfig",
    "WorkerConfig",
]

log = logging.getLogger(__name__)

#: RFMVP_* variables read by the examples, tests and benchmarks rather than by Settings
_NOT_SETTINGS = frozenset({
    "API_KEY", "HOST", "PORT", "REQUIRE_SERVICES", "TEST_POSTGRES_URL", "TEST_REDIS_URL",
    "LOG_LEVEL", "ACCESS_LOG",
    # read by the email monitor plugin (robotframework_mvp.services.email.config)
    "EMAIL_MAILBOXES", "EMAIL_API_KEY", "EMAIL_ATTACHMENT_DIR", "EMAIL_POLL_INTERVAL",
    "EMAIL_MAX_ATTACHMENT_BYTES", "EMAIL_MAX_MESSAGE_BYTES", "EMAIL_MAX_BODY_CHARS",
    "EMAIL_BATCH_SIZE", "EMAIL_TIMEOUT", "EMAIL_RETRY_BASE_SECONDS", "EMAIL_RETRY_CAP_SECONDS",
    # read by the OCR plugin (robotframework_mvp.services.ocr.config)
    "OCR_ROOT", "OCR_LANGUAGES", "OCR_DPI", "OCR_MAX_PAGES", "OCR_MAX_FILE_BYTES",
    "OCR_MAX_PIXELS", "OCR_MAX_WORDS", "OCR_PAGE_TIMEOUT", "OCR_CAPACITY", "OCR_TESSERACT_CMD",
    # read by the notification plugin (robotframework_mvp.services.notifications.config)
    "NOTIFY_SUBSCRIPTIONS", "NOTIFY_MAX_ATTEMPTS", "NOTIFY_RETRY_BASE_SECONDS",
    "NOTIFY_RETRY_CAP_SECONDS", "NOTIFY_TIMEOUT", "NOTIFY_CONCURRENCY", "NOTIFY_QUEUE_SIZE",
    "NOTIFY_LOG_SIZE", "NOTIFY_SHUTDOWN_GRACE_SECONDS", "NOTIFY_MAX_RESULT_BYTES",
    "NOTIFY_SMTP_HOST", "NOTIFY_SMTP_PORT", "NOTIFY_SMTP_USERNAME", "NOTIFY_SMTP_PASSWORD",
    "NOTIFY_SMTP_SECURITY", "NOTIFY_SMTP_FROM",
})

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}


@attrs.frozen
class RateLimit:
    """``count`` requests per ``period`` seconds, e.g. ``RateLimit.parse("100/minute")``."""

    count: int
    period: float

    FORM = "N/second, N/minute, N/hour or N/day (e.g. 100/minute), or 'none'"

    @classmethod
    def parse(cls, text: str) -> RateLimit | None:
        text = text.strip().lower()
        if text in ("", "none", "off", "0"):
            return None
        match = re.fullmatch(r"(\d+)\s*/\s*(second|minute|hour|day)s?", text)
        if not match or int(match.group(1)) <= 0:
            raise ValueError(cls.FORM)
        return cls(int(match.group(1)), _PERIODS[match.group(2)])

    def __str__(self) -> str:
        unit = {v: k for k, v in _PERIODS.items()}.get(self.period, f"{self.period}s")
        return f"{self.count}/{unit}"


@attrs.frozen
class StaticKey:
    """One ``principal:key`` pair of ``RFMVP_API_KEYS``; the key never shows in a repr."""

    principal: str
    key: str = attrs.field(repr=False)


def _var(name: str, parse: Callable[[str], Any], form: str, help: str) -> dict[str, Any]:
    return {"env": name, "parse": parse, "form": form, "help": help}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _parse_positive_int(text: str) -> int:
    value = int(text.strip())
    if value <= 0:
        raise ValueError("a whole number above 0")
    return value


def _parse_positive_float(text: str) -> float:
    value = float(text.strip())
    if not value > 0 or value == float("inf"):
        raise ValueError("a number above 0")
    return value


def _parse_fraction(text: str) -> float:
    value = float(text.strip())
    if not 0 < value <= 1:
        raise ValueError("a number above 0 and at most 1")
    return value


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(" or ".join(choices))
        return value

    return parse


def _parse_optional_seconds(text: str) -> float | None:
    if text.strip().lower() in ("", "none", "off"):
        return None
    return _parse_positive_float(text)


def _parse_optional_str(text: str) -> str | None:
    return text.strip() or None


def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parse_keys(text: str) -> tuple[StaticKey, ...]:
    keys = []
    for pair in _parse_list(text):
        principal, sep, key = pair.partition(":")
        if not sep or not principal.strip() or len(key.strip()) < 8:
            # Never echo the pair: it holds a secret.
            raise ValueError("comma-separated principal:key pairs, each key at least 8 characters")
        keys.append(StaticKey(principal.strip(), key.strip()))
    return tuple(keys)


def _parse_url(schemes: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        text = text.strip()
        if "://" not in text:
            raise ValueError(schemes)
        return text

    return parse


_POS_INT = "a whole number above 0"
_POS_FLOAT = "a number of seconds above 0"


@attrs.frozen
class StorageConfig:
    url: str = attrs.field(
        default="sqlite:///robots.db",
        metadata=_var("RFMVP_STORAGE_URL", _parse_url("sqlite:///PATH or postgresql://..."),
                      "sqlite:///PATH or postgresql://USER@HOST:PORT/DB",
                      "Where robots are stored; the scheme picks the storage driver."),
    )
    read_url: str | None = attrs.field(
        default=None,
        metadata=_var("RFMVP_STORAGE_READ_URL", _parse_optional_str, "a postgresql:// URL",
                      "Optional read replica; reads fall back to the write pool when unset "
                      "or down."),
    )
    pool_min_size: int = attrs.field(
        default=1, metadata=_var("RFMVP_STORAGE_POOL_MIN_SIZE", _parse_positive_int, _POS_INT,
                                 "Connections each PostgreSQL pool keeps open."))
    pool_max_size: int = attrs.field(
        default=10, metadata=_var("RFMVP_STORAGE_POOL_MAX_SIZE", _parse_positive_int, _POS_INT,
                                  "Most connections of the PostgreSQL write pool."))
    read_pool_max_size: int = attrs.field(
        default=10, metadata=_var("RFMVP_STORAGE_READ_POOL_MAX_SIZE", _parse_positive_int,
                                  _POS_INT, "Most connections of the PostgreSQL read pool."))
    timeout: float = attrs.field(
        default=10.0, metadata=_var("RFMVP_STORAGE_TIMEOUT", _parse_positive_float, _POS_FLOAT,
                                    "How long a request waits for a connection or a lock."))
    migrate_on_startup: bool = attrs.field(
        default=True, metadata=_var("RFMVP_STORAGE_MIGRATE_ON_STARTUP", _parse_bool,
                                    "true or false",
                                    "Apply pending schema migrations when the orchestrator "
                                    "starts (otherwise run `rfmvp migrate`)."))
    breaker_open_seconds: float = attrs.field(
        default=2.0, metadata=_var("RFMVP_STORAGE_BREAKER_OPEN_SECONDS", _parse_positive_float,
                                   _POS_FLOAT, "Once PostgreSQL cannot be reached, how long "
                                   "store calls fail at once with 503 before one call tries "
                                   "it again (see docs/resilience.md)."))
    replica_retry_seconds: float = attrs.field(
        default=30.0, metadata=_var("RFMVP_STORAGE_REPLICA_RETRY_SECONDS",
                                    _parse_positive_float, _POS_FLOAT,
                                    "How long reads stay on the write pool after the read "
                                    "replica failed, before one read tries it again."))


@attrs.frozen
class CacheConfig:
    url: str = attrs.field(
        default="memory://",
        metadata=_var("RFMVP_CACHE_URL", _parse_url("memory:// or redis://HOST:PORT/DB"),
                      "memory:// or redis://HOST:PORT/DB",
                      "The cache backend; the scheme picks it."),
    )
    max_entries: int = attrs.field(
        default=10_000, metadata=_var("RFMVP_CACHE_MAX_ENTRIES", _parse_positive_int, _POS_INT,
                                      "Bound of the in-memory cache (least recently used "
                                      "entries go first); about 2.5 KB of memory each."))
    key_prefix: str = attrs.field(
        default="rfmvp:", metadata=_var("RFMVP_CACHE_KEY_PREFIX", str, "any text",
                                        "Prefix of every cache key (share one Redis safely)."))
    ttl_robot_status: float = attrs.field(
        default=30.0, metadata=_var("RFMVP_CACHE_TTL_ROBOT_STATUS", _parse_positive_float,
                                    _POS_FLOAT, "How long the status of a robot that has "
                                    "not finished stays cached."))
    ttl_robot_finished: float = attrs.field(
        default=5.0, metadata=_var("RFMVP_CACHE_TTL_ROBOT_FINISHED", _parse_positive_float,
                                   _POS_FLOAT, "How long a finished robot stays cached (it "
                                   "no longer changes; reads after that go to the store)."))
    ttl_module_choice: float = attrs.field(
        default=1.0, metadata=_var("RFMVP_CACHE_TTL_MODULE_CHOICE", _parse_positive_float,
                                   _POS_FLOAT, "How long scored module candidates for a kind "
                                   "(and other processes' module records) are reused."))
    ttl_stats: float = attrs.field(
        default=5.0, metadata=_var("RFMVP_CACHE_TTL_STATS", _parse_positive_float, _POS_FLOAT,
                                   "How long robot counts shown by /metrics are reused."))


@attrs.frozen
class SecurityConfig:
    api_keys: tuple[StaticKey, ...] = attrs.field(
        default=(), repr=False,
        metadata=_var("RFMVP_API_KEYS", _parse_keys, "principal:key,principal:key",
                      "Static API keys; each principal is its own tenant. Held only as "
                      "keyed hashes after startup."),
    )
    admin_principals: tuple[str, ...] = attrs.field(
        default=(), metadata=_var("RFMVP_ADMIN_PRINCIPALS", _parse_list, "principal,principal",
                                  "Static principals that also get the admin scope (see all "
                                  "tenants)."))
    secret_key: str | None = attrs.field(
        default=None, repr=False,
        metadata=_var("RFMVP_SECRET_KEY", _parse_optional_str, "a long random string",
                      "Server pepper for key hashes. Required by stored keys (`rfmvp keys`); "
                      "static keys get a random one per process when unset."),
    )
    rate_limit: RateLimit | None = attrs.field(
        default=RateLimit(100, 1.0),
        metadata=_var("RFMVP_RATE_LIMIT", RateLimit.parse, RateLimit.FORM,
                      "Requests each principal may make; 'none' turns limiting off. A "
                      "stored key's own limit replaces it for that key."),
    )
    rate_limit_fallback: str = attrs.field(
        default="local", validator=attrs.validators.in_(("local", "open", "closed")),
        metadata=_var("RFMVP_RATE_LIMIT_FALLBACK", _parse_choice("local", "open", "closed"),
                      "local, open or closed",
                      "What rate limiting does while the shared cache (Redis) is "
                      "unreachable: count per process, admit everything, or refuse with "
                      "503."),
    )
    auth_failure_limit: RateLimit | None = attrs.field(
        default=RateLimit(20, 60.0),
        metadata=_var("RFMVP_AUTH_FAILURE_LIMIT", RateLimit.parse, RateLimit.FORM,
                      "Failed authentications allowed per client address (slows key "
                      "guessing)."),
    )
    max_payload_bytes: int = attrs.field(
        default=64 * 1024, metadata=_var("RFMVP_MAX_PAYLOAD_BYTES", _parse_positive_int,
                                         _POS_INT, "Largest payload, in bytes (413 above); a "
                                         "request body may be 4 KiB larger for its envelope."))
    max_depth: int = attrs.field(
        default=32, metadata=_var("RFMVP_MAX_DEPTH", _parse_positive_int, _POS_INT,
                                  "Deepest nesting of objects and arrays in a payload."))
    max_keys: int = attrs.field(
        default=1000, metadata=_var("RFMVP_MAX_KEYS", _parse_positive_int, _POS_INT,
                                    "Most keys in one payload object (and items in one array)."))
    max_string_length: int = attrs.field(
        default=16 * 1024, metadata=_var("RFMVP_MAX_STRING_LENGTH", _parse_positive_int,
                                         _POS_INT, "Longest string in a payload, in characters."))
    max_wait_seconds: float = attrs.field(
        default=60.0, metadata=_var("RFMVP_MAX_WAIT_SECONDS", _parse_positive_float, _POS_FLOAT,
                                    "Longest `wait` a caller may ask for."))
    audit_flush_interval: float = attrs.field(
        default=0.05, metadata=_var("RFMVP_AUDIT_FLUSH_INTERVAL", _parse_positive_float,
                                    _POS_FLOAT, "How often batched audit records are written."))
    dashboard_public: bool = attrs.field(
        default=False, metadata=_var("RFMVP_DASHBOARD_PUBLIC", _parse_bool, "true or false",
                                     "Serve /dashboard/data without a key (counts, latencies, "
                                     "modules and alerts; never robot ids). Otherwise it needs "
                                     "an admin key."))
    audit_retention_days: float = attrs.field(
        default=365.0, metadata=_var("RFMVP_AUDIT_RETENTION_DAYS", _parse_positive_float,
                                     "a number of days above 0",
                                     "How long audit records are kept (the oldest go first; "
                                     "see `rfmvp audit verify`)."))
    api_key_touch_interval: float = attrs.field(
        default=60.0, metadata=_var("RFMVP_API_KEY_TOUCH_INTERVAL", _parse_positive_float,
                                    _POS_FLOAT, "How often a stored key's last-used time is "
                                    "written, at most (batched, off the request path)."))


@attrs.frozen
class WorkerConfig:
    enabled: bool = attrs.field(
        default=True, metadata=_var("RFMVP_WORKER_ENABLED", _parse_bool, "true or false",
                                    "Run workers in this process (false for API-only "
                                    "processes)."))
    concurrency: int = attrs.field(
        default=10, metadata=_var("RFMVP_WORKER_CONCURRENCY", _parse_positive_int, _POS_INT,
                                  "Robots one process runs at once."))
    lease_seconds: float = attrs.field(
        default=30.0, metadata=_var("RFMVP_LEASE_SECONDS", _parse_positive_float, _POS_FLOAT,
                                    "How long a claim lasts without a heartbeat before another "
                                    "worker may take the robot over."))
    poll_interval: float = attrs.field(
        default=1.0, metadata=_var("RFMVP_POLL_INTERVAL", _parse_positive_float, _POS_FLOAT,
                                   "Longest an idle worker sleeps before looking for work "
                                   "(it is woken at once by new robots)."))
    shutdown_grace_seconds: float = attrs.field(
        default=10.0, metadata=_var("RFMVP_SHUTDOWN_GRACE_SECONDS", _parse_positive_float,
                                    _POS_FLOAT, "How long running robots may finish on "
                                    "shutdown before they are handed back to the queue."))


@attrs.frozen
class ResilienceConfig:
    retry_base_seconds: float = attrs.field(
        default=1.0, metadata=_var("RFMVP_RETRY_BASE_SECONDS", _parse_positive_float, _POS_FLOAT,
                                   "First retry backoff; doubles each attempt (full jitter)."))
    retry_cap_seconds: float = attrs.field(
        default=300.0, metadata=_var("RFMVP_RETRY_CAP_SECONDS", _parse_positive_float,
                                     _POS_FLOAT, "Longest retry backoff."))
    default_max_attempts: int = attrs.field(
        default=3, metadata=_var("RFMVP_DEFAULT_MAX_ATTEMPTS", _parse_positive_int, _POS_INT,
                                 "Attempts of a module that does not set max_attempts."))
    default_timeout: float = attrs.field(
        default=300.0, metadata=_var("RFMVP_DEFAULT_TIMEOUT", _parse_positive_float, _POS_FLOAT,
                                     "Timeout of a module that does not set one."))
    retry_other_module_after: int = attrs.field(
        default=2, metadata=_var("RFMVP_RETRY_OTHER_MODULE_AFTER", _parse_positive_int,
                                 _POS_INT, "Failed attempts in a row of one robot on one "
                                 "module after which its retry goes to another module of its "
                                 "kind, when one is available (at once when the module's "
                                 "circuit is open)."))
    no_module_deadline: float = attrs.field(
        default=300.0, metadata=_var("RFMVP_NO_MODULE_DEADLINE_SECONDS", _parse_positive_float,
                                     _POS_FLOAT, "Longest a due robot waits queued while its "
                                     "module is unavailable (circuit open, unhealthy, or no "
                                     "live process) and no other module of its kind is; then "
                                     "it fails with no_module_available."))
    breaker_failure_rate: float = attrs.field(
        default=0.5, metadata=_var("RFMVP_BREAKER_FAILURE_RATE", _parse_fraction,
                                   "a number above 0 and at most 1",
                                   "Share of failed attempts in a module's window at which "
                                   "its circuit opens."))
    breaker_window: int = attrs.field(
        default=20, metadata=_var("RFMVP_BREAKER_WINDOW", _parse_positive_int, _POS_INT,
                                  "Latest attempts of a module its circuit breaker judges."))
    breaker_minimum_calls: int = attrs.field(
        default=10, metadata=_var("RFMVP_BREAKER_MINIMUM_CALLS", _parse_positive_int, _POS_INT,
                                  "Attempts a module's window needs before its circuit can "
                                  "open (at most RFMVP_BREAKER_WINDOW)."))
    breaker_open_seconds: float = attrs.field(
        default=30.0, metadata=_var("RFMVP_BREAKER_OPEN_SECONDS", _parse_positive_float,
                                    _POS_FLOAT, "How long a module's open circuit refuses "
                                    "work before it lets trial robots through (half-open)."))
    breaker_half_open_calls: int = attrs.field(
        default=3, metadata=_var("RFMVP_BREAKER_HALF_OPEN_CALLS", _parse_positive_int, _POS_INT,
                                 "Trial robots a half-open circuit runs at once; all must "
                                 "succeed to close it, one failure reopens it."))
    breaker_slow_call_seconds: float | None = attrs.field(
        default=None, metadata=_var("RFMVP_BREAKER_SLOW_CALL_SECONDS", _parse_optional_seconds,
                                    "a number of seconds above 0, or none",
                                    "An attempt that succeeds but takes longer than this "
                                    "counts as a failure for the module's circuit."))


@attrs.frozen
class PerformanceConfig:
    window_size: int = attrs.field(
        default=4096, metadata=_var("RFMVP_PERF_WINDOW_SIZE", _parse_positive_int, _POS_INT,
                                    "Latency samples kept per operation for percentiles."))
    balancer_min_share: float = attrs.field(
        default=0.05, metadata=_var("RFMVP_BALANCER_MIN_SHARE", _parse_fraction,
                                    "a number above 0 and at most 1",
                                    "Least weight of an available module in the choice, as a "
                                    "share of the best module's score (slow modules keep some "
                                    "traffic to show they recovered)."))
    alert_latency_factor: float = attrs.field(
        default=3.0, metadata=_var("RFMVP_ALERT_LATENCY_FACTOR", _parse_positive_float,
                                   "a number above 0", "A latency alert starts when a step's "
                                   "p95 is above this many times its baseline."))
    alert_min_latency_ms: float = attrs.field(
        default=1.0, metadata=_var("RFMVP_ALERT_MIN_LATENCY_MS", _parse_positive_float,
                                   "a number of milliseconds above 0", "No latency alert while "
                                   "the p95 is at or below this (ignores sub-millisecond "
                                   "jitter)."))
    alert_error_rate: float = attrs.field(
        default=0.5, metadata=_var("RFMVP_ALERT_ERROR_RATE", _parse_fraction,
                                   "a number above 0 and at most 1", "An error-rate alert "
                                   "starts when this share of a step's recent samples failed."))
    alert_min_samples: int = attrs.field(
        default=50, metadata=_var("RFMVP_ALERT_MIN_SAMPLES", _parse_positive_int, _POS_INT,
                                  "Samples a step needs in its window before it can alert."))


@attrs.frozen
class BackgroundConfig:
    health_interval: float = attrs.field(
        default=300.0, metadata=_var("RFMVP_HEALTH_INTERVAL", _parse_positive_float, _POS_FLOAT,
                                     "How often module health checks run."))
    health_check_timeout: float = attrs.field(
        default=10.0, metadata=_var("RFMVP_HEALTH_CHECK_TIMEOUT", _parse_positive_float,
                                    _POS_FLOAT, "Longest one module health check may take; "
                                    "a check that takes longer makes the module unhealthy."))
    scores_interval: float = attrs.field(
        default=900.0, metadata=_var("RFMVP_SCORES_INTERVAL", _parse_positive_float, _POS_FLOAT,
                                     "How often module scores are recomputed and stored."))
    cleanup_interval: float = attrs.field(
        default=86400.0, metadata=_var("RFMVP_CLEANUP_INTERVAL", _parse_positive_float,
                                       _POS_FLOAT, "How often old data is deleted."))
    reaper_interval: float = attrs.field(
        default=5.0, metadata=_var("RFMVP_REAPER_INTERVAL", _parse_positive_float, _POS_FLOAT,
                                   "How often expired leases are looked for."))
    loop_lag_interval: float = attrs.field(
        default=0.1, metadata=_var("RFMVP_LOOP_LAG_INTERVAL", _parse_positive_float,
                                   _POS_FLOAT, "How often the event loop's lag is sampled "
                                   "(`rfmvp_event_loop_lag_seconds`)."))
    alert_interval: float = attrs.field(
        default=30.0, metadata=_var("RFMVP_ALERT_INTERVAL", _parse_positive_float, _POS_FLOAT,
                                    "How often step latencies and error rates are checked "
                                    "for anomalies."))
    leader_backend: str = attrs.field(
        default="auto", metadata=_var(
            "RFMVP_LEADER_BACKEND", _parse_choice("auto", "postgresql", "redis", "file", "none"),
            "auto, postgresql, redis, file or none",
            "How processes elect the one leader that runs cleanup and scoring: auto is a "
            "PostgreSQL advisory lock on PostgreSQL, a Redis lock with SQLite and Redis, a "
            "lock file next to a SQLite database; none makes every process lead."))
    leader_interval: float = attrs.field(
        default=5.0, metadata=_var("RFMVP_LEADER_INTERVAL", _parse_positive_float, _POS_FLOAT,
                                   "How often the leader checks its lock and the others try "
                                   "to take it (a Redis lock lives 3 times this)."))
    retention_days: float = attrs.field(
        default=30.0, metadata=_var("RFMVP_RETENTION_DAYS", _parse_positive_float,
                                    "a number of days above 0",
                                    "How long finished robots and their executions are kept "
                                    "(audit records: RFMVP_AUDIT_RETENTION_DAYS)."))
    scheduler_enabled: bool = attrs.field(
        default=True, metadata=_var("RFMVP_SCHEDULER_ENABLED", _parse_bool, "true or false",
                                    "Fire due schedules from this process (any number of "
                                    "processes may; each due time fires once)."))
    scheduler_interval: float = attrs.field(
        default=1.0, metadata=_var("RFMVP_SCHEDULER_INTERVAL", _parse_positive_float,
                                   _POS_FLOAT, "Longest the scheduler sleeps before looking "
                                   "for schedules another process added or changed."))
    misfire_grace: float = attrs.field(
        default=1.0, metadata=_var("RFMVP_MISFIRE_GRACE_SECONDS", _parse_positive_float,
                                   _POS_FLOAT, "How late a due time may fire and still be on "
                                   "time; later ones follow the schedule's misfire policy."))


@attrs.frozen
class Settings:
    """All configuration. Build with keywords, or from the environment with ``from_env``."""

    storage: StorageConfig = attrs.field(factory=StorageConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    security: SecurityConfig = attrs.field(factory=SecurityConfig)
    worker: WorkerConfig = attrs.field(factory=WorkerConfig)
    resilience: ResilienceConfig = attrs.field(factory=ResilienceConfig)
    performance: PerformanceConfig = attrs.field(factory=PerformanceConfig)
    background: BackgroundConfig = attrs.field(factory=BackgroundConfig)
    plugins: tuple[str, ...] = attrs.field(
        default=(),
        metadata=_var("RFMVP_PLUGINS", _parse_list, "module.path,module.path",
                      "Importable Python modules registered as plugins (their @module "
                      "functions and hook implementations)."),
    )

    def __attrs_post_init__(self) -> None:
        """Keyword-built settings get the same checks as environment ones."""
        for section, field in _settings_fields():
            value = getattr(self if section is None else getattr(self, section), field.name)
            parse = field.metadata["parse"]
            if parse is _parse_fraction and not (
                isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1
            ):
                raise ConfigError(
                    f"{field.metadata['env']} has a bad value; expected {field.metadata['form']}"
                )
            if parse in (_parse_positive_int, _parse_positive_float) and not (
                isinstance(value, int | float) and not isinstance(value, bool) and value > 0
                and value != float("inf")
            ):
                raise ConfigError(
                    f"{field.metadata['env']} has a bad value; expected {field.metadata['form']}"
                )
            if parse is _parse_optional_seconds and value is not None and not (
                isinstance(value, int | float) and not isinstance(value, bool)
                and 0 < value < float("inf")
            ):
                raise ConfigError(
                    f"{field.metadata['env']} has a bad value; expected {field.metadata['form']}"
                )
        res = self.resilience
        if res.breaker_minimum_calls > res.breaker_window:
            raise ConfigError(
                f"RFMVP_BREAKER_MINIMUM_CALLS ({res.breaker_minimum_calls}) must not exceed "
                f"RFMVP_BREAKER_WINDOW ({res.breaker_window}): the circuit could never open"
            )

    @classmethod
    def from_env(
        cls,
        prefix: str = "RFMVP_",
        env_file: str | os.PathLike[str] | None = ".env",
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``) over a ``.env`` file.

        Variables are the documented names (``RFMVP_STORAGE_URL`` ...); a name with
        another prefix replaces ``RFMVP_``. Real environment variables win over the file.
        """
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return cls._from_mapping(values, prefix)

    @classmethod
    def _from_mapping(cls, values: Mapping[str, str], prefix: str) -> Settings:
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        known = {prefix + f.metadata["env"].removeprefix("RFMVP_") for _, f in _settings_fields()}
        for name in sorted(values):
            base = name.removesuffix("_FILE")
            if name.startswith(prefix) and base not in known and base[len(prefix):] not in \
                    _NOT_SETTINGS:
                # A typo would otherwise leave a default in force without a word.
                log.warning("%s is not a setting of robotframework-mvp; ignored (see "
                            "`rfmvp config` for the list)", name)
        for section, field in _settings_fields():
            name = prefix + field.metadata["env"].removeprefix("RFMVP_")
            raw = _lookup(values, name)
            if raw is None:
                continue
            try:
                parsed = field.metadata["parse"](raw)
            except ValueError:
                raise ConfigError(
                    f"{name} has a bad value; expected {field.metadata['form']}"
                ) from None
            if section is None:
                top[field.name] = parsed
            else:
                sections.setdefault(section, {})[field.name] = parsed
        kwargs: dict[str, Any] = dict(top)
        for section_name, fields in sections.items():
            kwargs[section_name] = _SECTIONS[section_name](**fields)
        return cls(**kwargs)

    def with_changes(self, **sections: Any) -> Settings:
        """A copy with some fields changed: ``settings.with_changes(worker={"concurrency": 4})``."""
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = attrs.evolve(current, **value) if isinstance(value, dict) else value
        return attrs.evolve(self, **changes)


def _lookup(values: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or the content of the file ``<name>_FILE`` points at."""
    if name in values:
        return values[name]
    path = values.get(name + "_FILE")
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{name}_FILE points at a file that cannot be read: {exc.strerror}")\
            from None


_SECTIONS: dict[str, type[Any]] = {
    "storage": StorageConfig,
    "cache": CacheConfig,
    "security": SecurityConfig,
    "worker": WorkerConfig,
    "resilience": ResilienceConfig,
    "performance": PerformanceConfig,
    "background": BackgroundConfig,
}


def _settings_fields() -> Iterator[tuple[str | None, attrs.Attribute[Any]]]:
    """Every leaf setting with its section (``None`` for top-level fields)."""
    for field in attrs.fields(Settings):
        if "env" in field.metadata:
            yield None, field
            continue
        for sub in attrs.fields(_SECTIONS[field.name]):
            yield field.name, sub


def settings_reference() -> list[tuple[str, str, str, str]]:
    """(variable, default, accepted form, meaning) for every setting: the docs' source."""
    rows = []
    for _section, field in _settings_fields():
        default: Any = field.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        shown = "(unset)" if default in (None, ()) else str(default)
        if isinstance(default, bool):
            shown = str(default).lower()
        rows.append((field.metadata["env"], shown, field.metadata["form"], field.metadata["help"]))
    return rows
