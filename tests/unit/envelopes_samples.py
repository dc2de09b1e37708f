"""One valid envelope of each common kind, for tests that need one and care about a field or two."""

from __future__ import annotations

from typing import Any

from shared.envelopes import InboundMessage, OutboundEnvelope
from shared.identity import make_identifier
from shared.models import utcnow

END_USER, OUR_NUMBER = "+14155550109", "+15550001111"


def message_in(**fields: Any) -> InboundMessage:
    """A message from the end user (an SMS to our number unless `fields` say otherwise)."""
    defaults: dict[str, Any] = {
        "id": "env_1",
        "channel": "sms",
        "received_at": utcnow(),
        "text": "hi",
        "sender": make_identifier("phone", END_USER),
        "recipient": OUR_NUMBER,
    }
    return InboundMessage(**(defaults | fields))


def reply_out(**fields: Any) -> OutboundEnvelope:
    """The agent's SMS reply to the end user; `fields` replace or add to the defaults."""
    defaults: dict[str, Any] = {
        "id": "out_1",
        "channel": "sms",
        "conversation_id": "conv_1",
        "turn_id": "turn_1",
        "seq": 2,
        "session_type": "live",
        "text": "hello",
        "recipient": END_USER,
        "sender": OUR_NUMBER,
        "created_at": utcnow(),
    }
    return OutboundEnvelope(**(defaults | fields))
