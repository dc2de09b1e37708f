"""Provider outages as operators see them: one line when it begins, one when it ends, and the
Prometheus gauge and counter in between."""

from __future__ import annotations

import logging

import pytest

from services.egress.outages import Outages
from shared.telemetry import Metrics


def test_an_outage_is_two_log_lines_and_a_gauge(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics("egress")
    outages = Outages(metrics)
    with caplog.at_level(logging.DEBUG, logger="switchboard.egress.outages"):
        for _ in range(5):
            outages.failed("Twilio Messaging", "HTTP 503, error 20500")
        down = metrics.render().decode()
        outages.recovered("Twilio Messaging")
        outages.recovered("Twilio Messaging")  # answering while up is no event
    assert 'switchboard_provider_down{provider="Twilio Messaging"} 1.0' in down
    assert 'switchboard_provider_refusals_total{provider="Twilio Messaging"} 5.0' in down
    assert 'switchboard_provider_down{provider="Twilio Messaging"} 0.0' in metrics.render().decode()
    notable = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage().split(" (")[0] for r in notable] == [
        "provider outage begins: Twilio Messaging",
        "provider outage ends: Twilio Messaging answers again after 0s",
    ]
    assert notable[0].__dict__["console"].endswith("(HTTP 503, error 20500); holding its messages")
    assert "(5 attempts held)" in notable[1].getMessage()
