"""How the agent's reply to a user turn is produced: run the runtime, record the answer, act on
what it asked for (hand to a human, hold a tool call for approval), and deliver it.

Everything that makes the agent speak runs in the conversation's ordered consumer, so queued
messages are answered strictly in order. The answer is deduplicated by a reply key derived from
the user turn, so a redelivery after a crash finishes the first run's work instead of answering
twice.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import timedelta
from typing import Any

import msgspec

from services.core.agent.context import ToolOutcome
from services.core.agent.runtime import DeltaSink
from services.core.agent.steps import (
    Answer,
    PendingToolCall,
    decode_steps,
    encode_steps,
    run_steps,
    run_tool_once,
    tool_key,
)
from services.core.agent.tools import policy_for
from services.core.context import build_context
from services.core.conversations import Conversations
from services.core.lifecycle import ACCEPTS_USER_TURNS
from shared.envelopes import StreamDelta, ThreadHints
from shared.events import AgentFailed, ApprovalRequested, VoiceTransferUnavailable
from shared.ids import reply_key
from shared.models import Approval, Author, Conversation, Status, ToolCall, Turn, utcnow

_enc = msgspec.json.Encoder()


class ToolResults:
    """The tool ledger of one conversation in Valkey: results by idempotency key."""

    def __init__(self, c: Conversations, conversation_id: str) -> None:
        self.c = c
        self.conversation_id = conversation_id

    async def recall(self, key: str) -> tuple[bool, Any]:
        raw = await self.c.store.tool_result(self.conversation_id, key)
        return (True, msgspec.json.decode(raw)) if raw is not None else (False, None)

    async def record(self, key: str, result: Any) -> None:
        await self.c.store.put_tool_result(
            self.conversation_id, key, _enc.encode(result), self.c.settings.dedupe_ttl_seconds
        )


async def produce(
    c: Conversations,
    conv: Conversation,
    user_turn: Turn,
    *,
    stream: bool = False,
    steps: tuple[ToolOutcome, ...] = (),
    approvals: bool = True,
    turn_key: str | None = None,
) -> Answer:
    """Ask the conversation's runtime for its answer to `user_turn`, tools run under the
    revision's policies. A runtime that fails leaves the fallback text and an `agent.failed`
    event, never silence."""
    revision = await c.revision(conv.pinned_revision_id)
    runtime = await c.runtimes.for_revision(revision, lambda: c.store.revision_secrets(revision.id))
    context = await build_context(
        c.store,
        c.runtimes,
        runtime,
        conv,
        user_turn,
        revision,
        history_turns=c.settings.agent_history_turns,
    )
    on_delta: DeltaSink | None = None
    if stream:
        envelope_id = user_turn.envelope_id or user_turn.id
        subject = c.outbox.stream_subject(conv.id, envelope_id)

        async def on_delta(piece: str) -> None:
            await c.bus.publish_core(
                subject, _enc.encode(StreamDelta(envelope_id=envelope_id, text=piece))
            )

    key = turn_key or reply_key(user_turn.envelope_id)
    started = time.perf_counter()
    answer = await run_steps(
        runtime,
        msgspec.structs.replace(context, tool_results=steps),
        revision,
        c.runtimes.tools,
        ToolResults(c, conv.id),
        turn_key=key,
        simulate=conv.session_type == "simulation",
        on_delta=on_delta,
        approvals=approvals,
        secrets=c.runtimes.secrets_of(revision.id),
    )
    c.metrics.observe(f"agent_{revision.runtime}", time.perf_counter() - started)
    if answer.failure is not None:
        await c.outbox.emit(
            AgentFailed(
                runtime=revision.runtime,
                reason=answer.failure,
                attempts=answer.attempts,
                seq=user_turn.seq,
            ),
            conv,
            "agent",
            key=key.replace(":", "_"),
        )
    return answer


async def respond(
    c: Conversations,
    conv: Conversation,
    user_turn: Turn,
    *,
    thread: ThreadHints | None = None,
    stream: bool = False,
) -> Status:
    """Run the agent on one user turn and deliver its reply; returns the status after it."""
    reply = await produce(c, conv, user_turn, stream=stream)
    return await answer(
        c, conv, user_turn, reply, reply_key(user_turn.envelope_id), thread=thread, stream=stream
    )


async def resume_after_approval(c: Conversations, conv: Conversation, approval: Approval) -> Answer:
    """Run an approved tool call (once: keyed by the approval) and give its result back to the
    runtime, which writes the reply. The turn does not wait for a second approval."""
    revision = await c.revision(conv.pinned_revision_id)
    name = str(approval.payload["tool"])
    arguments = dict(approval.payload.get("arguments", {}))
    result = await run_tool_once(
        c.runtimes.tools,
        ToolResults(c, conv.id),
        revision,
        name,
        arguments,
        key=tool_key(approval.id, name, arguments),
        conversation_id=conv.id,
        simulate=conv.session_type == "simulation",
        secrets=await c.store.revision_secrets(revision.id) if revision.tools else {},
    )
    approved = ToolOutcome(
        id=str(approval.payload.get("call_id") or "call_approved"),
        name=name,
        arguments=arguments,
        decision="approved",
        result=result,
    )
    seq = approval.payload.get("user_seq")
    user_turn = await c.store.get_turn(conv.id, int(seq)) if isinstance(seq, int) else None
    if user_turn is None:  # an approval from before turns were resumed through the runtime
        user_turn = Turn(
            id=f"turn_{approval.id}",
            conversation_id=conv.id,
            seq=0,
            role="user",
            content=f"(approved: {name})",
            author=Author(kind="end_user", id=conv.end_user_id),
            created_at=approval.created_at,
            channel=conv.channel,
        )
    answer = await produce(
        c,
        conv,
        user_turn,
        steps=(*decode_steps(approval.payload.get("steps")), approved),
        approvals=False,
        turn_key=approval.id,
    )
    call = ToolCall(name=name, arguments=arguments, result=result, decision="approved")
    return dataclasses.replace(answer, tool_calls=(call, *answer.tool_calls))


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
            # An email answered late still names the mail it answers (In-Reply-To).
            thread = ThreadHints(message_id=queued.message_id) if queued.message_id else None
            status = await respond(c, conv, queued, thread=thread)
        await c.store.drop_pending(conv.id, seq)
    return status


async def answer(
    c: Conversations,
    conv: Conversation,
    user_turn: Turn,
    reply: Answer,
    reply_key: str,
    *,
    thread: ThreadHints | None = None,
    stream: bool = False,
) -> Status:
    """Record the agent's reply and deliver it, unless a human took over meanwhile."""
    if reply.handoff and conv.channel == "voice" and not await _queue_number(c, conv):
        # Nobody to dial: the caller stays with the agent, and the gap is on record.
        await c.outbox.emit(VoiceTransferUnavailable(), conv, "agent", key=reply_key)
        reply = Answer(
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
    turn, appended = await c.append(conv, turn, allowed=ACCEPTS_USER_TURNS, key=reply_key)
    # The ownership re-check: the append saw the status atomically. A reply produced while a
    # handoff or an approval began is kept in the transcript but never sent.
    deliver = appended.status == "active"
    status = appended.status
    if deliver and reply.handoff:
        await c.handoff(conv, reason=reply.tool_calls[-1].name, actor="agent")
        status = "waiting_for_human"
    elif deliver and reply.approval is not None:
        if conv.session_type == "simulation":  # read-only: nobody will approve it
            await c.change_status(conv, "awaiting_approval", "simulated approval", "agent")
        else:
            await request_approval(c, conv, turn, reply.approval, user_turn.seq)
        status = "awaiting_approval"
    await c.outbox.deliver(
        conv,
        turn,
        user_turn,
        thread=thread,
        deliver=deliver,
        status=status,
        stream=stream and not reply.streamed,
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
    seq = await c.store.seen_seq(conv.id, reply_key(user_turn.envelope_id))
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
            PendingToolCall(
                held.name,
                dict(held.arguments),
                policy_for(revision, held.name),
                # The turn's earlier tool steps are on the recorded answer, before the held one.
                steps=tuple(
                    ToolOutcome(
                        id=f"call_{i + 1}",
                        name=call.name,
                        arguments=dict(call.arguments),
                        decision=call.decision,
                        result=call.result,
                    )
                    for i, call in enumerate(turn.tool_calls[: turn.tool_calls.index(held)])
                ),
            ),
            user_turn.seq,
        )
        current = await c.store.get_conversation(conv.id)
    await c.outbox.deliver(
        conv, turn, user_turn, thread=thread, deliver=True, status=current.status, stream=stream
    )
    return True


def approval_payload(call: PendingToolCall, user_seq: int) -> dict[str, Any]:
    """What an approver sees (`tool`, `arguments`), plus what resuming the turn needs: the call's
    id, the turn's earlier tool steps and the user turn it answers."""
    payload: dict[str, Any] = {"tool": call.name, "arguments": call.arguments}
    if call.call_id:
        payload["call_id"] = call.call_id
    if call.steps:
        payload["steps"] = encode_steps(call.steps)
    payload["user_seq"] = user_seq
    return payload


async def request_approval(
    c: Conversations, conv: Conversation, answer: Turn, call: PendingToolCall, user_seq: int
) -> None:
    policy = call.policy
    now = utcnow()
    approval = Approval(
        id=f"apr_{answer.id.removeprefix('turn_')}",
        conversation_id=conv.id,
        subject_ref=answer.id,
        payload=approval_payload(call, user_seq),
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
        ApprovalRequested(
            approval_id=approval.id,
            tool=call.name,
            arguments=call.arguments,
            approver_role=policy.approver_role,
            timeout_at=approval.timeout_at.isoformat(),
        ),
        conv,
        "agent",
        key=approval.id,
    )


async def _queue_number(c: Conversations, conv: Conversation) -> str | None:
    """Where a transfer dials: the conversation's revision says, else the gateway's setting."""
    revision = await c.revision(conv.pinned_revision_id)
    return revision.human_queue_number or c.settings.human_queue_number
