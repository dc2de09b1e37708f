"""One trace per inbound message: the SMS webhook, core and egress log it under one trace id."""

from __future__ import annotations

import logging

import pytest

from tests.conftest import Stack, eventually
from tests.integration.test_sms import post_signed, sent_messages
from tests.twilio_forms import ALICE, sms_form


def _records(caplog: pytest.LogCaptureFixture, service: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(f"switchboard.{service}")]


async def test_one_sms_logs_one_trace_id_from_webhook_to_twilio_send(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    sender = "+14155550177"
    response = await post_signed(stack, "/twilio/sms", sms_form("do you ship abroad?", sender))
    assert response.status_code == 200
    await eventually(lambda: sent_messages(stack, to=sender), what="the reply SMS")
    # egress logs the send once Twilio has answered and the delivery is recorded
    await eventually(
        lambda: any(r.getMessage() == "sms sent" for r in _records(caplog, "egress")),
        what="egress's log line",
    )
    accepted = [r for r in _records(caplog, "sms") if r.getMessage() == "sms accepted"]
    assert len(accepted) == 1
    trace_id = getattr(accepted[0], "trace_id", None)
    assert isinstance(trace_id, str)
    assert len(trace_id) == 32
    opened = [r for r in _records(caplog, "core") if r.getMessage() == "conversation opened"]
    sent = [r for r in _records(caplog, "egress") if r.getMessage() == "sms sent"]
    assert [getattr(r, "trace_id", None) for r in opened] == [trace_id]
    assert [getattr(r, "trace_id", None) for r in sent] == [trace_id]
    # Every core and egress line about this conversation carries the same trace.
    cid = opened[0].__dict__["conversation_id"]
    about_it = [
        r
        for r in _records(caplog, "core") + _records(caplog, "egress")
        if r.__dict__.get("conversation_id") == cid
    ]
    assert {getattr(r, "trace_id", None) for r in about_it} == {trace_id}


async def test_a_callers_traceparent_is_continued(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    form = sms_form("hello again", ALICE)
    response = await post_signed(stack, "/twilio/sms", form, traceparent=upstream)
    assert response.status_code == 200
    accepted = [r for r in _records(caplog, "sms") if r.getMessage() == "sms accepted"]
    assert [getattr(r, "trace_id", None) for r in accepted] == ["0af7651916cd43dd8448eb211c80319c"]
