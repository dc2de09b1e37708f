"""Typed event payloads: every event type goes on the wire in exactly the shape consumers have
always decoded, and consumers stay lenient about types they do not know."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, get_args

import msgspec
import pytest

from shared import events as ev
from shared.events import Event, EventData, EventType, make_event, type_of, typed_data

AT = datetime(2026, 11, 29, 12, 30, 15, 123000, tzinfo=UTC)

# Each payload beside the `data` dict producers wrote by hand before the typed payloads existed.
CASES: list[tuple[EventData, dict[str, Any]]] = [
    (
        ev.TurnCreated(
            seq=3, role="user", turn_id="t1", author="end_user", channel="sms", text="hi"
        ),
        {
            "seq": 3,
            "role": "user",
            "turn_id": "t1",
            "author": "end_user",
            "channel": "sms",
            "text": "hi",
        },
    ),
    (
        ev.ConversationCreated(
            channel="api", end_user_id="u1", agent_id="a1", pinned_revision_id="r1"
        ),
        {"channel": "api", "end_user_id": "u1", "agent_id": "a1", "pinned_revision_id": "r1"},
    ),
    (
        ev.ConversationStatusChanged(from_="active", to="closed", reason="done"),
        {"from": "active", "to": "closed", "reason": "done"},
    ),
    (
        ev.HandoffStarted(reason="asked", seq=4, handoff_id="h1"),
        {"reason": "asked", "seq": 4, "handoff_id": "h1"},
    ),
    (
        ev.HandoffAssigned(handoff_id="h1", assignee="k1", assignee_name=None, reassigned=False),
        {"handoff_id": "h1", "assignee": "k1", "assignee_name": None, "reassigned": False},
    ),
    (
        ev.HandoffResolved(handoff_id="h1", outcome="closed"),
        {"handoff_id": "h1", "outcome": "closed"},
    ),
    (
        ev.HandoffUnclaimed(handoff_id="h1", requested_at=AT.isoformat()),
        {"handoff_id": "h1", "requested_at": AT.isoformat()},
    ),
    (
        ev.ApprovalRequested(
            approval_id="ap1",
            tool="refund",
            arguments={"amount": 5, "n": [1]},
            approver_role="operator",
            timeout_at=AT.isoformat(),
        ),
        {
            "approval_id": "ap1",
            "tool": "refund",
            "arguments": {"amount": 5, "n": [1]},
            "approver_role": "operator",
            "timeout_at": AT.isoformat(),
        },
    ),
    (
        ev.ApprovalResolved(approval_id="ap1", status="approved", note=None, reviewer_name="Ann"),
        {"approval_id": "ap1", "status": "approved", "note": None, "reviewer_name": "Ann"},
    ),
    (
        ev.ApprovalCancelled(approval_id="ap1", reason="conversation_closed"),
        {"approval_id": "ap1", "reason": "conversation_closed"},
    ),
    (
        ev.AgentFailed(runtime="builtin", reason="timeout", attempts=2, seq=5),
        {"runtime": "builtin", "reason": "timeout", "attempts": 2, "seq": 5},
    ),
    (ev.VoiceTransferUnavailable(), {}),
    (
        ev.EndUserOptedOut(channel="sms", end_user_id="u1", our_address="+15550001"),
        {"channel": "sms", "end_user_id": "u1", "our_address": "+15550001"},
    ),
    (
        ev.EndUserOptedIn(channel="sms", end_user_id="u1", our_address="+15550001"),
        {"channel": "sms", "end_user_id": "u1", "our_address": "+15550001"},
    ),
    (
        ev.EndUserHelpRequested(channel="sms", end_user_id="u1", our_address=""),
        {"channel": "sms", "end_user_id": "u1", "our_address": ""},
    ),
    (
        ev.MessageStatus(provider_id="SM1", status="failed", error_code="30003", turn_id=None),
        {"provider_id": "SM1", "status": "failed", "error_code": "30003", "turn_id": None},
    ),
    (
        ev.DeliveryFailed(turn_id="t1", channel="email", seq=2, reason="550", attempts=3),
        {"turn_id": "t1", "channel": "email", "seq": 2, "reason": "550", "attempts": 3},
    ),
    (
        ev.EmailBounced(message_id="<b@x>", message_ids=["<m@y>"], failed_turns=["t1"]),
        {"message_id": "<b@x>", "message_ids": ["<m@y>"], "failed_turns": ["t1"]},
    ),
    (
        ev.EmailAutoReplyDropped(message_id=None, reason="auto_submitted"),
        {"message_id": None, "reason": "auto_submitted"},
    ),
    (
        ev.EndUserIdentityLinked(
            end_user_id="u1", identity=ev.IdentityRef(kind="email", value="a@b.c")
        ),
        {"end_user_id": "u1", "identity": {"kind": "email", "value": "a@b.c"}},
    ),
    (
        ev.EndUserErased(end_user_id="u1", conversations=2, turns=9, stream_messages=4),
        {"end_user_id": "u1", "conversations": 2, "turns": 9, "stream_messages": 4},
    ),
    (
        ev.ConversationErased(conversation_id="c1", reason="retention", turns=7),
        {"conversation_id": "c1", "reason": "retention", "turns": 7},
    ),
]


def test_every_event_type_has_a_case_and_a_payload_class() -> None:
    tags = {cls.__struct_config__.tag for cls in get_args(EventData)}
    assert tags == set(get_args(EventType))
    assert {type_of(data) for data, _ in CASES} == tags


@pytest.mark.parametrize(
    ("data", "old"), CASES, ids=lambda x: type_of(x) if isinstance(x, msgspec.Struct) else ""
)
def test_wire_bytes_are_the_old_shape_and_decode_back(data: EventData, old: dict[str, Any]) -> None:
    meta: dict[str, Any] = dict(
        id="evt_1", occurred_at=AT, conversation_id="c1", session_type="live", actor="agent"
    )
    wire = msgspec.json.encode(make_event(data, **meta))
    # What producers sent before: the generic event with a hand-written dict, byte for byte.
    assert wire == msgspec.json.encode(Event(type=type_of(data), data=old, **meta))
    assert list(msgspec.json.decode(wire)) == [
        "id",
        "v",
        "type",
        "occurred_at",
        "conversation_id",
        "session_type",
        "actor",
        "data",
    ]
    decoded = msgspec.json.decode(wire, type=Event)
    assert typed_data(decoded) == data


def test_an_unknown_type_still_decodes_generically() -> None:
    wire = (
        b'{"id":"evt_9","v":1,"type":"future.thing","occurred_at":"2026-11-29T12:00:00Z",'
        b'"conversation_id":null,"session_type":"live","actor":"x","data":{"new":[1,2]},"extra":1}'
    )
    event = msgspec.json.decode(wire, type=Event)
    assert event.type == "future.thing"
    assert event.data == {"new": [1, 2]}
    assert typed_data(event) is None


def test_a_known_type_with_a_payload_that_does_not_fit_falls_back_to_none() -> None:
    event = Event(id="e", type="handoff.resolved", occurred_at=AT, data={"outcome": 5})
    assert typed_data(event) is None
    # Fields a newer producer added are ignored, not refused.
    newer = Event(
        id="e",
        type="handoff.resolved",
        occurred_at=AT,
        data={"handoff_id": "h1", "outcome": "closed", "added_later": True},
    )
    assert typed_data(newer) == ev.HandoffResolved(handoff_id="h1", outcome="closed")


def test_the_operators_turn_notice_is_turn_created_with_the_seq_alone() -> None:
    notice = make_event(ev.TurnNotice(seq=4), id="evt_turn.created_t1", occurred_at=AT)
    assert msgspec.json.encode(notice) == msgspec.json.encode(
        Event(id="evt_turn.created_t1", type="turn.created", occurred_at=AT, data={"seq": 4})
    )
    assert typed_data(notice) is None  # not a whole turn.created: no consumer mistakes it for one
