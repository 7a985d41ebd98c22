"""OpenTelemetry spans for traced connections (the extra ``aiomas[otel]``).

A client span per call and a server span per request served; the W3C
``traceparent`` of the client span travels in the request's ``"trace"``
metadata (feature ``"trace"`` of the wire extension), so the server span is
its child.  Imported only when a :class:`~aiomas.tracing.Tracer` is made with
``otel=``.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)
from opentelemetry.trace.status import Status, StatusCode

_PROPAGATOR = TraceContextTextMapPropagator()
_MAX_TRACEPARENT = 256


class OtelBridge:
    """Makes the spans of a tracer's connections.

    Args:
        provider: A ``TracerProvider`` (default: the global one).
    """

    __slots__ = ("_tracer",)

    def __init__(self, provider: Any = None) -> None:
        self._tracer = trace.get_tracer("aiomas", tracer_provider=provider)

    def start_client(self, path: str | None, attributes: dict[str, Any]) -> Any:
        """Start the span of a call (the current span is its parent)."""
        return self._tracer.start_span(
            f"aiomas {path or 'request'}",
            kind=trace.SpanKind.CLIENT,
            attributes=attributes,
        )

    def traceparent(self, span: Any) -> str | None:
        """The W3C ``traceparent`` of *span*."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent")

    def start_server(
        self, path: str | None, traceparent: Any, attributes: dict[str, Any]
    ) -> Any:
        """Start the span of a request served; its parent is the caller's
        span if *traceparent* names one (anything else is ignored)."""
        parent = None
        if type(traceparent) is str and len(traceparent) <= _MAX_TRACEPARENT:
            parent = _PROPAGATOR.extract({"traceparent": traceparent})
        return self._tracer.start_span(
            f"aiomas {path or 'request'}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )

    def enter(self, span: Any) -> object:
        """Make *span* the current one (until :meth:`leave`)."""
        return otel_context.attach(trace.set_span_in_context(span))

    def leave(self, token: Any) -> None:
        otel_context.detach(token)

    def end(self, span: Any, outcome: str | None) -> None:
        """End *span* with *outcome* (see the record format)."""
        if outcome is not None:
            span.set_attribute("aiomas.outcome", outcome)
            if outcome != "result":
                span.set_status(Status(StatusCode.ERROR, outcome))
        span.end()
