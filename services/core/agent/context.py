"""What an agent sees of one turn, built once by core and handed to whichever runtime answers.

The same struct is the JSON body the `http` runtime POSTs to a customer's bot, so every field
here is part of the bot contract (README, "Plug in your own bot"): add fields with defaults,
never rename or remove one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from shared.models import Channel, Decision, Evidence, Identity, Role, SessionType


class ConversationInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    channel: Channel
    session_type: SessionType
    agent_id: str
    revision_id: str  # the pinned revision: later revisions never change a running conversation


class EndUserInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    identities: tuple[Identity, ...] = ()  # every linked phone number, email address, external id


class UserMessage(msgspec.Struct, frozen=True, kw_only=True):
    """The user turn being answered."""

    seq: int
    text: str
    channel: Channel
    created_at: datetime


class HistoryTurn(msgspec.Struct, frozen=True, kw_only=True):
    """An earlier turn of this end user, on any channel, oldest first."""

    conversation_id: str
    channel: Channel | None
    seq: int
    role: Role
    text: str
    created_at: datetime


class ToolInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A tool the agent may propose, its parameters as a JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = {}


class ToolOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What became of a tool call the agent proposed: core's policy decision and the result.

    `decision` is `allow` (it ran), `approved` (a person approved it, then it ran), `deny`
    (the policy forbids it; `result` says why) or `require_approval` (it did not run).
    """

    id: str
    name: str
    arguments: dict[str, Any] = {}
    decision: Decision
    result: Any = None


class AgentContext(msgspec.Struct, frozen=True, kw_only=True):
    conversation: ConversationInfo
    end_user: EndUserInfo
    message: UserMessage
    history: tuple[HistoryTurn, ...] = ()
    context_variables: dict[str, Any] = {}
    # Knowledge-base chunks ranked for `message` (when the revision has a knowledge base).
    evidence: tuple[Evidence, ...] = ()
    tools: tuple[ToolInfo, ...] = ()
    # The tool calls of this turn so far, in order: the runtime's next step sees their results.
    tool_results: tuple[ToolOutcome, ...] = ()
