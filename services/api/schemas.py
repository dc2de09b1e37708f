"""Request and response bodies of the HTTP API (the OpenAPI document is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

from shared.envelopes import SimulationStop
from shared.models import (
    Approval,
    Channel,
    Evidence,
    Handoff,
    KnowledgeBase,
    Policy,
    Scope,
    SessionType,
    Status,
    ToolCall,
    Turn,
    Visibility,
)

T = TypeVar("T")
MAX_MESSAGE = 16_000
# A user message says something: at least one character that is not whitespace. The same pattern
# is in the OpenAPI document, so what it calls valid is exactly what is accepted.
UserText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MESSAGE, pattern=r"\S")]


class ItemList(msgspec.Struct, Generic[T], kw_only=True):
    items: list[T]
    next_cursor: str | None = None


class IdentityRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    channel: Channel
    identifier: Annotated[str, msgspec.Meta(min_length=1, max_length=320)]


class CreateConversation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Give `end_user_id` or `identity`, not both (422); neither opens an anonymous end user. On
    `sms` and `email` the end user needs an address on that channel (422 `address_required`).
    Without `agent_id`, the agent routed for our address (`/v1/routes`), else the default."""

    channel: Channel = "api"
    session_type: Literal["live", "test"] = "live"
    agent_id: str | None = None
    end_user_id: str | None = None
    identity: IdentityRef | None = None
    context_variables: dict[str, Any] = {}


class PostTurn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    user_message: UserText
    include_evidence: bool = True
    metadata: dict[str, str] = {}


class TurnResult(msgspec.Struct, kw_only=True):
    turn_id: str
    conversation_id: str
    text: str
    session_status: Status
    message_seqs: list[int]
    tool_calls: list[ToolCall]
    evidence: list[Evidence]


class QueuedTurn(msgspec.Struct, kw_only=True):
    conversation_id: str
    session_status: Status
    queued: bool = True
    seq: int
    message_seqs: list[int]


class CloseRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=200)] = "closed_by_client"


class ResolveIdentity(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    channel: Channel
    identifier: Annotated[str, msgspec.Meta(min_length=1, max_length=320)]


class LinkIdentity(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Link an identity (a channel's identifier) to an existing end user."""

    end_user_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    channel: Channel
    identifier: Annotated[str, msgspec.Meta(min_length=1, max_length=320)]


class ResolvedIdentity(msgspec.Struct, kw_only=True):
    end_user_id: str
    created: bool


Url = Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=2000)]
Secret = Annotated[str, msgspec.Meta(min_length=16, max_length=200)]


class HttpRuntimeSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: Url
    secret: Secret | None = None  # write-only: signs every request; never returned
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0


class OpenAIRuntimeSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    base_url: Url = "https://api.openai.com/v1"
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    # The NAME of the environment variable holding the key (never the key); null: no key.
    api_key_env: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = (
        "OPENAI_API_KEY"
    )
    system_prompt: Annotated[str, msgspec.Meta(max_length=20_000)] = (
        "You are a helpful customer support agent. Answer briefly."
    )
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    max_history_turns: Annotated[int, msgspec.Meta(ge=0, le=200)] = 20
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 30.0


class ToolDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A tool the agent may call: with a `url`, core POSTs the arguments there."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, msgspec.Meta(max_length=2000)] = ""
    parameters: dict[str, Any] = {}  # a JSON schema, or the short form {"order_id": "string"}
    url: Url | None = None
    secret: Secret | None = None  # write-only: signs calls to `url`; never returned
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=120)] = 10.0


class RevisionSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    runtime: Literal["builtin", "http", "openai"] = "builtin"
    http: HttpRuntimeSpec | None = None
    openai: OpenAIRuntimeSpec | None = None
    knowledge_base: KnowledgeBase | None = None
    tools: list[ToolDefinition] = []
    policies: list[Policy] = []
    greeting: str | None = None
    fallback: str | None = None
    # Said by the channels for this agent; unset: the gateway's settings.
    voice_greeting: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)] | None = None
    sms_help_text: Annotated[str, msgspec.Meta(min_length=1, max_length=1600)] | None = None
    human_queue_number: Annotated[str, msgspec.Meta(min_length=1, max_length=32)] | None = None
    # Handoffs: the line said when the agent hands over, the one acknowledgement per wait, and
    # what an unclaimed handoff does (see the README's "Handoffs and the console").
    holding_message: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE)] | None = None
    waiting_message: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE)] | None = None
    on_unclaimed: Literal["wait", "return_to_agent"] = "wait"
    unclaimed_message: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE)] | None = None
    activate: bool = True


