"""Events: something that happened, for audit, customer webhooks and analytics (`gw.evt.<type>`).

On the wire an event is `{"id","v","type","occurred_at","conversation_id","session_type","actor",
"data":{…}}`. Producers build its `data` from one typed struct per event type (`EventData`, a
tagged union whose tag is the event type); `make_event` lays it out in exactly that shape.
Consumers decode the generic `Event` (`type` a string, `data` a dict), so one running an older
build keeps working when a newer producer adds an event type; `typed_data` gives the typed payload
of a known type, or None. The gateway's own consumers read no payload: webhook fan-out matches
subscriptions by type name and the operators' feed forwards what core chose, both passing the
bytes on as written, so a type or field added later reaches customers and screens untouched.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, cast

import msgspec

from shared.models import Channel, SessionType, Turn

SCHEMA_VERSION = 1


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """The generic shape every consumer decodes (webhook egress, audit log, console feed)."""

    id: str
    v: int = SCHEMA_VERSION
    type: str
    occurred_at: datetime
    conversation_id: str | None = None
    session_type: SessionType | None = None
    actor: str = "system"
    data: dict[str, Any] = {}


class _Data(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """The payload of one event type. Field order is the order of the keys in `data`."""


class TurnCreated(_Data, frozen=True, kw_only=True, tag="turn.created"):
    seq: int
    role: str
    turn_id: str
    author: str
    channel: Channel | None
    text: str


class TurnNotice(_Data, frozen=True, kw_only=True, tag="turn.created"):
    """`turn.created` as operators' screens get it (`gw.ops.turn.created`): the seq alone, no
    text; the console reads the turn itself from the API."""

    seq: int


class ConversationCreated(_Data, frozen=True, kw_only=True, tag="conversation.created"):
    channel: Channel
    end_user_id: str
    agent_id: str
    pinned_revision_id: str


class ConversationStatusChanged(
    _Data, frozen=True, kw_only=True, tag="conversation.status_changed"
):
    from_: str = msgspec.field(name="from")
    to: str
    reason: str


class HandoffStarted(_Data, frozen=True, kw_only=True, tag="handoff.started"):
    reason: str
    seq: int
    handoff_id: str


class HandoffAssigned(_Data, frozen=True, kw_only=True, tag="handoff.assigned"):
    handoff_id: str
    assignee: str | None
    assignee_name: str | None
    reassigned: bool


class HandoffResolved(_Data, frozen=True, kw_only=True, tag="handoff.resolved"):
    handoff_id: str | None
    outcome: str


class HandoffUnclaimed(_Data, frozen=True, kw_only=True, tag="handoff.unclaimed"):
    handoff_id: str
    requested_at: str  # ISO 8601, as `datetime.isoformat()` writes it


class ApprovalRequested(_Data, frozen=True, kw_only=True, tag="approval.requested"):
    approval_id: str
    tool: str
    arguments: dict[str, Any]
    approver_role: str
    timeout_at: str  # ISO 8601, as `datetime.isoformat()` writes it


class ApprovalResolved(_Data, frozen=True, kw_only=True, tag="approval.resolved"):
    approval_id: str
    status: str
    note: str | None
    reviewer_name: str | None


class ApprovalCancelled(_Data, frozen=True, kw_only=True, tag="approval.cancelled"):
    approval_id: str
    reason: str


class AgentFailed(_Data, frozen=True, kw_only=True, tag="agent.failed"):
    runtime: str
    reason: str | None
    attempts: int
    seq: int


class VoiceTransferUnavailable(_Data, frozen=True, kw_only=True, tag="voice.transfer_unavailable"):
    pass


class _Keyword(_Data, frozen=True, kw_only=True):
    channel: Channel
    end_user_id: str
    our_address: str


class EndUserOptedOut(_Keyword, frozen=True, kw_only=True, tag="end_user.opted_out"):
    pass


class EndUserOptedIn(_Keyword, frozen=True, kw_only=True, tag="end_user.opted_in"):
    pass


class EndUserHelpRequested(_Keyword, frozen=True, kw_only=True, tag="end_user.help_requested"):
    pass


class MessageStatus(_Data, frozen=True, kw_only=True, tag="message.status"):
    provider_id: str
    status: str
    error_code: str | None
    turn_id: str | None


class DeliveryFailed(_Data, frozen=True, kw_only=True, tag="delivery.failed"):
    turn_id: str
    channel: Channel
    seq: int
    reason: str
    attempts: int


class EmailBounced(_Data, frozen=True, kw_only=True, tag="email.bounced"):
    message_id: str | None
    message_ids: list[str]
    failed_turns: list[str]


class EmailAutoReplyDropped(_Data, frozen=True, kw_only=True, tag="email.auto_reply_dropped"):
    message_id: str | None
    reason: str


class IdentityRef(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    value: str


class EndUserIdentityLinked(_Data, frozen=True, kw_only=True, tag="end_user.identity_linked"):
    end_user_id: str
    identity: IdentityRef


class EndUserErased(_Data, frozen=True, kw_only=True, tag="end_user.erased"):
    end_user_id: str
    conversations: int
    turns: int
    stream_messages: int


class ConversationErased(_Data, frozen=True, kw_only=True, tag="conversation.erased"):
    conversation_id: str
    reason: str
    turns: int


EventData = (
    TurnCreated
    | ConversationCreated
    | ConversationStatusChanged
    | HandoffStarted
    | HandoffAssigned
    | HandoffResolved
    | HandoffUnclaimed
    | ApprovalRequested
    | ApprovalResolved
    | ApprovalCancelled
    | AgentFailed
    | VoiceTransferUnavailable
    | EndUserOptedOut
    | EndUserOptedIn
    | EndUserHelpRequested
    | MessageStatus
    | DeliveryFailed
    | EmailBounced
    | EmailAutoReplyDropped
    | EndUserIdentityLinked
    | EndUserErased
    | ConversationErased
)

# Every event type the gateway emits with a typed payload (the tags of `EventData`).
EventType = Literal[
    "turn.created",
    "conversation.created",
    "conversation.status_changed",
    "handoff.started",
    "handoff.assigned",
    "handoff.resolved",
    "handoff.unclaimed",
    "approval.requested",
    "approval.resolved",
    "approval.cancelled",
    "agent.failed",
    "voice.transfer_unavailable",
    "end_user.opted_out",
    "end_user.opted_in",
    "end_user.help_requested",
    "message.status",
    "delivery.failed",
    "email.bounced",
    "email.auto_reply_dropped",
    "end_user.identity_linked",
    "end_user.erased",
    "conversation.erased",
]


def type_of(data: EventData | TurnNotice) -> EventType:
    """The event type a payload belongs to (its tag)."""
    return cast(EventType, data.__struct_config__.tag)


def make_event(
    data: EventData | TurnNotice,
    *,
    id: str,
    occurred_at: datetime,
    conversation_id: str | None = None,
    session_type: SessionType | None = None,
    actor: str = "system",
) -> Event:
    """The event carrying `data`, in the wire shape consumers have always seen: the tag becomes
    the top-level `type` and the payload's fields, in their declared order, become `data`."""
    fields = cast(dict[str, Any], msgspec.to_builtins(data))
    fields.pop("type")
    return Event(
        id=id,
        type=type_of(data),
        occurred_at=occurred_at,
        conversation_id=conversation_id,
        session_type=session_type,
        actor=actor,
        data=fields,
    )


def typed_data(event: Event) -> EventData | None:
    """The typed payload of an event of a known type; None for a type this build does not know
    (a newer producer's) or a payload that does not fit (the caller keeps the generic event)."""
    try:
        return cast(EventData, msgspec.convert({**event.data, "type": event.type}, EventData))
    except msgspec.ValidationError:
        return None


def turn_created_event(
    turn: Turn, session_type: SessionType, channel: Channel | None = None
) -> Event:
    """The `turn.created` event of a turn. Built from the turn alone (and its conversation's
    channel), so the event published when the turn is appended and the one the audit log shows
    later are the same. It carries the text and the channel: a webhook receiver needs both and
    should not have to call back for them."""
    author = turn.author
    return make_event(
        TurnCreated(
            seq=turn.seq,
            role=turn.role,
            turn_id=turn.id,
            author=author.kind,
            channel=turn.channel or channel,
            text=turn.content,
        ),
        id=f"evt_turn.created_{turn.id}",
        occurred_at=turn.created_at,
        conversation_id=turn.conversation_id,
        session_type=session_type,
        actor=author.id if author.kind == "operator" and author.id else author.kind,
    )
