"""One trace per inbound message, across processes (W3C Trace Context, `traceparent`).

An ingress starts the trace when a message arrives (or continues the caller's `traceparent`); the
bus puts the current `traceparent` in the NATS headers of everything published while it is
current, and a consumer makes the message's trace current while its handler runs. Every log record
made meanwhile carries `trace_id`, so one query by trace id shows an SMS from the webhook to the
Twilio send. https://www.w3.org/TR/trace-context/#traceparent-header

With `OTEL_EXPORTER_OTLP_ENDPOINT` set, each ingress request and each consumed message is also
exported over OTLP/HTTP as a span of that trace, the child of the span whose `traceparent` it
carried, under `service.name` `switchboard-<service>`; a span never becomes the child of one that
merely happens to be current, so the exported traces are the ones in the logs.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

HEADER = "traceparent"
_FORMAT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
log = logging.getLogger("switchboard.tracing")


@dataclass(frozen=True)
class TraceContext:
    trace_id: str  # 32 hex
    span_id: str  # 16 hex: this process's step of the trace
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        return TraceContext(self.trace_id, _hex(8), self.flags)


def _hex(nbytes: int) -> str:
    return os.urandom(nbytes).hex()


def parse(traceparent: str | None) -> TraceContext | None:
    """A valid version-00 `traceparent`, or None (an invalid one is ignored, as the spec says)."""
    match = _FORMAT.match((traceparent or "").strip().lower())
    if match is None or set(match[1]) == {"0"} or set(match[2]) == {"0"}:
        return None
    return TraceContext(match[1], match[2], match[3])


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "switchboard_trace", default=None
)


def current() -> TraceContext | None:
    return _current.get()


def current_trace_id() -> str | None:
    trace = _current.get()
    return trace.trace_id if trace else None


def headers() -> dict[str, str]:
    """The trace headers for a message published now (none outside a trace)."""
    trace = _current.get()
    return {HEADER: trace.traceparent} if trace else {}


# What an exported span is to its trace: an ingress request served, a message consumed, …
SpanKind = Literal["server", "consumer", "internal"]


@contextlib.contextmanager
def traced(
    name: str, parent: str | Mapping[str, str] | None = None, kind: SpanKind | None = None
) -> Iterator[TraceContext]:
    """Make a trace current for the block: the parent's (a `traceparent` or headers holding one)
    continued with a new span, or a new trace when there is none or it is invalid. The span is a
    `consumer` one for a message's headers, `internal` otherwise, unless `kind` says."""
    if kind is None:
        kind = "internal" if parent is None or isinstance(parent, str) else "consumer"
    if parent is not None and not isinstance(parent, str):
        parent = parent.get(HEADER) or parent.get(HEADER.title())
    upstream = parse(parent)
    with _export_span(name, upstream, kind) as exported:
        if exported is not None:
            trace = exported
        elif upstream is not None:
            trace = upstream.child()
        else:
            trace = TraceContext(_hex(16), _hex(8))
        token = _current.set(trace)
        try:
            yield trace
        finally:
            _current.reset(token)


# Logging: every record made while a trace is current carries its id --------------------------

_previous_factory = logging.getLogRecordFactory()


def _record_with_trace(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _previous_factory(*args, **kwargs)
    trace = _current.get()
    if trace is not None and not hasattr(record, "trace_id"):
        record.trace_id = trace.trace_id
    return record


def install_log_records() -> None:
    """Stamp `trace_id` on log records (idempotent; also covers records that tests capture)."""
    if logging.getLogRecordFactory() is not _record_with_trace:
        logging.setLogRecordFactory(_record_with_trace)


install_log_records()


# Optional OpenTelemetry export ------------------------------------------------------------------

_tracer: Tracer | None = None
_otel_checked = False
_service_name = "switchboard"


def set_service(name: str) -> None:
    """The `service.name` of exported spans (OTEL_SERVICE_NAME wins when set)."""
    global _service_name
    _service_name = f"switchboard-{name}"


def _otel_tracer() -> Tracer | None:
    """The OTLP-exporting tracer, built on first use when OTEL_EXPORTER_OTLP_ENDPOINT (or
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, a full URL for traces alone) is set.

    The exporter reads the standard variables itself (OTEL_EXPORTER_OTLP_HEADERS, …_TIMEOUT,
    …_COMPRESSION; OTEL_BSP_SCHEDULE_DELAY for how long spans wait to be sent in a batch)."""
    global _tracer, _otel_checked
    if _otel_checked:
        return _tracer
    _otel_checked = True
    if not (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None  # the SDK's own off switch: its spans would carry no ids at all
    # Imported only now: without the variable, nothing of OpenTelemetry is loaded.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME", _service_name)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    atexit.register(provider.shutdown)  # spans still batched go out when the process ends
    _tracer = provider.get_tracer("switchboard")
    return _tracer


@contextlib.contextmanager
def _export_span(
    name: str, upstream: TraceContext | None, kind: SpanKind
) -> Iterator[TraceContext | None]:
    """An exported span for the block when OpenTelemetry is on; yields its context (or None)."""
    tracer = _otel_tracer()
    if tracer is None:
        yield None
        return
    from opentelemetry import trace as otel
    from opentelemetry.context import Context

    # The upstream process's span is this span's parent; without one the span starts a new
    # trace, as it does without OpenTelemetry (never a child of whatever span is current).
    context = Context()
    if upstream is not None:
        parent = otel.SpanContext(
            int(upstream.trace_id, 16),
            int(upstream.span_id, 16),
            is_remote=True,
            trace_flags=otel.TraceFlags(int(upstream.flags, 16)),
        )
        context = otel.set_span_in_context(otel.NonRecordingSpan(parent), context)
    with tracer.start_as_current_span(
        name, context=context, kind=otel.SpanKind[kind.upper()]
    ) as span:
        ids = span.get_span_context()  # a new trace's id is the one OpenTelemetry chose
        yield TraceContext(f"{ids.trace_id:032x}", f"{ids.span_id:016x}", f"{ids.trace_flags:02x}")
