"""OpenTelemetry export: with OTEL_EXPORTER_OTLP_ENDPOINT set, the services (real processes) send
their spans over OTLP/HTTP, and one SMS is one trace from the webhook through core to the Twilio
send, each span the child of the one before it, each process under its own `service.name`."""

from __future__ import annotations

import gzip
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import Servers, eventually
from tests.faults.conftest import launch_fleet
from tests.twilio_forms import post_twilio, sms_form


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a trace's first span


class OtlpReceiver:
    """A collector's OTLP/HTTP trace endpoint: `POST /v1/traces` with a protobuf
    ExportTraceServiceRequest (https://opentelemetry.io/docs/specs/otlp/#otlphttp-request)."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self.refused: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if (
                    self.path != "/v1/traces"
                    or self.headers.get("Content-Type") != "application/x-protobuf"
                ):
                    receiver.refused.append(f"{self.path} {self.headers.get('Content-Type')}")
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.collect(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep the test's output to what fails

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def collect(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(
                    ExportedSpan(
                        service=attributes.get("service.name", ""),
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                    )
                    for span in scope_spans.spans
                )


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


async def test_one_sms_is_one_exported_trace_from_webhook_through_core_to_the_twilio_send(
    servers: Servers, namespace: str, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms a finished span waits for its batch
        "SWITCHBOARD_LOG_FORMAT": "json",  # lines with their trace_id
    }
    async with launch_fleet(
        servers.nats_url,
        servers.redis_url,
        namespace,
        tmp_path,
        only=("core", "egress", "sms"),
        extra_env=otel,
    ) as fleet:
        sender = "+14155550188"
        webhook = fleet.url("sms") + "/twilio/sms"
        response = await post_twilio(webhook, sms_form("how long do refunds take?", sender))
        assert response.status_code == 200
        await eventually(
            lambda: any(
                r.path.endswith("/Messages.json") and r.form.get("To") == sender
                for r in fleet.fake.requests
            ),
            timeout=30,
            what="the reply SMS at the Twilio fake",
        )

        def first(service: str, name: str) -> ExportedSpan | None:
            """The first span of `service` whose name matches (a regex), in arrival order."""
            return next(
                (s for s in receiver.spans if s.service == service and re.fullmatch(name, s.name)),
                None,
            )

        await eventually(
            lambda: first("switchboard-egress", rf"consume {namespace}\.gw\.out\.sms\.\d+"),
            timeout=30,
            what="egress's span at the OTLP receiver",
        )
    webhook_span = first("switchboard-sms", "POST /twilio/sms")  # not the status callbacks'
    core_span = first("switchboard-core", rf"apply {namespace}\.gw\.in\.sms\.\d+")
    egress_span = first("switchboard-egress", rf"consume {namespace}\.gw\.out\.sms\.\d+")
    assert webhook_span is not None, receiver.spans
    assert core_span is not None, receiver.spans
    assert egress_span is not None
    assert receiver.refused == []
    # One trace, begun at the webhook (no caller's traceparent), each step the child of the last.
    assert {webhook_span.trace_id, core_span.trace_id, egress_span.trace_id} == {
        webhook_span.trace_id
    }
    assert len(webhook_span.trace_id) == 32
    assert webhook_span.parent_span_id == ""
    assert core_span.parent_span_id == webhook_span.span_id
    assert egress_span.parent_span_id == core_span.span_id
    assert len({webhook_span.span_id, core_span.span_id, egress_span.span_id}) == 3
    assert (webhook_span.kind, core_span.kind, egress_span.kind) == (
        Span.SPAN_KIND_SERVER,
        Span.SPAN_KIND_CONSUMER,
        Span.SPAN_KIND_CONSUMER,
    )
    # The trace id in the spans is the one in the services' log lines about this message.
    assert webhook_span.trace_id in (tmp_path / "sms.log").read_text()
    assert webhook_span.trace_id in (tmp_path / "egress.log").read_text()
