"""How the agent's reply to a user turn is produced: run the runtime, record the answer, act on
what it asked for (hand to a human, hold a tool call for approval), and deliver it.

Everything that makes the agent speak runs in the conversation's ordered consumer, so queued
messages are answered strictly in order. The answer is deduplicated by a reply key derived from
the user turn, so a redelivery after a crash finishes the first run's work instead of answering
twice.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec

from services.core.agent import AgentReply, runtime_for
from services.core.agent.runtime import PendingToolCall
from services.core.agent.tools import policy_for
from services.core.conversations import Conversations
from services.core.lifecycle import ACCEPTS_USER_TURNS
from shared.envelopes import ThreadHints
from shared.models import Approval, Author, Conversation, Status, Turn, utcnow


async def respond(
    c: Conversations,
    conv: Conversation,
    user_turn: Turn,
    *,
    thread: ThreadHints | None = None,
    stream: bool = False,
) -> Status:
    """Run the agent on one user turn and deliver its reply; returns the status after it."""
    revision = await c.revision(conv.pinned_revision_id)
    reply = runtime_for(revision).reply(
        user_turn.content, simulate=conv.session_type == "simulation"
    )
    return await answer(
        c, conv, user_turn, reply, f"{user_turn.envelope_id}:reply", thread=thread, stream=stream
    )


async def answer_pending(
    c: Conversations, conv: Conversation, before_seq: int | None = None
) -> Status:
    """Answer queued user messages in order while the conversation stays active."""
    status: Status = "active"
    while status == "active":
        seq = await c.store.next_pending(conv.id)
        if seq is None or (before_seq is not None and seq >= before_seq):
            break
        queued = await c.store.get_turn(conv.id, seq)
        if queued is not None:
            status = await respond(c, conv, queued)
        await c.store.drop_pending(conv.id, seq)
    return status


async def answer(
    c: Conversations,
    conv: Conversation,
    user_turn: Turn,
    reply: AgentReply,
    reply_key: str,
    *,
    thread: ThreadHints | None = None,
    stream: bool = False,
) -> Status:
    """Record the agent's reply and deliver it, unless a human took over meanwhile."""
    if reply.handoff and conv.channel == "voice" and not c.settings.human_queue_number:
        # Nobody to dial: the caller stays with the agent, and the gap is on record.
        await c.outbox.emit("voice.transfer_unavailable", conv, "agent", {}, key=reply_key)
        reply = AgentReply(
            text="I'm sorry, nobody from our team is available to take your call right now. "
            "I'll keep helping you myself.",
            tool_calls=tuple(
                msgspec.structs.replace(
                    call, result={"transferred": False, "reason": "no_queue_number"}
                )
                for call in reply.tool_calls
            ),
        )
    turn = Turn(
        id=f"turn_{reply_key.replace(':', '_')}",
        conversation_id=conv.id,
        seq=0,
        role="assistant",
        content=reply.text,
        author=Author(kind="agent", id=conv.assigned_agent_id),
        created_at=utcnow(),
        tool_calls=reply.tool_calls,
        evidence=reply.evidence,
        envelope_id=user_turn.envelope_id,
        channel=conv.channel,
    )
    appended = await c.store.append_turn(
        turn,
        allowed=ACCEPTS_USER_TURNS,
        dedupe_key=reply_key,
        dedupe_ttl=c.settings.dedupe_ttl_seconds,
    )
    turn = msgspec.structs.replace(turn, seq=appended.seq)
    if not appended.duplicate:
        await c.outbox.record_turn(conv, turn)
    # The ownership re-check: the append saw the status atomically. A reply produced while a
    # handoff or an approval began is kept in the transcript but never sent.
    deliver = appended.status == "active"
    status = appended.status
    if deliver and reply.handoff:
        await c.handoff(conv, reason=reply.tool_calls[0].name, actor="agent")
        status = "waiting_for_human"
    elif deliver and reply.approval is not None:
        if conv.session_type == "simulation":  # read-only: nobody will approve it
            await c.change_status(conv, "awaiting_approval", "simulated approval", "agent")
        else:
            await request_approval(c, conv, turn, reply.approval)
        status = "awaiting_approval"
    await c.outbox.deliver(
        conv, turn, user_turn, thread=thread, deliver=deliver, status=status, stream=stream
    )
    return status


async def finish_answered(
    c: Conversations,
    conv: Conversation,
    user_turn: Turn,
    *,
    thread: ThreadHints | None,
    stream: bool,
) -> bool:
    """A redelivered user turn that was answered before a crash or a lost ack: finish what that
    run left undone and re-publish (deduplicated by id). False if it was never answered."""
    seq = await c.store.seen_seq(conv.id, f"{user_turn.envelope_id}:reply")
    turn = await c.store.get_turn(conv.id, seq) if seq is not None else None
    if turn is None:
        return False
    current = await c.store.get_conversation(conv.id)
    held = next((call for call in turn.tool_calls if call.decision == "require_approval"), None)
    if held is not None and current.status == "active":
        # The crash fell between recording the suspend message and the approval.
        revision = await c.revision(conv.pinned_revision_id)
        await request_approval(
            c,
            conv,
            turn,
            PendingToolCall(held.name, dict(held.arguments), policy_for(revision, held.name)),
        )
        current = await c.store.get_conversation(conv.id)
    await c.outbox.deliver(
        conv, turn, user_turn, thread=thread, deliver=True, status=current.status, stream=stream
    )
    return True


async def request_approval(
    c: Conversations, conv: Conversation, answer: Turn, call: PendingToolCall
) -> None:
    policy = call.policy
    now = utcnow()
    approval = Approval(
        id=f"apr_{answer.id.removeprefix('turn_')}",
        conversation_id=conv.id,
        subject_ref=answer.id,
        payload={"tool": call.name, "arguments": call.arguments},
        approver_role=policy.approver_role,
        suspend_message=policy.suspend_message,
        fallback_message=policy.fallback_message,
        on_reject=policy.on_reject,
        timeout_at=now + timedelta(seconds=policy.timeout_seconds),
        created_at=now,
    )
    await c.store.create_approval(approval)
    await c.store.set_approval_id(conv.id, approval.id)
    await c.change_status(conv, "awaiting_approval", f"approval {approval.id}", "agent")
    await c.outbox.emit(
        "approval.requested",
        conv,
        "agent",
        {
            "approval_id": approval.id,
            "tool": call.name,
            "arguments": call.arguments,
            "approver_role": policy.approver_role,
            "timeout_at": approval.timeout_at.isoformat(),
        },
        key=approval.id,
    )
