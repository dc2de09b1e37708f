"""Structured JSON logs and Prometheus metrics, configured the same way in every service."""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shared import tracing

_encoder = msgspec.json.Encoder()
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra={...}` fields (conversation_id, envelope_id, …) ride along."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


# Libraries that log peers' addresses, request lines or headers at INFO (aiosmtpd logs every
# MAIL FROM / RCPT TO): kept at WARNING so no phone number or address reaches an INFO log.
NOISY_LIBRARIES = ("nats", "uvicorn.access", "aiosmtpd", "mail.log", "httpx", "httpcore", "twilio")


def quiet_libraries() -> None:
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s %(message)s")
        )
    tracing.install_log_records()  # records made inside a trace carry `trace_id`
    tracing.set_service(service)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries()
    logging.getLogger("switchboard").info("logging configured", extra={"service": service})


class Metrics:
    """Every metric a service exports, on a registry of its own (tests build many apps per process)."""

    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.service = service
        self.messages = Counter(
            "switchboard_messages_total",
            "Messages handled, by stage and outcome.",
            ["stage", "channel", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "switchboard_stage_seconds",
            "Time spent per stage.",
            ["stage"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.dead_letters = Counter(
            "switchboard_dead_letters_total",
            "Messages sent to the DEAD stream.",
            ["reason"],
            registry=self.registry,
        )

        self.provider_down = Gauge(
            "switchboard_provider_down",
            "1 while a provider (SMTP relay, Twilio, a webhook endpoint) refuses deliveries.",
            ["provider"],
            registry=self.registry,
        )
        self.provider_refusals = Counter(
            "switchboard_provider_refusals_total",
            "Delivery attempts a provider refused for now (the message was held).",
            ["provider"],
            registry=self.registry,
        )
        # Children by label values: prometheus_client's `.labels(...)` checks and formats the
        # values and takes a lock on every call; a service on its hot path asks for a handful.
        self._counted: dict[tuple[str, str, str], Any] = {}
        self._timed: dict[str, Any] = {}

    def count(self, stage: str, channel: str, outcome: str) -> None:
        """`messages.labels(stage, channel, outcome).inc()`, with the child kept."""
        key = (stage, channel, outcome)
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = self.messages.labels(stage, channel, outcome)
        child.inc()

    def observe(self, stage: str, seconds: float) -> None:
        """`latency.labels(stage).observe(seconds)`, with the child kept."""
        child = self._timed.get(stage)
        if child is None:
            child = self._timed[stage] = self.latency.labels(stage)
        child.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
