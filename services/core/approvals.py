"""Approvals: deciding held tool calls, carrying decisions out, and the durable deadline timer.

A decision is made atomically in the store (a second one is 409), then carried out by the
conversation's ordered consumer through an `approval_decided` envelope. Decided-but-not-carried-out
approvals stay in an index the timer re-sends until core confirms, so a crash loses none; the
deadline index lives in Valkey, so timeouts survive core restarts.
"""

from __future__ import annotations

import logging
import time

import msgspec

from services.core import replies
from services.core.conversations import Conversations
from shared.envelopes import ApprovalDecided
from shared.errors import Conflict, NotFound
from shared.events import ApprovalResolved
from shared.models import Approval, Author, Conversation, utcnow

log = logging.getLogger("switchboard.core.approvals")
_enc = msgspec.json.Encoder()
# How long a decided approval may wait for core before the timer sends it again.
RESEND_AFTER_SECONDS = 5.0


async def resolve(
    c: Conversations,
    conversation_id: str,
    approval_id: str,
    decision: str,
    reviewer: str,
    note: str | None,
    reviewer_name: str | None = None,
) -> Approval:
    approval = await c.store.get_approval(approval_id)
    if approval.conversation_id != conversation_id:
        raise NotFound(f"approval {approval_id} not found in conversation {conversation_id}")
    status = "approved" if decision == "approve" else "rejected"
    approval = await c.store.resolve_approval(approval_id, status, reviewer, note, reviewer_name)
    await _decided(c, approval)
    return approval


async def _decided(c: Conversations, approval: Approval) -> None:
    conv = await c.store.get_conversation(approval.conversation_id)
    await c.outbox.emit(
        ApprovalResolved(
            approval_id=approval.id,
            status=approval.status,
            note=approval.note,
            reviewer_name=approval.reviewer_name,
        ),
        conv,
        approval.reviewer or "system",
        key=approval.id,
    )
    await publish_decided(c, approval.id, conv)


async def publish_decided(c: Conversations, approval_id: str, conv: Conversation) -> None:
    env = ApprovalDecided(
        id=f"env_decided_{approval_id}",
        channel=conv.channel,
        received_at=utcnow(),
        approval_id=approval_id,
        session_type=conv.session_type,
        conversation_id=conv.id,
        order_key=conv.partition_key,
    )
    await c.bus.publish(
        c.subjects.inbound(conv.channel, conv.partition_key), _enc.encode(env), msg_id=env.id
    )


async def apply_decision(c: Conversations, approval_id: str) -> None:
    """Carry out a decided approval. Idempotent: each message is keyed, each step re-checked."""
    approval = await c.store.get_approval(approval_id)
    conv = await c.store.get_conversation(approval.conversation_id)
    if approval.status == "pending":
        return
    if conv.status != "awaiting_approval" or conv.approval_id != approval.id:
        await c.store.mark_applied(approval.id)  # carried out before a redelivery
        return
    actor = approval.reviewer or "system"
    agent = Author(kind="agent", id=conv.assigned_agent_id)
    if approval.status == "approved":
        reply = await replies.resume_after_approval(c, conv, approval)
        await c.say(
            conv,
            reply.text,
            author=agent,
            allowed=("awaiting_approval",),
            key=f"{approval.id}_result",
            tool_calls=reply.tool_calls,
        )
        await c.change_status(conv, "active", f"approval {approval.id} approved", actor)
        await replies.answer_pending(c, conv)
    elif approval.status == "rejected" and approval.on_reject == "continue":
        note = f": {approval.note}" if approval.note else "."
        await c.say(
            conv,
            f"I wasn't able to do that{note} Is there anything else I can help with?",
            author=agent,
            allowed=("awaiting_approval",),
            key=f"{approval.id}_result",
        )
        await c.change_status(conv, "active", f"approval {approval.id} rejected", actor)
        await replies.answer_pending(c, conv)
    else:
        reason = "approval_timed_out" if approval.status == "timed_out" else "approval_rejected"
        await c.say(
            conv,
            approval.fallback_message,
            author=Author(kind="system"),
            allowed=("awaiting_approval",),
            key=f"{approval.id}_result",
        )
        await c.change_status(conv, "closed", reason, actor)
    await c.store.mark_applied(approval.id)


async def sweep(c: Conversations) -> int:
    """Time out approvals past their deadline; re-send decisions core has not carried out."""
    now = time.time()
    handled = 0
    for approval_id in await c.store.approvals_due(now):
        try:
            approval = await c.store.resolve_approval(
                approval_id, "timed_out", "system", "no decision before the deadline"
            )
        except Conflict:
            await c.store.mark_unapplied(approval_id)  # decided meanwhile: heal the index
            continue
        log.info(
            "approval timed out",
            extra={"approval_id": approval_id, "conversation_id": approval.conversation_id},
        )
        await _decided(c, approval)
        handled += 1
    for approval_id in await c.store.approvals_unapplied(before=now - RESEND_AFTER_SECONDS):
        approval = await c.store.get_approval(approval_id)
        conv = await c.store.get_conversation(approval.conversation_id)
        await publish_decided(c, approval_id, conv)
        handled += 1
    return handled
