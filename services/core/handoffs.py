"""Handoffs: who of our people has a conversation, and what happens while nobody does.

The record (`shared.models.Handoff`) is created by `Conversations.handoff` whenever a conversation
becomes `waiting_for_human`; claims are atomic in the store (a second claim is a 409 naming the
holder), only the assignee's messages reach the user, and hand-back, close or a return to the
agent resolve it. The unclaimed-handoff timer lives beside the approval timer: its deadlines are a
Valkey index, so they survive core restarts.
"""

from __future__ import annotations

import logging
import time

from services.core.conversations import Conversations
from shared.envelopes import ClaimHandoff
from shared.errors import Forbidden
from shared.events import HandoffAssigned, HandoffResolved, HandoffUnclaimed
from shared.ids import ulid
from shared.models import Author, Conversation, Handoff

log = logging.getLogger("switchboard.core.handoffs")


async def claim(c: Conversations, cmd: ClaimHandoff) -> Handoff:
    handoff = await c.store.claim_handoff(
        cmd.handoff_id, cmd.operator_id, cmd.operator_name, cmd.force
    )
    conv = await c.store.get_conversation(handoff.conversation_id)
    await c.outbox.emit(
        HandoffAssigned(
            handoff_id=handoff.id,
            assignee=handoff.assignee,
            assignee_name=handoff.assignee_name,
            reassigned=cmd.force,
        ),
        conv,
        cmd.operator_id,
    )
    return handoff


async def require_assignee(
    c: Conversations, conv: Conversation, operator_id: str, operator_name: str
) -> None:
    """Refuse a human turn from anyone but the handoff's assignee (403 naming the holder); the
    first operator to answer an unclaimed handoff claims it."""
    handoff = await heal_record(c, conv)
    if handoff is None:
        return
    if handoff.status == "requested":
        await claim(
            c,
            ClaimHandoff(
                handoff_id=handoff.id, operator_id=operator_id, operator_name=operator_name
            ),
        )
    elif handoff.status == "assigned" and handoff.assignee != operator_id:
        raise Forbidden(
            f"this conversation is handled by {handoff.assignee_name or handoff.assignee}",
            details={
                "reason": "not_assignee",
                "assignee": handoff.assignee,
                "assignee_name": handoff.assignee_name,
            },
        )


async def hand_back(c: Conversations, conv: Conversation, outcome: str, actor: str) -> None:
    """Resolve the open handoff and give the conversation back to the agent."""
    current = await c.store.get_conversation(conv.id)
    if current.handoff_id and await c.store.resolve_handoff(current.handoff_id, outcome):
        await c.outbox.emit(
            HandoffResolved(handoff_id=current.handoff_id, outcome=outcome),
            current,
            actor,
            key=current.handoff_id,
        )
    await c.change_status(conv, "active", outcome, actor)


RECOVERED = "recovered"  # the reason of a record written after a crash lost the first write


async def heal_record(c: Conversations, conv: Conversation) -> Handoff | None:
    """The open handoff of a waiting conversation. The status changes before the record is
    written; if core died in between, the next message or operator action writes it."""
    current = await c.store.get_conversation(conv.id)
    if current.status != "waiting_for_human":
        return None
    if current.handoff_id:
        return await c.store.get_handoff(current.handoff_id)
    log.warning("handoff record missing; writing it", extra={"conversation_id": conv.id})
    return await c.record_handoff(current, RECOVERED, "system")


async def acknowledge_while_waiting(c: Conversations, conv: Conversation, duplicate: bool) -> None:
    """A user who writes while nobody has claimed the handoff yet hears the revision's waiting
    line, once per handoff; once a person has it, they answer themselves."""
    handoff = await heal_record(c, conv)
    if handoff is None or duplicate:
        return
    if handoff.status != "requested" or not await c.store.claim_once(f"waiting:{handoff.id}"):
        return
    revision = await c.revision(conv.pinned_revision_id)
    await c.say(
        conv,
        revision.waiting_message,
        author=Author(kind="system"),
        allowed=("waiting_for_human",),
        key=f"{handoff.id}_waiting",
    )


async def sweep_unclaimed(c: Conversations) -> int:
    """Raise `handoff.unclaimed` for handoffs nobody claimed in time; return them to the agent,
    with the revision's apology, when the revision says `on_unclaimed: return_to_agent`."""
    handled = 0
    for handoff_id in await c.store.handoffs_unclaimed_due(time.time()):
        if not await c.store.mark_handoff_unclaimed(handoff_id):
            continue  # claimed or resolved meanwhile
        handoff = await c.store.get_handoff(handoff_id)
        conv = await c.store.get_conversation(handoff.conversation_id)
        await c.outbox.emit(
            HandoffUnclaimed(handoff_id=handoff_id, requested_at=handoff.requested_at.isoformat()),
            conv,
            "system",
            key=handoff_id,
        )
        log.info("handoff unclaimed", extra={"conversation_id": conv.id, "handoff_id": handoff_id})
        handled += 1
        revision = await c.revision(conv.pinned_revision_id)
        if revision.on_unclaimed != "return_to_agent":
            continue
        # Only if still unclaimed at this very moment: a claim that just won keeps it.
        if not await c.store.resolve_handoff(handoff_id, "returned_to_agent", only_if="requested"):
            continue
        await c.outbox.emit(
            HandoffResolved(handoff_id=handoff_id, outcome="returned_to_agent"),
            conv,
            "system",
            key=handoff_id,
        )
        await c.say(
            conv,
            revision.unclaimed_message,
            author=Author(kind="agent", id=conv.assigned_agent_id),
            allowed=("waiting_for_human",),
            key=f"{handoff_id}_unclaimed",
        )
        await c.change_status(conv, "active", "handoff_unclaimed", "system")
        await c.outbox.resume(conv, key=ulid())
    return handled
