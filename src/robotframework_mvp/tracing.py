"""Optional OpenTelemetry spans around the timed steps of the request flow.

This module owns the only import of ``opentelemetry``: when ``opentelemetry-api`` is
installed (the ``otel`` extra), ``default_tracer()`` returns the global tracer of the
instrumentation scope ``robotframework_mvp``, and ``PerformanceTracker.measure`` opens one
span per step, named after its operation (``security.validate``, ``module.process`` ...).
Without the package, or with a tracker built with ``tracer=None``, nothing is
traced and measuring costs what it did before. Configure exporters the OpenTelemetry way
(an SDK ``TracerProvider`` set globally by the application); until one is set the API's
tracer is a no-op.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Protocol

__all__ = ["SpanScope", "Tracer", "default_tracer", "is_noop", "record_span", "refresh",
           "start_span"]

SCOPE = "robotframework_mvp"


class Tracer(Protocol):
    """The part of ``opentelemetry.trace.Tracer`` used here."""

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> Any: ...


def default_tracer() -> Tracer | None:
    """The OpenTelemetry tracer of this package, or None when the API is not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    tracer: Tracer = trace.get_tracer(SCOPE)
    return tracer


class SpanScope:
    """A started span made current until ``close``; an ``Exception`` marks it as an error.

    Cancellation and other ``BaseException``s end the span without an error status, as
    the tracker does not count them as errors either.
    """

    __slots__ = ("_span", "_token")

    def __init__(self, span: Any, token: object) -> None:
        self._span = span
        self._token = token

    def close(self, exc: BaseException | None) -> None:
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        span = self._span
        try:
            if isinstance(exc, Exception) and span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        finally:
            try:
                context.detach(self._token)  # type: ignore[arg-type]
            finally:
                span.end()


class _GlobalProvider:
    """Whether the global tracer provider records nothing, looked up at most once a second
    (the lookup reads ``os.environ``): a provider set later is honoured within a second."""

    __slots__ = ("checked_at", "noop")

    def __init__(self) -> None:
        self.checked_at = float("-inf")
        self.noop = True

    def is_noop(self) -> bool:
        now = time.monotonic()
        if now - self.checked_at >= 1.0:
            trace = _trace_api()
            self.noop = isinstance(trace.get_tracer_provider(),
                                   trace.ProxyTracerProvider | trace.NoOpTracerProvider)
            self.checked_at = now
        return self.noop


_global_provider = _GlobalProvider()


def refresh() -> None:
    """Look the global provider up again at the next span (a new tracker does this)."""
    _global_provider.checked_at = float("-inf")


def is_noop(tracer: Tracer) -> bool:
    """Whether ``tracer`` records nothing: the API's tracer while no SDK provider is set.

    Until one is set, a measured step costs a type check instead of a span (~10 us a
    robot); a provider the application sets later is honoured within a second.
    """
    trace = _trace_api()
    cls = type(tracer)  # the exact type first: isinstance on these ABCs costs a microsecond
    if cls is trace.ProxyTracer:
        return _global_provider.is_noop()
    if cls is trace.NoOpTracer or isinstance(tracer, trace.NoOpTracer):
        return True
    return isinstance(tracer, trace.ProxyTracer) and _global_provider.is_noop()


@functools.cache
def _trace_api() -> Any:
    """``opentelemetry.trace``, imported once (only ever called with a tracer in hand)."""
    from opentelemetry import trace

    return trace


def start_span(tracer: Tracer, name: str) -> SpanScope | None:
    """Start ``name`` as a child of the current span and make it current (None: no-op)."""
    if is_noop(tracer):
        return None
    from opentelemetry import context, trace

    span = tracer.start_span(name, attributes={"rfmvp.operation": name})
    token = context.attach(trace.set_span_in_context(span))
    return SpanScope(span, token)


def record_span(tracer: Tracer, name: str, start_ns: int, end_ns: int, *,
                error: bool = False, attributes: dict[str, Any] | None = None) -> None:
    """A finished span from ``start_ns`` to ``end_ns`` (``time.time_ns()``), for a step
    that is timed by hand rather than by ``measure`` (one that records only some calls)."""
    if is_noop(tracer):
        return
    from opentelemetry.trace import Status, StatusCode

    span = tracer.start_span(name, start_time=start_ns,
                             attributes={"rfmvp.operation": name, **(attributes or {})})
    if error:
        span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=end_ns)
