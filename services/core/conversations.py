"""Applying inbound envelopes to conversations: the heart of the gateway.

Every step is idempotent so a redelivered envelope converges on the same result: the user turn is
deduplicated by envelope id, the agent's reply by a reply key, and every bus publish carries a
deterministic Nats-Msg-Id. Everything that makes the agent speak runs in the conversation's ordered
partition consumer, so queued messages are answered strictly in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import msgspec

from services.core.agent import AgentReply, runtime_for
from services.core.agent.runtime import PendingToolCall
from services.core.agent.tools import policy_for
from services.core.lifecycle import ACCEPTS_USER_TURNS, transition
from shared.bus import Bus, Undeliverable
from shared.envelopes import (
    ChannelKeyword,
    Event,
    InboundEnvelope,
    InboundMessage,
    OutboundEnvelope,
    Resume,
    StreamDelta,
    ThreadHints,
    TurnReply,
    turn_created_event,
)
from shared.errors import ConversationClosed, InvalidRequest, NotFound, SwitchboardError
from shared.ids import new_id
from shared.models import (
    Approval,
    Author,
    Channel,
    Conversation,
    Revision,
    SessionType,
    Status,
    ToolCall,
    Turn,
    utcnow,
)
from shared.settings import CoreSettings
from shared.store import Store
from shared.telemetry import Metrics

log = logging.getLogger("switchboard.core")
_enc = msgspec.json.Encoder()
_WORDS = re.compile(r"\S+\s*")


class Conversations:
    def __init__(self, settings: CoreSettings, store: Store, bus: Bus, metrics: Metrics) -> None:
        self.settings = settings
        self.store = store
        self.bus = bus
        self.subjects = bus.subjects
        self.metrics = metrics
        self._revisions: dict[str, Revision] = {}

    # Opening and closing ------------------------------------------------------------------------

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
        )
        await self.store.create_conversation(conv)
        if session_type == "live":
            await self.store.count_usage(channel, conversations=1)
        await self.emit(
            "conversation.created",
            conv,
            actor,
            {
                "channel": channel,
                "end_user_id": end_user_id,
                "agent_id": agent.id,
                "pinned_revision_id": conv.pinned_revision_id,
            },
            key=conv.id,
        )
        log.info("conversation opened", extra={"conversation_id": conv.id, "channel": channel})
        return conv

    async def change_status(self, conv: Conversation, to: Status, reason: str, actor: str) -> None:
        previous = await transition(self.store, conv.id, to, reason)
        await self.emit(
            "conversation.status_changed",
            conv,
            actor,
            {"from": previous, "to": to, "reason": reason},
        )

    async def close(self, cid: str, reason: str, actor: str) -> Conversation:
        conv = await self.store.get_conversation(cid)
        await self.change_status(conv, "closed", reason, actor)
        return await self.store.get_conversation(cid)

    async def handoff(self, conv: Conversation, reason: str, actor: str) -> None:
        await self.change_status(conv, "waiting_for_human", reason, actor)
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
        await self._record_turn(conv, msgspec.structs.replace(note, seq=appended.seq))
        await self.emit("handoff.started", conv, actor, {"reason": reason, "seq": appended.seq})

    # Inbound ------------------------------------------------------------------------------------

    async def apply_keyword(self, env: ChannelKeyword) -> None:
        """STOP / START / HELP: recorded for the end user on our number; the agent never sees it."""
        if env.sender is None:
            raise Undeliverable("invalid: keyword without a sender")
        ours, theirs = env.recipient or "", env.sender.normalized
        user_id, _ = await self.store.resolve_identity(env.sender.kind, theirs)
        if env.keyword in ("stop", "start"):
            await self.store.set_opted_out(env.channel, ours, theirs, env.keyword == "stop")
        event_type = {
            "stop": "end_user.opted_out",
            "start": "end_user.opted_in",
            "help": "end_user.help_requested",
        }[env.keyword]
        await self.emit(
            event_type,
            None,
            "end_user",
            {"channel": env.channel, "end_user_id": user_id, "our_address": ours},
            key=env.id,
            session_type=env.session_type,
        )

    async def conversation_for(self, env: InboundEnvelope) -> Conversation:
        """The conversation an envelope belongs to, opening one for channel traffic if needed."""
        if env.conversation_id:
            return await self.store.get_conversation(env.conversation_id)
        remembered = await self.store.inbound_conversation(env.id)
        if remembered:
            return await self.store.get_conversation(remembered)
        if env.sender is None:
            raise Undeliverable("invalid: channel envelope without a sender")
        if env.thread is not None and env.thread.message_id is not None:
            return await self.email_conversation_for(env, env.thread)
        if env.thread is not None and env.thread.call_sid is not None:
            return await self.call_conversation_for(env, env.thread.call_sid)
        user_id, _ = await self.store.resolve_identity(env.sender.kind, env.sender.normalized)
        address = env.recipient or ""
        previous = await self.store.open_conversation_id(user_id, env.channel, address)
        if previous:
            try:
                conv = await self.store.get_conversation(previous)
                if conv.status != "closed":
                    await self.store.remember_inbound(
                        env.id, conv.id, self.settings.dedupe_ttl_seconds
                    )
                    return conv
            except NotFound:
                pass
        conv = await self.open_for_sender(env, user_id)
        winner = await self.store.claim_open_conversation(
            user_id, env.channel, address, conv.id, previous
        )
        if winner != conv.id:
            conv = await self.store.get_conversation(winner)
        await self.store.remember_inbound(env.id, conv.id, self.settings.dedupe_ttl_seconds)
        return conv

    async def email_conversation_for(
        self, env: InboundEnvelope, thread: ThreadHints
    ) -> Conversation:
        """Mail threads by its headers, not by sender: a reply continues its conversation through
        In-Reply-To/References to our Message-IDs or its reply+TOKEN address; anything else (the
        same sender with a new subject included) opens a new one."""
        assert env.sender is not None
        assert thread.message_id is not None
        cid = await self.store.conversation_by_message_ids(
            [*thread.references, *([thread.in_reply_to] if thread.in_reply_to else [])]
        )
        if cid is None and thread.reply_token:
            cid = await self.store.conversation_by_reply_token(thread.reply_token)
        conv = await self.store.get_conversation(cid) if cid else None
        if conv is None or conv.status == "closed":
            conv = await self.open_for_sender(env)
            token = hashlib.sha256(conv.id.encode()).hexdigest()[:20]
            await self.store.put_reply_token(token, conv.id)
            await self.store.update_email_thread(
                conv.id, {"reply_token": token, "subject": thread.subject or ""}
            )
        previous = await self.store.email_thread(conv.id)
        references = " ".join(
            dict.fromkeys(
                [*previous.get("references", "").split(), *thread.references, thread.message_id]
            )
        )
        await self.store.update_email_thread(
            conv.id, {"last_message_id": thread.message_id, "references": references[-8000:]}
        )
        await self.store.index_message_ids(conv.id, [thread.message_id])
        await self.store.remember_inbound(env.id, conv.id, self.settings.dedupe_ttl_seconds)
        return conv

    async def open_for_sender(
        self, env: InboundEnvelope, user_id: str | None = None
    ) -> Conversation:
        """A new channel conversation for whoever sent `env`, answered on the same channel."""
        assert env.sender is not None
        if user_id is None:
            user_id, _ = await self.store.resolve_identity(env.sender.kind, env.sender.normalized)
        # Phones are dialled in E.164; an email reply goes to the address as the sender wrote it.
        address = env.sender.normalized if env.sender.kind == "phone" else env.sender.raw
        return await self.open(
            channel=env.channel,
            end_user_id=user_id,
            agent_id=None,
            session_type=env.session_type,
            our_address=env.recipient,
            user_address=address,
            routing_key=env.routing_key,
            actor="channel",
        )

    async def call_conversation_for(self, env: InboundEnvelope, call_sid: str) -> Conversation:
        """A phone call is one conversation, keyed by its CallSid; the caller is the same end user
        as on SMS (E.164)."""
        assert env.sender is not None
        cid = await self.store.conversation_by_call(call_sid)
        if cid is not None:
            return await self.store.get_conversation(cid)
        conv = await self.open_for_sender(env)
        await self.store.put_call(call_sid, conv.id)
        return conv

    async def apply_message(self, env: InboundMessage) -> None:
        try:
            conv = await self.conversation_for(env)
        except NotFound as exc:
            # An API turn for a conversation that does not exist: nothing to retry.
            await self._reject(env, exc)
            return
        user_turn = Turn(
            id=f"turn_{env.id}",
            conversation_id=conv.id,
            seq=0,
            role="user",
            content=env.text,
            author=Author(kind="end_user", id=conv.end_user_id),
            created_at=utcnow(),
            envelope_id=env.id,
            channel=env.channel,
        )
        try:
            appended = await self.store.append_turn(
                user_turn,
                allowed=ACCEPTS_USER_TURNS,
                dedupe_key=env.id,
                dedupe_ttl=self.settings.dedupe_ttl_seconds,
                queue_if_inactive=True,
            )
        except ConversationClosed as exc:
            await self._reject(env, exc)
            return
        user_turn = msgspec.structs.replace(user_turn, seq=appended.seq)
        if not appended.duplicate:
            await self._record_turn(conv, user_turn)
            if "full_text" in env.metadata:  # email: the turn is the new text; keep the whole
                await self.store.put_original(conv.id, appended.seq, str(env.metadata["full_text"]))
        status = appended.status
        if status == "active" and not appended.duplicate and appended.pending:
            # Messages queued while a human or an approval had the conversation come first.
            status = await self.answer_pending(conv, before_seq=appended.seq)
            if status != "active":
                await self.store.queue_pending(conv.id, appended.seq)
        if status != "active":
            if status == "awaiting_approval" and not appended.duplicate:
                await self.still_waiting(conv)
            self.metrics.messages.labels("core", env.channel, "queued").inc()
            await self._publish_reply(
                TurnReply(
                    envelope_id=env.id,
                    conversation_id=conv.id,
                    outcome="queued",
                    session_status=status,
                    message_seqs=(appended.seq,),
                    user_seq=appended.seq,
                )
            )
            return
        if appended.duplicate:
            seq = await self.store.seen_seq(conv.id, f"{env.id}:reply")
            answer = await self.store.get_turn(conv.id, seq) if seq is not None else None
            if answer is not None:
                # Answered before a crash or a lost ack: finish what that run left undone, then
                # re-publish (deduplicated by id).
                current = await self.store.get_conversation(conv.id)
                held = next(
                    (c for c in answer.tool_calls if c.decision == "require_approval"), None
                )
                if held is not None and current.status == "active":
                    # The crash fell between recording the suspend message and the approval.
                    revision = await self.revision(conv.pinned_revision_id)
                    await self.request_approval(
                        conv,
                        answer,
                        PendingToolCall(
                            held.name, dict(held.arguments), policy_for(revision, held.name)
                        ),
                    )
                    current = await self.store.get_conversation(conv.id)
                await self.deliver(
                    conv,
                    answer,
                    user_turn,
                    thread=env.thread,
                    deliver=True,
                    status=current.status,
                    stream=env.stream,
                )
                return
        await self.respond(conv, user_turn, thread=env.thread, stream=env.stream)

    async def respond(
        self,
        conv: Conversation,
        user_turn: Turn,
        *,
        thread: ThreadHints | None = None,
        stream: bool = False,
    ) -> Status:
        """Run the agent on one user turn and deliver its reply; returns the status after it."""
        revision = await self.revision(conv.pinned_revision_id)
        reply = runtime_for(revision).reply(
            user_turn.content, simulate=conv.session_type == "simulation"
        )
        return await self.answer(
            conv, user_turn, reply, f"{user_turn.envelope_id}:reply", thread=thread, stream=stream
        )

    async def answer_pending(self, conv: Conversation, before_seq: int | None = None) -> Status:
        """Answer queued user messages in order while the conversation stays active."""
        status: Status = "active"
        while status == "active":
            seq = await self.store.next_pending(conv.id)
            if seq is None or (before_seq is not None and seq >= before_seq):
                break
            queued = await self.store.get_turn(conv.id, seq)
            if queued is not None:
                status = await self.respond(conv, queued)
            await self.store.drop_pending(conv.id, seq)
        return status

    async def answer(
        self,
        conv: Conversation,
        user_turn: Turn,
        reply: AgentReply,
        reply_key: str,
        *,
        thread: ThreadHints | None = None,
        stream: bool = False,
    ) -> Status:
        """Record the agent's reply and deliver it, unless a human took over meanwhile."""
        if reply.handoff and conv.channel == "voice" and not self.settings.human_queue_number:
            # Nobody to dial: the caller stays with the agent, and the gap is on record.
            await self.emit("voice.transfer_unavailable", conv, "agent", {}, key=reply_key)
            reply = AgentReply(
                text="I'm sorry, nobody from our team is available to take your call right now. "
                "I'll keep helping you myself.",
                tool_calls=tuple(
                    msgspec.structs.replace(
                        c, result={"transferred": False, "reason": "no_queue_number"}
                    )
                    for c in reply.tool_calls
                ),
            )
        answer = Turn(
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
        appended = await self.store.append_turn(
            answer,
            allowed=ACCEPTS_USER_TURNS,
            dedupe_key=reply_key,
            dedupe_ttl=self.settings.dedupe_ttl_seconds,
        )
        answer = msgspec.structs.replace(answer, seq=appended.seq)
        if not appended.duplicate:
            await self._record_turn(conv, answer)
        # The ownership re-check: the append saw the status atomically. A reply produced while a
        # handoff or an approval began is kept in the transcript but never sent.
        deliver = appended.status == "active"
        status = appended.status
        if deliver and reply.handoff:
            await self.handoff(conv, reason=reply.tool_calls[0].name, actor="agent")
            status = "waiting_for_human"
        elif deliver and reply.approval is not None:
            if conv.session_type == "simulation":  # read-only: nobody will approve it
                await self.change_status(conv, "awaiting_approval", "simulated approval", "agent")
            else:
                await self.request_approval(conv, answer, reply.approval)
            status = "awaiting_approval"
        await self.deliver(
            conv, answer, user_turn, thread=thread, deliver=deliver, status=status, stream=stream
        )
        return status

    async def request_approval(
        self, conv: Conversation, answer: Turn, call: PendingToolCall
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
        await self.store.create_approval(approval)
        await self.store.set_approval_id(conv.id, approval.id)
        await self.change_status(conv, "awaiting_approval", f"approval {approval.id}", "agent")
        await self.emit(
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

    async def still_waiting(self, conv: Conversation) -> None:
        """Tell a user who writes during an approval that we are waiting: once per approval."""
        current = await self.store.get_conversation(conv.id)
        if not current.approval_id or not await self.store.claim_once(
            f"notice:{current.approval_id}"
        ):
            return
        await self.say(
            conv,
            self.settings.still_waiting_message,
            author=Author(kind="system"),
            allowed=("awaiting_approval",),
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
        turn = Turn(
            id=f"turn_{key}" if key else new_id("turn"),
            conversation_id=conv.id,
            seq=0,
            role="assistant",
            content=text,
            author=author,
            created_at=utcnow(),
            channel=conv.channel,
            tool_calls=tool_calls,
        )
        appended = await self.store.append_turn(
            turn, allowed=allowed, dedupe_key=key, dedupe_ttl=self.settings.dedupe_ttl_seconds
        )
        turn = msgspec.structs.replace(turn, seq=appended.seq)
        if not appended.duplicate:
            await self._record_turn(conv, turn)
        await self.publish_outbound(conv, turn, thread=None)
        return turn

    # Delivery -----------------------------------------------------------------------------------

    async def deliver(
        self,
        conv: Conversation,
        answer: Turn,
        user_turn: Turn,
        *,
        thread: ThreadHints | None,
        deliver: bool,
        status: Status,
        stream: bool = False,
    ) -> None:
        envelope_id = user_turn.envelope_id or answer.id
        if deliver:
            if stream:
                for piece in _WORDS.findall(answer.content):
                    await self.bus.publish_core(
                        self.subjects.stream(conv.id),
                        _enc.encode(StreamDelta(envelope_id=envelope_id, text=piece)),
                    )
            await self.publish_outbound(conv, answer, thread=thread)
        self.metrics.messages.labels("core", conv.channel, "answered" if deliver else "held").inc()
        await self._publish_reply(
            TurnReply(
                envelope_id=envelope_id,
                conversation_id=conv.id,
                outcome="answered" if deliver else "queued",
                session_status=status,
                message_seqs=(user_turn.seq, answer.seq),
                turn=answer,
                user_seq=user_turn.seq,
            )
        )

    async def publish_outbound(
        self, conv: Conversation, turn: Turn, thread: ThreadHints | None
    ) -> None:
        if conv.session_type == "simulation":
            return  # read-only: nothing leaves for a real channel
        outbound = OutboundEnvelope(
            id=f"out_{turn.id}",
            channel=conv.channel,
            conversation_id=conv.id,
            turn_id=turn.id,
            seq=turn.seq,
            session_type=conv.session_type,
            text=turn.content,
            recipient=conv.user_address,
            sender=conv.our_address,
            thread=thread,
            author_kind=turn.author.kind,
            created_at=utcnow(),
        )
        await self.bus.publish(
            self.subjects.outbound(conv.channel, conv.user_address or conv.id),
            _enc.encode(outbound),
            msg_id=outbound.id,
        )

    async def _record_turn(self, conv: Conversation, turn: Turn) -> None:
        """Publish the turn's `turn.created` event (the append already put it in the audit log)."""
        event = turn_created_event(turn, conv.session_type)
        work: list[Awaitable[Any]] = [
            self.bus.publish(self.subjects.event(event.type), _enc.encode(event), msg_id=event.id)
        ]
        if conv.session_type == "live" and turn.role != "system":
            work.append(self.store.count_usage(conv.channel, turns=1))
        await asyncio.gather(*work)

    async def _reject(self, env: InboundMessage, exc: SwitchboardError) -> None:
        self.metrics.messages.labels("core", env.channel, "rejected").inc()
        log.info("inbound rejected: %s", exc.code, extra={"envelope_id": env.id})
        if env.conversation_id:
            status = exc.details.get("status", "closed")
            await self._publish_reply(
                TurnReply(
                    envelope_id=env.id,
                    conversation_id=env.conversation_id,
                    outcome="rejected",
                    session_status=status,
                    error_code=exc.code,
                    error_message=exc.message,
                )
            )

    # Bus helpers --------------------------------------------------------------------------------

    async def revision(self, revision_id: str) -> Revision:
        revision = self._revisions.get(revision_id)
        if revision is None:
            revision = self._revisions[revision_id] = await self.store.get_revision(revision_id)
        return revision

    async def _publish_reply(self, reply: TurnReply) -> None:
        await self.bus.publish_core(self.subjects.reply(reply.conversation_id), _enc.encode(reply))

    async def resume(self, conv: Conversation, key: str) -> None:
        """Ask the conversation's ordered consumer to answer what queued while it was not active."""
        env = Resume(
            id=f"env_resume_{key}",
            channel=conv.channel,
            received_at=utcnow(),
            session_type=conv.session_type,
            conversation_id=conv.id,
        )
        await self.bus.publish(
            self.subjects.inbound(conv.channel, conv.partition_key), _enc.encode(env), msg_id=env.id
        )

    async def emit(
        self,
        event_type: str,
        conv: Conversation | None,
        actor: str,
        data: dict[str, Any],
        key: str | None = None,
        session_type: SessionType | None = None,
    ) -> Event:
        """Publish an event and keep it in its conversation's audit log.

        With `key`, a redelivered step re-emits the same id, deduplicated in both places.
        """
        event = Event(
            id=f"evt_{event_type}_{key}" if key else new_id("evt"),
            type=event_type,
            occurred_at=utcnow(),
            conversation_id=conv.id if conv else None,
            session_type=conv.session_type if conv else session_type,
            actor=actor,
            data=data,
        )
        work: list[Awaitable[Any]] = [
            self.bus.publish(self.subjects.event(event_type), _enc.encode(event), msg_id=event.id)
        ]
        if conv is not None:
            work.append(self.store.record_event(conv.id, event))
        await asyncio.gather(*work)
        return event
