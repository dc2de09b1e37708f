"""W3C traceparent parsing, trace context in headers, and trace ids in JSON log lines."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from shared import tracing
from shared.telemetry import JsonFormatter

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_a_valid_traceparent_is_parsed_and_invalid_ones_are_ignored() -> None:
    parsed = tracing.parse(PARENT)
    assert parsed is not None
    assert (parsed.trace_id, parsed.span_id, parsed.flags) == (
        "0af7651916cd43dd8448eb211c80319c",
        "b7ad6b7169203331",
        "01",
    )
    for bad in ("", "garbage", "01-" + PARENT[3:], "00-" + "0" * 32 + "-b7ad6b7169203331-01"):
        assert tracing.parse(bad) is None


def test_a_trace_continues_its_parent_with_a_new_span_and_ends_with_the_block() -> None:
    assert tracing.headers() == {}
    with tracing.traced("step", {"traceparent": PARENT}) as trace:
        assert trace.trace_id == "0af7651916cd43dd8448eb211c80319c"
        assert trace.span_id != "b7ad6b7169203331"
        assert tracing.headers() == {"traceparent": trace.traceparent}
    assert tracing.current() is None


def test_without_a_parent_a_new_trace_starts() -> None:
    with tracing.traced("ingress", None) as first, tracing.traced("ingress", "junk") as second:
        assert len(first.trace_id) == 32
        assert second.trace_id != first.trace_id


def test_json_log_lines_made_inside_a_trace_carry_its_id() -> None:
    logger = logging.getLogger("switchboard.test")
    with tracing.traced("ingress", PARENT):
        inside = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "hello", (), None)
    outside = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "hello", (), None)
    assert json.loads(JsonFormatter().format(inside))["trace_id"] == PARENT[3:35]
    assert "trace_id" not in json.loads(JsonFormatter().format(outside))


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    """Export on, into memory: the tracer OTEL_EXPORTER_OTLP_ENDPOINT would build, minus OTLP."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_otel_checked", True)
    return spans


def test_exported_spans_are_the_trace_continue_their_parent_and_say_their_kind(
    exported: InMemorySpanExporter,
) -> None:
    with tracing.traced("POST /twilio/sms", None, "server") as ingress:
        with tracing.traced("consume gw.out.sms.1", tracing.headers()) as consumer:
            pass
        # No parent given: a trace of its own, as without export, not a child of the request.
        with tracing.traced("smtp DATA") as unrelated:
            pass
    spans = {s.name: s for s in exported.get_finished_spans()}
    first, second, third = (
        spans["POST /twilio/sms"],
        spans["consume gw.out.sms.1"],
        spans["smtp DATA"],
    )
    assert first.context is not None
    assert (f"{first.context.trace_id:032x}", f"{first.context.span_id:016x}") == (
        ingress.trace_id,
        ingress.span_id,
    )
    assert first.parent is None
    assert consumer.trace_id == ingress.trace_id
    assert second.parent is not None
    assert f"{second.parent.span_id:016x}" == ingress.span_id
    assert unrelated.trace_id != ingress.trace_id
    assert third.parent is None
    assert (first.kind, second.kind, third.kind) == (
        SpanKind.SERVER,
        SpanKind.CONSUMER,
        SpanKind.INTERNAL,
    )


def test_no_export_without_the_endpoint_or_with_the_sdk_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing, "_tracer", None)
    monkeypatch.setattr(tracing, "_otel_checked", False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing._otel_tracer() is None
    monkeypatch.setattr(tracing, "_otel_checked", False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing._otel_tracer() is None
