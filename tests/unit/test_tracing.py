"""W3C traceparent parsing, trace context in headers, and trace ids in JSON log lines."""

from __future__ import annotations

import json
import logging

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
