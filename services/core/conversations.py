"""A conversation's life: opening it, moving it between statuses, and what core holds to do so.

`Conversations` carries the handles every step of core needs (settings, store, bus, outbox) and
the steps that change a conversation as a whole: open, change status, close, hand to a human, and
say something to the user that answers no particular turn. The rest of the turn path reads in
order: `routing` (which conversation a message belongs to), `turns` (applying a user turn),
`replies` (producing the agent's answer) and `outbox` (what leaves core). Status rules are data in
`lifecycle`.

Every step is idempotent so a redelivered envelope converges on the same result: the user turn is
deduplicated by envelope id, the agent's reply by a reply key, and every bus publish carries a
deterministic Nats-Msg-Id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec

from services.core.agent import Budget, Runtimes
from services.core.audience import OperatorAudience, WebhookAudience
from services.core.lifecycle import transition
from services.core.outbox import Outbox
from shared.bus import Bus
from shared.errors import Conflict, InvalidRequest
from shared.events import (
    ApprovalCancelled,
    ConversationCreated,
    ConversationStatusChanged,
    HandoffResolved,
    HandoffStarted,
)
from shared.ids import new_id
from shared.models import (
    Author,
    Channel,
    Conversation,
    Handoff,
    Revision,
    SessionType,
    Status,
    ToolCall,
    Turn,
    utcnow,
)
from shared.settings import CoreSettings
from shared.store import Appended, Store
from shared.telemetry import Metrics

log = logging.getLogger("switchboard.core")

# How many conversations a core process remembers as `Known` (about 200 bytes each).
KNOWN_CONVERSATIONS = 10_000


@dataclass(frozen=True)
class Known:
    """What never changes about a conversation: enough to build a user turn and append it without
    reading the conversation first (the append returns it as it is then). Ids and enums only,
    nothing personal: an erased conversation's entry is harmless (its append finds nothing)."""

    id: str
    end_user_id: str
    channel: Channel
    session_type: SessionType


def usage_channel(conv: Conversation | Known, turn: Turn) -> Channel | None:
    """The channel a turn counts under in usage: `live` sessions' turns, gateway notes excluded."""
    return conv.channel if conv.session_type == "live" and turn.role != "system" else None


