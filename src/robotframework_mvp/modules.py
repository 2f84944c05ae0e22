"""The module API: what a plugin author writes to do a robot's work.

A module is a function ``(robot, ctx) -> dict`` wrapped by ``@module``. Async functions
run on the event loop; plain functions run in a worker thread so they cannot block it.
``ctx`` reports progress and tells the function which attempt this is.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.from_thread
import attrs

from .errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from .models import Robot

__all__ = ["Module", "ModuleContext", "ProgressReporter", "module"]

JSONObject = dict[str, Any]
ProcessFunc = Callable[
    ["Robot", "ModuleContext"], "Awaitable[JSONObject | None] | JSONObject | None"
]
HealthFunc = Callable[[], "Awaitable[bool] | bool"]


class ProgressReporter(Protocol):
    async def __call__(self, percent: float, message: str | None) -> None: ...


@attrs.define
class ModuleContext:
    """Handed to a module with each robot: progress reporting and attempt facts."""

    robot_id: str
    attempt: int
    module: str
    _report: ProgressReporter = attrs.field(repr=False, alias="report")

    async def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0-100). Progress never goes backwards: lower values are ignored.

        The message is stored as its first 2,000 characters, a NUL or a lone surrogate
        replaced by U+FFFD (no store can hold them).

        Raises anyio's cancellation if the robot was cancelled or its lease was lost.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"progress must be between 0 and 100, got {percent}")
        if message is not None and not isinstance(message, str):
            raise TypeError(f"a progress message must be a string or None, not "
                            f"{type(message).__name__}")
        await self._report(float(percent), message)

    def progress_from_thread(self, percent: float, message: str | None = None) -> None:
        """``progress`` for plain (thread) modules: blocks until the report is stored."""
        anyio.from_thread.run(self.progress, percent, message)


def _note_kind_of_func(module: Module, _attribute: object, func: ProcessFunc) -> ProcessFunc:
    module.is_async = inspect.iscoroutinefunction(func)
    return func


@attrs.define(eq=False)
class Module:
    """A registered unit of work. Create with the ``@module`` decorator."""

    name: str
    kinds: tuple[str, ...]
    func: ProcessFunc = attrs.field(repr=False, on_setattr=_note_kind_of_func)
    capacity: int = 8
    timeout: float | None = None
    max_attempts: int | None = None
    health_func: HealthFunc | None = attrs.field(default=None, repr=False)
    description: str = ""
    #: JSON Schema every payload of this module's kinds must meet (checked at submission)
    payload_schema: Mapping[str, Any] | None = attrs.field(default=None, repr=False)
    #: this module's retry backoff (first delay, longest delay), instead of the settings'
    retry_base_seconds: float | None = None
    retry_cap_seconds: float | None = None

    #: whether ``func`` is an ``async def``: looked up once (and again when ``func`` is
    #: set), not for every robot run
    is_async: bool = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.is_async = inspect.iscoroutinefunction(self.func)

    def health_check(self, func: HealthFunc) -> HealthFunc:
        """Decorator: attach a health check (``() -> bool``, sync or async) to this module."""
        self.health_func = func
        return func

    async def run(self, robot: Robot, ctx: ModuleContext) -> JSONObject:
        """Run the function; a plain function goes to a worker thread."""
        if self.is_async:
            result = await self.func(robot, ctx)  # type: ignore[misc]
        else:
            result = await anyio.to_thread.run_sync(
                self.func, robot, ctx, abandon_on_cancel=True
            )
        if result is None:
            return {}
        if not isinstance(result, dict):
            raise TypeError(
                f"module {self.name!r} returned {type(result).__name__}; it must return a dict"
            )
        try:
            text = json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"module {self.name!r} returned a result that is not JSON: {exc}"
            ) from None
        if "\\u0000" in text:  # PostgreSQL's jsonb cannot hold it; nor do payloads
            raise TypeError(f"module {self.name!r} returned a result with a NUL character "
                            "(U+0000), which is not stored; remove it")
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError as exc:  # neither store can hold it
                raise TypeError(
                    f"module {self.name!r} returned a result with a lone surrogate "
                    f"({text[exc.start]!r}), which is not UTF-8 and is not stored; remove it "
                    "or decode the bytes it came from properly") from None
        return result

    async def check_health(self) -> bool:
        func = self.health_func
        if func is None:
            return True
        outcome = func()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return bool(outcome)


def module(
    name: str,
    *,
    kinds: Sequence[str] | None = None,
    capacity: int = 8,
    timeout: float | None = None,
    max_attempts: int | None = None,
    health_check: HealthFunc | None = None,
    payload_schema: Mapping[str, Any] | None = None,
    retry_base_seconds: float | None = None,
    retry_cap_seconds: float | None = None,
) -> Callable[[ProcessFunc], Module]:
    """Turn ``async def`` or ``def`` ``(robot, ctx) -> dict`` into a Module.

    ``kinds`` defaults to ``[name]``; ``capacity`` bounds robots running at once on this
    module per process; ``timeout`` (seconds) ends an attempt as ``timed_out``;
    ``max_attempts`` overrides the default retry budget; ``payload_schema`` is a JSON
    Schema that every submitted payload must meet (else 422 naming the offending field);
    ``retry_base_seconds`` / ``retry_cap_seconds`` replace ``RFMVP_RETRY_BASE_SECONDS`` /
    ``RFMVP_RETRY_CAP_SECONDS`` for this module's retries.
    """
    kinds = tuple(kinds) if kinds is not None else (name,)
    if not name or not kinds or any(not k for k in kinds):
        raise ValidationError("a module needs a name and at least one non-empty kind")
    if capacity < 1:
        raise ValidationError(f"module {name!r}: capacity must be at least 1")
    if timeout is not None and timeout <= 0:
        raise ValidationError(f"module {name!r}: timeout must be above 0 seconds")
    if max_attempts is not None and max_attempts < 1:
        raise ValidationError(f"module {name!r}: max_attempts must be at least 1")
    for label, seconds in (("retry_base_seconds", retry_base_seconds),
                           ("retry_cap_seconds", retry_cap_seconds)):
        if seconds is not None and not 0 <= seconds < float("inf"):
            raise ValidationError(f"module {name!r}: {label} must be a finite number of "
                                  "seconds of at least 0")
    if payload_schema is not None:
        from .security.schemas import check_schema

        try:
            check_schema(payload_schema, f"module {name!r}")
        except ConfigError as exc:
            raise ValidationError(exc.message) from None

    def wrap(func: ProcessFunc) -> Module:
        doc = inspect.getdoc(func) or ""
        return Module(
            name=name,
            kinds=kinds,
            func=func,
            capacity=capacity,
            timeout=timeout,
            max_attempts=max_attempts,
            health_func=health_check,
            description=doc.split("\n\n")[0],
            payload_schema=payload_schema,
            retry_base_seconds=retry_base_seconds,
            retry_cap_seconds=retry_cap_seconds,
        )

    return wrap
