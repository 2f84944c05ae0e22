"""Every extension point of robotframework-mvp, in one file.

pluggy calls hooks synchronously; an implementation may return a value or an
awaitable, and the framework awaits the awaitable (``await_me_maybe``). Built-in
behaviour (SQLite and PostgreSQL drivers, memory and Redis caches, static API keys,
score-based module selection) is implemented as plugins on these same hooks.

Three families:

- contribute: ``register_modules``, ``storage_driver``, ``cache_backend``,
  ``background_tasks``, ``notification_channels``;
- decide (``firstresult``: the first non-None answer wins): ``authenticate``,
  ``select_module``, ``validate_robot``, ``payload_schema``;
- observe (every implementation is called): ``on_startup``, ``on_shutdown``,
  ``on_robot_created``, ``on_robot_progress``, ``on_robot_finished``, ``on_alert``,
  ``on_audit_event``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .balancing import Candidate
    from .cache.backend import CacheBackend
    from .config import Settings
    from .models import AuditEvent, Principal, Robot
    from .modules import Module
    from .orchestrator import Orchestrator
    from .performance import Alert
    from .services.notifications import NotificationChannel
    from .state.driver import StorageDriver

PROJECT_NAME = "robotframework_mvp"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]


# -- contribute ------------------------------------------------------------------------


@hookspec
def register_modules(settings: Settings) -> Sequence[Module] | None:
    """Contribute modules (the units that do robots' work).

    Called once when the orchestrator starts, after plugins are loaded. ``@module``
    functions defined at the top level of a plugin are registered without this hook;
    use it to build modules from settings.

    :param settings: the orchestrator's settings.
    :return: a sequence of :class:`~robotframework_mvp.Module`, or None.
    """


@hookspec(firstresult=True)
def storage_driver(url: str, settings: Settings) -> StorageDriver | None:
    """Build the storage driver for ``url`` if this plugin handles its scheme.

    Called once when the orchestrator starts. Stops at the first non-None result.

    :param url: ``RFMVP_STORAGE_URL``.
    :param settings: the orchestrator's settings (pool sizes, read URL ...).
    :return: an unopened :class:`~robotframework_mvp.state.StorageDriver`, or None.
    """


@hookspec(firstresult=True)
def cache_backend(url: str, settings: Settings) -> CacheBackend | None:
    """Build the cache backend for ``url`` if this plugin handles its scheme.

    Called once when the orchestrator starts. Stops at the first non-None result.

    :param url: ``RFMVP_CACHE_URL``.
    :param settings: the orchestrator's settings.
    :return: an unopened :class:`~robotframework_mvp.cache.CacheBackend`, or None.
    """


@hookspec
def background_tasks(orchestrator: Orchestrator) -> Sequence[Callable[[], Awaitable[None]]] | None:
    """Contribute long-lived tasks (watchers, pollers) that run as long as the orchestrator.

    Called once when the orchestrator starts, before ``on_startup``, with the store, cache
    and modules ready. Each callable is started in the orchestrator's task group once the
    worker runs; on shutdown the tasks are cancelled first, before the worker stops. A
    task that raises is logged and not restarted: retry inside the task. Every
    implementation is called. Not awaited; raise
    :class:`~robotframework_mvp.errors.ConfigError` to refuse to start.

    :param orchestrator: the running orchestrator (settings, state, ``submit``).
    :return: a sequence of async callables taking no argument, or None.
    """


@hookspec
def notification_channels(settings: Settings) -> Sequence[NotificationChannel] | None:
    """Contribute delivery channels to the notification service, each under its name.

    Called once when the built-in notification service
    (``robotframework_mvp.services.notifications``) starts. A subscription sends through
    a contributed channel by naming it (``"channel": "chat"``). Every implementation is
    called; two channels with one name fail startup. Not awaited.

    :param settings: the orchestrator's settings.
    :return: a sequence of objects with a ``name`` attribute and an
        ``async send(notification)`` method, or None.
    """


# -- decide ----------------------------------------------------------------------------


@hookspec(firstresult=True)
def authenticate(
    credential: str, orchestrator: Orchestrator
) -> Principal | Awaitable[Principal | None] | None:
    """Turn an API key (or bearer token) into a Principal.

    Called on every request that carries a credential, before rate limiting. Return
    None when the credential is not yours so the next backend can try; raise
    :class:`~robotframework_mvp.errors.AuthenticationError` to refuse it outright.
    Compare secrets in constant time and never log them. Stops at the first non-None
    result.

    :param credential: the raw key from ``X-API-Key`` or ``Authorization: Bearer``.
    :param orchestrator: the running orchestrator (settings, state, cache).
    :return: the :class:`~robotframework_mvp.Principal`, or None.
    """


@hookspec(firstresult=True)
def select_module(kind: str, candidates: Sequence[Candidate]) -> str | None:
    """Pick the module that will run a new robot of ``kind``.

    Called at submission on a module-choice cache miss, with the available candidates
    (healthy, circuit not open) and their scores. The built-in implementation
    (``trylast``) picks at random weighted by score. Stops at the first non-None
    result.

    :param kind: the robot kind.
    :param candidates: never empty; each has ``name``, ``score``, ``load`` and
        ``capacity``.
    :return: the chosen module name (one of the candidates), or None to defer.
    """


@hookspec(firstresult=True)
def validate_robot(
    kind: str, payload: dict[str, Any], principal: Principal
) -> str | Awaitable[str | None] | None:
    """Refuse a robot request the built-in sanitizer accepted.

    Called at submission after sanitization, before the robot is created. Return a
    message saying what is wrong to refuse it with 422; return None to accept. Stops at
    the first non-None result.

    :param kind: the robot kind.
    :param payload: the sanitized payload.
    :param principal: who submits it.
    :return: a refusal message, or None.
    """


@hookspec(firstresult=True)
def payload_schema(kind: str) -> dict[str, Any] | None:
    """Declare the JSON Schema that payloads of ``kind`` must meet.

    Called once per kind and orchestrator, at the first submission of that kind; the
    answer is compiled and kept. Payloads are checked against it after sanitization and
    before ``validate_robot``; a payload that breaks it is refused with 422 and the
    offending field's path (``$.payload.x``). The built-in implementation (``trylast``)
    serves the ``payload_schema=`` of ``@module``. Not awaited. Stops at the first
    non-None result.

    :param kind: the robot kind.
    :return: a JSON Schema (any draft ``jsonschema`` knows; 2020-12 when it names
        none), or None for no schema.
    """


# -- observe ---------------------------------------------------------------------------


@hookspec
def on_startup(orchestrator: Orchestrator) -> Awaitable[None] | None:
    """The orchestrator has opened its store and cache and is about to start workers."""


@hookspec
def on_shutdown(orchestrator: Orchestrator) -> Awaitable[None] | None:
    """The orchestrator has stopped its workers and is about to close store and cache."""


@hookspec
def on_robot_created(robot: Robot) -> Awaitable[None] | None:
    """A robot was stored (called once per robot, not for idempotent repeats)."""


@hookspec
def on_robot_progress(robot: Robot) -> Awaitable[None] | None:
    """A running robot reported progress; ``robot.progress`` holds the new value."""


@hookspec
def on_robot_finished(robot: Robot) -> Awaitable[None] | None:
    """A robot reached a terminal state (succeeded, failed, cancelled or timed_out)."""


@hookspec
def on_alert(alert: Alert) -> Awaitable[None] | None:
    """An anomaly was detected (``alert.active``) or has ended (``not alert.active``)."""


@hookspec
def on_audit_event(event: AuditEvent) -> Awaitable[None] | None:
    """A request was audited (accepted or refused); ``event`` holds no secret."""
