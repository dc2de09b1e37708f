"""The domain as stored: conversations, turns, end users, agents and their revisions, API keys.

Stored records decode leniently (unknown fields ignored, new fields defaulted), so a rolling deploy
where one replica writes a newer shape never breaks an older reader.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

Channel = Literal["api", "sms", "voice", "email"]
CHANNELS: tuple[Channel, ...] = ("api", "sms", "voice", "email")
SessionType = Literal["live", "test", "simulation"]
Status = Literal["active", "waiting_for_human", "awaiting_approval", "closed"]
Role = Literal["user", "assistant", "system"]
Scope = Literal["admin", "operator", "client"]
IdentifierKind = Literal["phone", "email", "external"]
Visibility = Literal["own", "all"]
# What became of a tool call: `allow` (it ran), `approved` (a person approved it, then it ran),
# `deny` (a policy forbids it) or `require_approval` (it waits for a person and did not run).
Decision = Literal["allow", "approved", "deny", "require_approval"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: dict[str, Any] = {}
    result: Any = None
    decision: Decision = "allow"


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    chunk_id: str
    kb_id: str
    score: float
    text: str


class Author(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    kind: Literal["end_user", "agent", "operator", "system"]
    id: str | None = None
    # An operator's display name, from the calling API key (never from a request body).
    name: str | None = None


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    conversation_id: str
    seq: int
    role: Role
    content: str
    author: Author
    created_at: datetime
    tool_calls: tuple[ToolCall, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    # The inbound envelope this turn came from (user turns) or answers (assistant turns).
    envelope_id: str | None = None
    channel: Channel | None = None
    # False while a user turn waits for the agent (the conversation was not active).
    answered: bool = True
    # Email: the user's Message-ID, so the answer's In-Reply-To names this mail even when it is
    # answered later (queued behind a handoff or an approval).
    message_id: str | None = None


class Conversation(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    end_user_id: str
    channel: Channel
    status: Status
    session_type: SessionType
    assigned_agent_id: str
    pinned_revision_id: str
    created_at: datetime
    updated_at: datetime
    context_variables: dict[str, Any] = {}
    # Our side of the channel (our phone number or address) and the user's, for replies.
    our_address: str | None = None
    user_address: str | None = None
    last_seq: int = 0
    closed_reason: str | None = None
    # Who opened it: the API key's id, or `channel` for traffic that arrived on a channel.
    created_by: str | None = None
    # Orders this conversation's envelopes: every producer publishes to its partition.
    routing_key: str | None = None
    # The approval the conversation waits for while `awaiting_approval`.
    approval_id: str | None = None
    # The open handoff while `waiting_for_human` (see `Handoff`).
    handoff_id: str | None = None

    @property
    def partition_key(self) -> str:
        return self.routing_key or self.id


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    kind: IdentifierKind
    value: str


class EndUser(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created_at: datetime
    identities: tuple[Identity, ...] = ()


class Document(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    title: str
    text: str


class KnowledgeBase(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    documents: tuple[Document, ...] = ()


class ToolSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A tool the agent may propose. `parameters` is a JSON schema (or the short form
    `{"order_id": "string"}`); with a `url`, core POSTs the arguments there to run it."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}
    url: str | None = None
    timeout_seconds: float = 10.0


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """Decides what happens when the agent calls `tool`."""

    tool: str
    decision: Literal["allow", "deny", "require_approval"] = "allow"
    approver_role: Scope = "operator"
    timeout_seconds: float = 24 * 3600
    on_reject: Literal["close", "continue"] = "close"
    suspend_message: str = "I've asked a colleague to approve this. I'll get back to you shortly."
    # Said when the request is rejected or times out and the conversation closes (on_reject=close),
    # so it promises nothing the gateway will not do.
    fallback_message: str = (
        "Sorry, I couldn't get that approved, so I can't do it. This conversation is now closed; "
        "write to us again any time."
    )


RuntimeKind = Literal["builtin", "http", "openai"]


class HttpRuntimeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A customer's bot: core POSTs each turn's context to `url`. Its signing secret is stored
    apart from the revision (write-only), so no read of a revision returns it."""

    url: str
    timeout_seconds: float = 10.0


class OpenAIRuntimeConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Any OpenAI-compatible chat-completions server. The key is read from the environment
    variable `api_key_env` at call time and never stored."""

    base_url: str = "https://api.openai.com/v1"
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    system_prompt: str = "You are a helpful customer support agent. Answer briefly."
    temperature: float | None = None
    max_history_turns: int = 20
    timeout_seconds: float = 30.0


class Revision(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    agent_id: str
    number: int
    runtime: RuntimeKind = "builtin"
    http: HttpRuntimeConfig | None = None
    openai: OpenAIRuntimeConfig | None = None
    created_at: datetime
    knowledge_base: KnowledgeBase | None = None
    tools: tuple[ToolSpec, ...] = ()
    policies: tuple[Policy, ...] = ()
    greeting: str = "Hi! How can I help you today?"
    # Said once when the agent hands the conversation to a person.
    holding_message: str = "Let me connect you with a member of our team."
    # Said at most once per wait when the user writes while nobody has claimed the handoff yet.
    waiting_message: str = (
        "Thanks, your message is with our team. A person will reply here as soon as they can."
    )
    # What happens to a handoff nobody claims within the core's unclaimed-handoff time: `wait`
    # (an event only) or `return_to_agent` (the apology, then the agent answers what queued).
    on_unclaimed: Literal["wait", "return_to_agent"] = "wait"
    unclaimed_message: str = (
        "I'm sorry, nobody from our team is free right now. I'll keep helping you myself."
    )
    fallback: str = "I'm not sure about that one. I can help with orders, refunds, shipping and our hours, or connect you with a person."
    # What the channels say on this agent's behalf; None falls back to the gateway's settings
    # (SWITCHBOARD_VOICE_GREETING, SWITCHBOARD_SMS_HELP_TEXT, SWITCHBOARD_HUMAN_QUEUE_NUMBER).
    voice_greeting: str | None = None
    sms_help_text: str | None = None
    human_queue_number: str | None = None


RouteKind = Literal["phone", "email", "domain"]


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """Which agent answers channel traffic to one of our addresses: a phone number (SMS and
    voice), an email address, or a whole email domain (`@example.com`)."""

    address: str
    kind: RouteKind
    agent_id: str
    updated_at: datetime


class Agent(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    created_at: datetime
    active_revision_id: str | None = None


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """An API key as stored: only the SHA-256 of the secret, never the secret."""

    id: str
    name: str
    scopes: tuple[Scope, ...]
    created_at: datetime
    prefix: str  # first characters of the secret, to tell keys apart in a list
    # Past it the key answers 401 `key_expired`; None: it does not expire.
    expires_at: datetime | None = None
    # Set when the key is revoked (or replaced, the bootstrap key): 401 `key_revoked` from then on.
    revoked_at: datetime | None = None
    # What a client key sees: `own` = only conversations it created; `all` = every one. Keys
    # stored before this field existed read as `all`, as they behaved; operator and admin keys
    # always see everything.
    visibility: Visibility = "all"
    # The operator's name as people see it (human turns, approvals, claimed handoffs).
    display_name: str | None = None

    @property
    def operator_name(self) -> str:
        return self.display_name or self.name


DeliveryStatus = Literal[
    "pending",
    "queued",
    "sending",
    "sent",
    "delivered",
    "undelivered",
    "failed",
    "suppressed",
    "accepted",
    "scheduled",
    "canceled",
    "read",
]
# Status callbacks arrive out of order; a delivery only moves forward along this rank.
DELIVERY_RANK: dict[str, int] = {
    "pending": 0,
    "accepted": 1,
    "scheduled": 1,
    "queued": 2,
    "sending": 3,
    "sent": 4,
    "delivered": 5,
    "read": 6,
    "undelivered": 6,
    "failed": 6,
    "canceled": 6,
    "suppressed": 6,
}


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """How an outbound message fared with its provider."""

    turn_id: str
    conversation_id: str
    channel: Channel
    status: str
    provider_ids: tuple[str, ...] = ()
    error_code: str | None = None
    error_message: str | None = None
    updated_at: datetime


ApprovalStatus = Literal["pending", "approved", "rejected", "timed_out", "cancelled"]


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call held by a policy until a human decides (or the deadline passes)."""

    id: str
    conversation_id: str
    subject_kind: Literal["tool_call"] = "tool_call"
    subject_ref: str  # the assistant turn that asked for it
    payload: dict[str, Any]  # {"tool": ..., "arguments": {...}}
    approver_role: Scope
    suspend_message: str
    fallback_message: str
    on_reject: Literal["close", "continue"]
    timeout_at: datetime
    created_at: datetime
    status: ApprovalStatus = "pending"
    reviewer: str | None = None  # the deciding API key's id ("system" for a timeout)
    reviewer_name: str | None = None  # that key's display name
    note: str | None = None
    resolved_at: datetime | None = None


HandoffStatus = Literal["requested", "assigned", "resolved"]
HANDOFF_STATUSES: tuple[HandoffStatus, ...] = ("requested", "assigned", "resolved")


class Handoff(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation handed to people: `requested → assigned → resolved`.

    Created whenever a conversation becomes `waiting_for_human`; assigned by an atomic claim;
    resolved by hand-back, close, or (if the revision says so) by returning an unclaimed handoff
    to the agent, with the `outcome`.
    """

    id: str
    conversation_id: str
    status: HandoffStatus = "requested"
    reason: str
    channel: Channel
    end_user_id: str
    requested_at: datetime
    requested_by: str  # agent, operator key id, or channel
    assignee: str | None = None  # the claiming API key's id
    assignee_name: str | None = None
    assigned_at: datetime | None = None
    resolved_at: datetime | None = None
    outcome: Literal["handed_back", "closed", "returned_to_agent"] | None = None
    # Set once when nobody claimed it within the unclaimed-handoff time.
    unclaimed_at: datetime | None = None


class WebhookSubscription(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    url: str
    events: tuple[str, ...]  # event types, or ("*",)
    secret: str
    created_at: datetime

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


class WebhookDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt to deliver one event to one subscription, for the delivery log."""

    event_id: str
    event_type: str
    attempt: int
    ok: bool
    status_code: int | None = None
    error: str | None = None
    at: datetime
