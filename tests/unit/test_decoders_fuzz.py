"""Every decoder of a bus message, fed generated garbage and near-valid documents: it returns a
value of its type or says `Undeliverable` (dead-lettered with the reason); nothing else escapes."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bus import Undeliverable, decode_or_dead
from shared.envelopes import (
    Command,
    CommandResult,
    DeadLetter,
    Event,
    InboundEnvelope,
    OutboundEnvelope,
    StreamDelta,
    TurnReply,
)
from shared.models import utcnow
from tests.unit.envelopes_samples import message_in, reply_out

TYPES: dict[str, Any] = {
    "inbound": InboundEnvelope,
    "outbound": OutboundEnvelope,
    "event": Event,
    "reply": TurnReply,
    "delta": StreamDelta,
    "dead": DeadLetter,
    "command": Command,
    "result": CommandResult,
}
SAMPLES: dict[str, Any] = {
    "inbound": message_in(),
    "outbound": reply_out(),
    "event": Event(id="evt_1", type="turn.created", occurred_at=utcnow(), data={"seq": 1}),
    "reply": TurnReply(
        envelope_id="env_1", conversation_id="conv_1", outcome="queued", session_status="active"
    ),
    "delta": StreamDelta(envelope_id="env_1", text="he"),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)
DECODERS = {name: msgspec.json.Decoder(t) for name, t in TYPES.items()}


def decodes_or_is_undeliverable(name: str, data: bytes) -> None:
    reason = ""
    try:
        value = decode_or_dead(DECODERS[name], data)
    except Undeliverable as exc:
        reason = exc.reason
    else:
        assert value is not None
        return
    assert reason.startswith("undecodable")


@pytest.mark.parametrize("name", sorted(TYPES))
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes(name: str, data: bytes) -> None:
    decodes_or_is_undeliverable(name, data)


@pytest.mark.parametrize("name", sorted(TYPES))
@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_arbitrary_json(name: str, value: Any) -> None:
    decodes_or_is_undeliverable(name, msgspec.json.encode(value))


@pytest.mark.parametrize("name", sorted(SAMPLES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_valid_message_with_one_field_replaced(name: str, data: st.DataObject) -> None:
    doc = msgspec.to_builtins(SAMPLES[name])
    field = data.draw(st.sampled_from(sorted(doc)), label="field")
    doc[field] = data.draw(json_values, label="value")
    decodes_or_is_undeliverable(name, msgspec.json.encode(doc))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_samples_themselves_round_trip(name: str) -> None:
    sample = SAMPLES[name]
    assert DECODERS[name].decode(msgspec.json.encode(sample)) == sample


@pytest.mark.parametrize("name", sorted(TYPES))
def test_bytes_that_are_not_utf8_inside_a_string(name: str) -> None:
    # msgspec raises UnicodeDecodeError here, not a DecodeError; random bytes rarely reach it.
    decodes_or_is_undeliverable(name, b'{"id":"\xff\xfe","type":"x"}')
