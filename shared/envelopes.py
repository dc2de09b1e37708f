"""What travels on the bus: inbound and outbound envelopes, events, replies, core commands.

Versioned (`v`) and encoded with msgspec JSON. Decoders are built once per type and ignore unknown
fields, so services deployed at different versions keep talking; a consumer that meets a `v` newer
than it understands dead-letters the message rather than guessing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from shared.events import SCHEMA_VERSION, Event, EventType, turn_created_event
from shared.models import (
    Approval,
    Channel,
    Conversation,
    Evidence,
    Handoff,
    SessionType,
    Status,
    ToolCall,
    Turn,
)


class Identifier(msgspec.Struct, frozen=True, kw_only=True):
    """Who sent it, as the channel saw it (`raw`) and as identity resolution keys it."""

    kind: Literal["phone", "email", "external"]
    raw: str
    normalized: str


class Attachment(msgspec.Struct, frozen=True, kw_only=True):
    url: str | None = None
    content_type: str = "application/octet-stream"
    size: int | None = None
    name: str | None = None


class ThreadHints(msgspec.Struct, frozen=True, kw_only=True):
    message_id: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    subject: str | None = None
    reply_token: str | None = None
    call_sid: str | None = None


def sms_thread_key(sender: str, ours: str) -> str:
    """An SMS thread: who wrote (E.164) to which of our numbers."""
    return f"{sender}|{ours}"


def email_thread_key(message_id: str, in_reply_to: str | None, references: tuple[str, ...]) -> str:
    """A mail thread: its root Message-ID (the first of References, else In-Reply-To, else the
    message's own)."""
    return references[0] if references else in_reply_to or message_id


class _Inbound(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    id: str
    v: int = SCHEMA_VERSION
    channel: Channel
    received_at: datetime
    session_type: SessionType = "live"
    sender: Identifier | None = None
    recipient: str | None = None
    conversation_id: str | None = None
    thread: ThreadHints | None = None
    # Which thread of its channel this is, computed by the ingress (sender + our number, the
    # CallSid, the root Message-ID); core maps (channel, thread key) to a conversation. Opaque to
    # everyone else. None from an ingress older than the field: core derives it the same way.
    thread_key: str | None = None
    provider_id: str | None = None
    metadata: dict[str, Any] = {}
    # Internal envelopes about a conversation (resume, approval decided) carry its routing key,
    # so core orders them with the conversation's own messages.
    order_key: str | None = None

    @property
    def routing_key(self) -> str:
        """What orders this envelope against others: its conversation, or who sent it to whom."""
        if self.order_key:
            return self.order_key
        if self.conversation_id:
            return self.conversation_id
        who = self.sender.normalized if self.sender else self.id
        return f"{who}|{self.recipient or ''}"


class InboundMessage(_Inbound, frozen=True, kw_only=True, tag="message"):
    text: str
    # Email: the whole message when `text` is only its new part (quotes and signature trimmed);
    # core keeps it beside the turn for audit.
    original_text: str | None = None
    attachments: tuple[Attachment, ...] = ()
    # A client waits for token deltas of the reply (gw.stream.<conversation_id>[.<inbox>]).
    stream: bool = False
    # The reply inbox of the process waiting for this message's reply (shared/bus/replies.py):
    # core answers on gw.reply.<conversation_id>.<inbox>. None: on gw.reply.<conversation_id>.
    reply_inbox: str | None = None


class CallStarted(_Inbound, frozen=True, kw_only=True, tag="call_started"):
    # What the voice service greeted the caller with, for the transcript (it was already spoken).
    greeting: str | None = None


class CallEnded(_Inbound, frozen=True, kw_only=True, tag="call_ended"):
    reason: str = "completed"


class Prompted(_Inbound, frozen=True, kw_only=True, tag="prompted"):
    """Internal: a channel said this to the user on its own (a voice re-prompt on silence). Core
    records it in the transcript as a system turn; it is never delivered again."""

    text: str


class Resume(_Inbound, frozen=True, kw_only=True, tag="resume"):
    """Internal: the conversation is active again; answer its queued messages, in order."""


class ApprovalDecided(_Inbound, frozen=True, kw_only=True, tag="approval_decided"):
    """Internal: an approval was resolved (or timed out); continue the conversation."""

    approval_id: str


class ChannelKeyword(_Inbound, frozen=True, kw_only=True, tag="keyword"):
    """A carrier keyword (SMS STOP/START/HELP): recorded, never shown to the agent."""

    keyword: Literal["stop", "start", "help"]
    text: str


InboundEnvelope = (
    InboundMessage | CallStarted | CallEnded | Prompted | Resume | ApprovalDecided | ChannelKeyword
)


class OutboundEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """A message for an end user, for the channel's egress worker to deliver."""

    id: str
    v: int = SCHEMA_VERSION
    channel: Channel
    conversation_id: str
    turn_id: str
    seq: int
    session_type: SessionType
    text: str
    recipient: str | None = None
    sender: str | None = None
    thread: ThreadHints | None = None
    attachments: tuple[Attachment, ...] = ()
    author_kind: str = "agent"
    created_at: datetime


class TurnReply(msgspec.Struct, frozen=True, kw_only=True):
    """What core publishes once an inbound message is applied: on `gw.reply.<conversation_id>`,
    or `gw.reply.<conversation_id>.<inbox>` when the envelope named its waiter's inbox."""

    envelope_id: str
    conversation_id: str
    outcome: Literal["answered", "queued", "rejected"]
    session_status: Status
    message_seqs: tuple[int, ...] = ()
    turn: Turn | None = None
    user_seq: int | None = None
    error_code: str | None = None
    error_message: str | None = None


class StreamDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of the agent's reply, published before the reply on the same subject shape
    (`gw.stream.<conversation_id>[.<inbox>]`)."""

    envelope_id: str
    text: str


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    source_subject: str
    reason: str
    deliveries: int
    failed_at: datetime
    payload: str  # the original bytes, decoded as UTF-8 with replacement


class DeadLetterReplay(msgspec.Struct, frozen=True, kw_only=True):
    """The durable marker that a dead letter was put back on its subject (`gw.dead.replayed.<id>`)."""

    letter_id: str
    replayed_at: datetime


# Commands to core (request/reply on gw.cmd.<verb>).


class OpenConversation(msgspec.Struct, frozen=True, kw_only=True, tag="open_conversation"):
    channel: Channel
    session_type: SessionType = "live"
    agent_id: str | None = None
    end_user_id: str
    context_variables: dict[str, Any] = {}
    actor: str = "system"
    # SMS / email: where the end user is reached, so the first message (ours) can be delivered.
    user_address: str | None = None


class CloseConversation(msgspec.Struct, frozen=True, kw_only=True, tag="close_conversation"):
    conversation_id: str
    reason: str = "closed_by_operator"
    actor: str = "system"


class StartHandoff(msgspec.Struct, frozen=True, kw_only=True, tag="handoff"):
    conversation_id: str
    reason: str = "operator_takeover"
    actor: str = "system"
    # An operator taking over is the handoff's assignee at once.
    actor_name: str | None = None


class HumanTurn(msgspec.Struct, frozen=True, kw_only=True, tag="human_turn"):
    conversation_id: str
    content: str
    operator_id: str
    operator_name: str | None = None
    hand_back: bool = False
    close: bool = False


class ResolveApproval(msgspec.Struct, frozen=True, kw_only=True, tag="resolve_approval"):
    conversation_id: str
    approval_id: str
    decision: Literal["approve", "reject"]
    reviewer: str
    reviewer_name: str | None = None
    note: str | None = None


class EraseEndUser(msgspec.Struct, frozen=True, kw_only=True, tag="erase_end_user"):
    end_user_id: str
    actor: str = "system"


class ClaimHandoff(msgspec.Struct, frozen=True, kw_only=True, tag="claim_handoff"):
    """Assign a handoff to the calling operator; `force` (admins) takes it from its holder."""

    handoff_id: str
    operator_id: str
    operator_name: str
    force: bool = False


class Simulate(msgspec.Struct, frozen=True, kw_only=True, tag="simulate"):
    agent_id: str | None = None
    revision_id: str | None = None
    user_turns: tuple[str, ...]
    actor: str = "system"


Command = (
    OpenConversation
    | CloseConversation
    | StartHandoff
    | HumanTurn
    | ResolveApproval
    | Simulate
    | EraseEndUser
    | ClaimHandoff
)


class SimulationStop(msgspec.Struct, frozen=True, kw_only=True):
    """Why a simulation stopped answering before its last user turn: a tool call waits for an
    approval, which nobody gives in a read-only run."""

    reason: Literal["awaiting_approval"] = "awaiting_approval"
    after_user_turn: int  # index into the simulation's user turns
    tool: str
    arguments: dict[str, Any] = {}
    unanswered: tuple[str, ...] = ()  # later user turns: recorded and queued, never answered


class CommandResult(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    conversation: Conversation | None = None
    approval: Approval | None = None
    handoff: Handoff | None = None
    turns: tuple[Turn, ...] = ()
    stopped: SimulationStop | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_details: dict[str, Any] = {}
    # What an erasure removed: conversations, turns, stream messages.
    counts: dict[str, int] = {}


__all__ = [
    "SCHEMA_VERSION",
    "Attachment",
    "CallEnded",
    "CallStarted",
    "CloseConversation",
    "Command",
    "CommandResult",
    "DeadLetter",
    "EraseEndUser",
    "Event",
    "EventType",
    "Evidence",
    "Identifier",
    "InboundEnvelope",
    "InboundMessage",
    "OpenConversation",
    "OutboundEnvelope",
    "ThreadHints",
    "ToolCall",
    "TurnReply",
    "email_thread_key",
    "sms_thread_key",
    "turn_created_event",
]