class Conversations:
    def __init__(self, settings: CoreSettings, store: Store, bus: Bus, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.subjects = bus.subjects
        self.metrics = metrics
        self.audience = WebhookAudience(
            "webhook subscriptions",
            store.webhooks_exist,
            bus,
            bus.subjects.webhooks_changed,
            settings.webhook_presence_seconds,
        )
        self.screens = OperatorAudience(
            "operators' screens",
            store.operators_watching,
            bus,
            bus.subjects.operators_watching,
            settings.operator_presence_seconds,
        )
        self.outbox = Outbox(store, bus, metrics, self.audience, self.screens)
        self.runtimes = Runtimes(
            Budget(
                turn_seconds=settings.agent_turn_budget_seconds,
                retry_backoff_seconds=settings.agent_retry_backoff_seconds,
            )
        )
        self._revisions: dict[str, Revision] = {}
        self._known: dict[str, Known] = {}

    def known(self, cid: str | None) -> Known | None:
        """A conversation this process has seen, by id (see `Known`)."""
        return self._known.get(cid) if cid else None

    def remember(self, conv: Conversation) -> Known:
        known = Known(conv.id, conv.end_user_id, conv.channel, conv.session_type)
        if known.id not in self._known and len(self._known) >= KNOWN_CONVERSATIONS:
            del self._known[next(iter(self._known))]  # the oldest first
        self._known[known.id] = known
        return known

    def forget(self, cid: str) -> None:
        self._known.pop(cid, None)

    async def revision(self, revision_id: str) -> Revision:
        """A revision by id; revisions are immutable, so each is read once per process."""
        revision = self._revisions.get(revision_id)
        if revision is None:
            revision = self._revisions[revision_id] = await self.store.get_revision(revision_id)
        return revision

    async def open(
        self,
        *,
        channel: Channel,
        end_user_id: str,
        agent_id: str | None,
        session_type: SessionType = "live",
        context_variables: dict[str, Any] | None = None,
        our_address: str | None = None,
        user_address: str | None = None,
        routing_key: str | None = None,
        revision_id: str | None = None,
        actor: str = "system",
    ) -> Conversation:
        if revision_id is not None:
            revision = await self.revision(revision_id)
            agent = await self.store.get_agent(revision.agent_id)
        else:
            agent = await self.store.get_agent(agent_id or self.settings.default_agent)
            if agent.active_revision_id is None:
                raise InvalidRequest(
                    f"agent {agent.id} has no active revision", details={"agent_id": agent.id}
                )
            revision_id = agent.active_revision_id
        now = utcnow()
        cid = new_id("conv")
        conv = Conversation(
            id=cid,
            end_user_id=end_user_id,
            channel=channel,
            status="active",
            session_type=session_type,
            assigned_agent_id=agent.id,
            pinned_revision_id=revision_id,
            created_at=now,
            updated_at=now,
            context_variables=context_variables or {},
            our_address=our_address,
            user_address=user_address,
            routing_key=routing_key or cid,
            created_by=actor,
        )
        await self.store.create_conversation(conv)
        if session_type == "live":
            await self.store.count_usage(channel, conversations=1)
        await self.outbox.emit(
            ConversationCreated(
                channel=channel,
                end_user_id=end_user_id,
                agent_id=agent.id,
                pinned_revision_id=conv.pinned_revision_id,
            ),
            conv,
            actor,
            key=conv.id,
        )
        log.info("conversation opened", extra={"conversation_id": conv.id, "channel": channel})
        return conv

    async def change_status(self, conv: Conversation, to: Status, reason: str, actor: str) -> None:
        previous = await transition(self.store, conv.id, to, reason)
        await self.outbox.emit(
            ConversationStatusChanged(from_=previous, to=to, reason=reason), conv, actor
        )
        if to == "closed":
            await self.settle_on_close(conv.id, actor)

    async def settle_on_close(self, cid: str, actor: str) -> None:
        """A closed conversation leaves nothing waiting: its open handoff is resolved and its
        pending approval cancelled (never left for someone to approve or for the timer)."""
        current = await self.store.get_conversation(cid)
        if current.handoff_id and await self.store.resolve_handoff(current.handoff_id, "closed"):
            await self.outbox.emit(
                HandoffResolved(handoff_id=current.handoff_id, outcome="closed"),
                current,
                actor,
                key=current.handoff_id,
            )
        if current.approval_id:
            try:
                approval = await self.store.resolve_approval(
                    current.approval_id, "cancelled", actor, "the conversation was closed"
                )
            except Conflict:
                return  # decided already
            await self.store.mark_applied(approval.id)
            await self.outbox.emit(
                ApprovalCancelled(approval_id=approval.id, reason="conversation_closed"),
                current,
                actor,
                key=approval.id,
            )

    async def close(self, cid: str, reason: str, actor: str) -> Conversation:
        conv = await self.store.get_conversation(cid)
        await self.change_status(conv, "closed", reason, actor)
        return await self.store.get_conversation(cid)

    async def handoff(self, conv: Conversation, reason: str, actor: str) -> None:
        """To `waiting_for_human`, with the handoff record people claim (see `handoffs`)."""
        await self.change_status(conv, "waiting_for_human", reason, actor)
        record = await self.record_handoff(conv, reason, actor)
        note = Turn(
            id=new_id("turn"),
            conversation_id=conv.id,
            seq=0,
            role="system",
            content=f"Conversation handed to a human ({reason}).",
            author=Author(kind="system"),
            created_at=utcnow(),
        )
        appended = await self.store.append_turn(note, allowed=("waiting_for_human",))
        await self.outbox.record_turn(
            msgspec.structs.replace(note, seq=appended.seq), conv.session_type, conv.channel
        )
        await self.outbox.emit(
            HandoffStarted(reason=reason, seq=appended.seq, handoff_id=record.id), conv, actor
        )

    async def record_handoff(self, conv: Conversation, reason: str, actor: str) -> Handoff:
        """The waiting conversation's open handoff record, written if it has none yet."""
        return await self.store.create_handoff(
            conversation_id=conv.id,
            reason=reason,
            channel=conv.channel,
            end_user_id=conv.end_user_id,
            requested_by=actor,
            unclaimed_after=self.settings.handoff_unclaimed_seconds,
        )

    async def say(
        self,
        conv: Conversation,
        text: str,
        *,
        author: Author,
        allowed: tuple[Status, ...],
        key: str | None = None,
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> Turn:
        """Append a message to the user that is not an answer to one turn, and deliver it."""
        turn = await self.record(
            conv, text, author=author, allowed=allowed, key=key, tool_calls=tool_calls
        )
        await self.outbox.publish_outbound(conv, turn, thread=None)
        return turn

    async def record(
        self,
        conv: Conversation,
        text: str,
        *,
        author: Author,
        allowed: tuple[Status, ...],
        key: str | None = None,
        tool_calls: tuple[ToolCall, ...] = (),
    ) -> Turn:
        """Append a message to the transcript without delivering it (a channel already said it,
        or `say` delivers it next). A notice from the gateway itself is a `system` turn; the
        agent's words are `assistant`."""
        turn = Turn(
            id=f"turn_{key}" if key else new_id("turn"),
            conversation_id=conv.id,
            seq=0,
            role="system" if author.kind == "system" else "assistant",
            content=text,
            author=author,
            created_at=utcnow(),
            channel=conv.channel,
            tool_calls=tool_calls,
        )
        turn, _ = await self.append(conv, turn, allowed=allowed, key=key)
        return turn

    async def append(
        self,
        conv: Conversation | Known,
        turn: Turn,
        *,
        allowed: tuple[Status, ...],
        key: str | None,
        queue_if_inactive: bool = False,
        current: bool = False,
    ) -> tuple[Turn, Appended]:
        """Append a turn (deduplicated by `key`) and record it (events, webhooks) the first time;
        the turn comes back with its `seq` (and with `current`, the conversation as the append
        left it)."""
        appended = await self.store.append_turn(
            turn,
            allowed=allowed,
            dedupe_key=key,
            dedupe_ttl=self.settings.dedupe_ttl_seconds,
            queue_if_inactive=queue_if_inactive,
            usage_channel=usage_channel(conv, turn),
            current=current,
        )
        turn = msgspec.structs.replace(turn, seq=appended.seq)
        if not appended.duplicate:
            await self.outbox.record_turn(turn, conv.session_type, conv.channel)
        return turn, appended
