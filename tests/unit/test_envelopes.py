"""Bus messages: versioned, tagged by kind, lenient to fields added by newer services."""

import msgspec
import pytest

from shared.bus import Undeliverable, decode_or_dead
from shared.envelopes import CallEnded, Identifier, InboundEnvelope, InboundMessage
from shared.models import utcnow

decoder = msgspec.json.Decoder(InboundEnvelope)


def message(**extra: object) -> InboundMessage:
    return InboundMessage(
        id="env_1",
        channel="sms",
        received_at=utcnow(),
        text="hi",
        sender=Identifier(kind="phone", raw="415 555 0109", normalized="+14155550109"),
        recipient="+15550001111",
        **extra,
    )  # type: ignore[arg-type]


def test_round_trip_keeps_the_kind() -> None:
    env = message(provider_id="SM1")
    decoded = decoder.decode(msgspec.json.encode(env))
    assert decoded == env
    assert b'"kind":"message"' in msgspec.json.encode(env)


def test_kinds_decode_to_their_own_types() -> None:
    ended = CallEnded(id="env_2", channel="voice", received_at=utcnow(), reason="busy")
    assert isinstance(decoder.decode(msgspec.json.encode(ended)), CallEnded)


def test_unknown_fields_from_a_newer_producer_are_ignored() -> None:
    raw = msgspec.json.decode(msgspec.json.encode(message()))
    raw["a_field_from_the_future"] = {"x": 1}
    assert decoder.decode(msgspec.json.encode(raw)).text == "hi"


def test_routing_key_orders_by_conversation_or_by_sender_and_recipient() -> None:
    assert message().routing_key == "+14155550109|+15550001111"
    api = InboundMessage(
        id="e", channel="api", received_at=utcnow(), text="x", conversation_id="conv_1"
    )
    assert api.routing_key == "conv_1"


@pytest.mark.parametrize(
    "data", [b"", b"{", b'{"kind":"nope","id":"x"}', b'{"kind":"message"}', b"\xff\xfe", b"[]"]
)
def test_undecodable_messages_are_undeliverable_not_retried(data: bytes) -> None:
    with pytest.raises(Undeliverable, match="undecodable"):
        decode_or_dead(decoder, data)