class PutRoute(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    agent_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class CreateAgent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    revision: RevisionSpec | None = None


class CreateApiKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1)]
    # When the key stops working (401 `key_expired`); with a time zone, in the future.
    expires_at: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    # Client keys: `own` (the default) sees only conversations the key created; `all` every one.
    # Operator and admin keys always see every conversation.
    visibility: Visibility | None = None
    # The operator's name as end users' transcripts and colleagues see it (defaults to `name`).
    display_name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class CreatedApiKey(msgspec.Struct, kw_only=True):
    id: str
    name: str
    scopes: list[Scope]
    created_at: datetime
    expires_at: datetime | None
    visibility: Visibility
    key: str  # shown once; only its hash is stored
    display_name: str | None = None


class ApiKeyInfo(msgspec.Struct, kw_only=True):
    """An API key as listed: never its secret, nor the secret's hash."""

    id: str
    name: str
    scopes: list[Scope]
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    visibility: Visibility
    display_name: str | None = None


class ErasedEndUser(msgspec.Struct, kw_only=True):
    end_user_id: str
    conversations: int = 0
    turns: int = 0
    stream_messages: int = 0


class WhoAmI(msgspec.Struct, kw_only=True):
    id: str
    name: str
    scopes: list[Scope]
    visibility: Visibility = "all"
    display_name: str | None = None


class HandoffRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "operator_takeover"


class HumanTurnRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    content: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE)] = ""
    hand_back: bool = False
    close: bool = False


class ResolveApprovalRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    decision: Literal["approve", "reject"]
    note: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    # Deprecated and ignored: the reviewer is always the calling API key. Still accepted so
    # older clients do not break.
    reviewer: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class ClaimRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Admins only: take the handoff from the operator who holds it.
    reassign: bool = False


class InboxHandoff(msgspec.Struct, kw_only=True):
    handoff: Handoff
    user_address: str | None
    last_message: str | None
    last_message_at: datetime | None


class InboxApproval(msgspec.Struct, kw_only=True):
    approval: Approval
    channel: Channel
    end_user_id: str
    user_address: str | None
    last_message: str | None


class Inbox(msgspec.Struct, kw_only=True):
    """What waits for people: handoffs (requested and assigned) and pending approvals."""

    handoffs: list[InboxHandoff]
    approvals: list[InboxApproval]


class Messages(msgspec.Struct, kw_only=True):
    conversation_id: str
    session_status: Status
    messages: list[Turn]
    next_seq: int


class CreateWebhook(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: Annotated[str, msgspec.Meta(pattern=r"^https?://", max_length=2000)]
    events: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["*"]
    )
    secret: Annotated[str, msgspec.Meta(min_length=16, max_length=200)] | None = None


class WebhookView(msgspec.Struct, kw_only=True):
    """A subscription as listed: never its secret."""

    id: str
    url: str
    events: list[str]
    created_at: datetime


class CreatedWebhook(WebhookView, kw_only=True):
    secret: str  # returned once, at creation


class CreateSimulation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    agent_id: str | None = None
    revision_id: str | None = None
    user_turns: Annotated[list[UserText], msgspec.Meta(min_length=1, max_length=100)]


class SimulationResult(msgspec.Struct, kw_only=True):
    conversation_id: str
    revision_id: str
    session_type: SessionType
    transcript: list[Turn]
    # `completed`, or `awaiting_approval` when a tool call needed an approval: `stopped` then says
    # which call and which user turns were never sent.
    outcome: Literal["completed", "awaiting_approval"] = "completed"
    stopped: SimulationStop | None = None


class Usage(msgspec.Struct, kw_only=True):
    """Live sessions only: test and simulation sessions are never counted."""

    conversations: dict[str, int]
    turns: dict[str, int]


class DeadLetterView(msgspec.Struct, kw_only=True):
    """A message in the DEAD stream: where it died, why, and whether it was replayed."""

    id: str
    seq: int  # its position in the DEAD stream (the list's cursor)
    source_subject: str  # where a replay puts it back
    reason: str
    deliveries: int
    failed_at: datetime
    payload: str
    replayed_at: datetime | None = None


class DeadLetterReplayed(msgspec.Struct, kw_only=True):
    id: str
    source_subject: str
    replayed_at: datetime


class DeadLettersReplayed(msgspec.Struct, kw_only=True):
    replayed: int  # put back now
    already_replayed: int  # left alone: replayed before
