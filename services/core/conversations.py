"""Applying inbound envelopes and commands to conversations: the heart of the gateway.

Every step is idempotent so a redelivered envelope converges on the same result: the user turn is
deduplicated by envelope id, the agent's reply by envelope id + ":reply", and every bus publish
carries a deterministic Nats-Msg-Id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import msgspec

from services.core.agent import AgentReply, runtime_for
from services.core.lifecycle import ACCEPTS_USER_TURNS, transition
from shared.bus import Bus, Undeliverable
from shared.envelopes import (
    CallEnded,
    CallStarted,
    Event,
    InboundEnvelope,
    InboundMessage,
    OutboundEnvelope,
    TurnReply,
)
from shared.errors import ConversationClosed, InvalidRequest, NotFound, SwitchboardError
from shared.ids import new_id
from shared.models import (
    Author,
    Channel,
    Conversation,
    Revision,
    SessionType,
    Status,
    Turn,
    utcnow,
)
from shared.settings import CoreSettings
from shared.store import Store
from shared.telemetry import Metrics

log = logging.getLogger("switchboard.core")
_enc = msgspec.json.Encoder()


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
        actor: str = "system",
    ) -> Conversation:
        agent = await self.store.get_agent(agent_id or self.settings.default_agent)
        if agent.active_revision_id is None:
            raise InvalidRequest(
                f"agent {agent.id} has no active revision", details={"agent_id": agent.id}
            )
        now = utcnow()
        conv = Conversation(
            id=new_id("conv"),
            end_user_id=end_user_id,
            channel=channel,
            status="active",
            session_type=session_type,
            assigned_agent_id=agent.id,
            pinned_revision_id=agent.active_revision_id,
            created_at=now,
            updated_at=now,
            context_variables=context_variables or {},
            our_address=our_address,
            user_address=user_address,
        )
        await self.store.create_conversation(conv)
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

    async def close(self, cid: str, reason: str, actor: str) -> Conversation:
        previous = await transition(self.store, cid, "closed", reason)
        conv = await self.store.get_conversation(cid)
        await self.emit(
            "conversation.status_changed",
            conv,
            actor,
            {"from": previous, "to": "closed", "reason": reason},
        )
        return conv

    # Inbound ------------------------------------------------------------------------------------

    async def apply_inbound(self, env: InboundEnvelope) -> None:
        if isinstance(env, InboundMessage):
            await self.apply_message(env)
        elif isinstance(env, CallStarted):
            await self.conversation_for(env)
        elif isinstance(env, CallEnded):
            conv = await self.conversation_for(env)
            if conv.status != "closed":
                await self.close(conv.id, env.reason, "channel")

    async def conversation_for(self, env: InboundEnvelope) -> Conversation:
        """The conversation an envelope belongs to, opening one for channel traffic if needed."""
        if env.conversation_id:
            return await self.store.get_conversation(env.conversation_id)
        remembered = await self.store.inbound_conversation(env.id)
        if remembered:
            return await self.store.get_conversation(remembered)
        if env.sender is None:
            raise Undeliverable("invalid: channel envelope without a sender")
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
        conv = await self.open(
            channel=env.channel,
            end_user_id=user_id,
            agent_id=None,
            session_type=env.session_type,
            our_address=env.recipient,
            user_address=env.sender.raw,
            actor="channel",
        )
        winner = await self.store.claim_open_conversation(
            user_id, env.channel, address, conv.id, previous
        )
        if winner != conv.id:
            conv = await self.store.get_conversation(winner)
        await self.store.remember_inbound(env.id, conv.id, self.settings.dedupe_ttl_seconds)
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
            await self.emit(
                "turn.created",
                conv,
                "end_user",
                {"seq": appended.seq, "role": "user", "turn_id": user_turn.id},
                key=user_turn.id,
            )
        if appended.status != "active":
            self.metrics.messages.labels("core", env.channel, "queued").inc()
            await self._publish_reply(
                TurnReply(
                    envelope_id=env.id,
                    conversation_id=conv.id,
                    outcome="queued",
                    session_status=appended.status,
                    message_seqs=(appended.seq,),
                    user_seq=appended.seq,
                )
            )
            return
        reply_key = f"{env.id}:reply"
        if appended.duplicate:
            seq = await self.store.seen_seq(conv.id, reply_key)
            if seq is not None:
                # Already answered before a crash or a lost ack: re-publish (deduplicated by id).
                answer = await self.store.get_turn(conv.id, seq)
                if answer is not None:
                    current = await self.store.get_conversation(conv.id)
                    await self._deliver(
                        conv, env, user_turn, answer, deliver=True, status=current.status
                    )
                    return
        revision = await self.revision(conv.pinned_revision_id)
        reply = runtime_for(revision).reply(env.text, simulate=conv.session_type == "simulation")
        await self.answer(conv, env, user_turn, reply, reply_key)

    async def answer(
        self,
        conv: Conversation,
        env: InboundMessage,
        user_turn: Turn,
        reply: AgentReply,
        reply_key: str,
    ) -> None:
        """Record the agent's reply and deliver it, unless a human took over meanwhile."""
        answer = Turn(
            id=f"turn_{env.id}_r",
            conversation_id=conv.id,
            seq=0,
            role="assistant",
            content=reply.text,
            author=Author(kind="agent", id=conv.assigned_agent_id),
            created_at=utcnow(),
            tool_calls=reply.tool_calls,
            evidence=reply.evidence,
            envelope_id=env.id,
            channel=conv.channel,
        )
        appended = await self.store.append_turn(
            answer,
            allowed=ACCEPTS_USER_TURNS,
            dedupe_key=reply_key,
            dedupe_ttl=self.settings.dedupe_ttl_seconds,
        )
        answer = msgspec.structs.replace(answer, seq=appended.seq)
        # The ownership re-check: the append saw the status atomically. A reply produced while a
        # handoff or an approval began is kept in the transcript but never sent.
        deliver = appended.status == "active"
        status = appended.status
        if reply.handoff and deliver:
            await self.handoff(conv, reason="transfer_call", actor="agent")
            status = "waiting_for_human"
        await self._deliver(conv, env, user_turn, answer, deliver=deliver, status=status)

    async def handoff(self, conv: Conversation, reason: str, actor: str) -> None:
        previous = await transition(self.store, conv.id, "waiting_for_human", reason)
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
        await self.emit(
            "conversation.status_changed",
            conv,
            actor,
            {"from": previous, "to": "waiting_for_human", "reason": reason},
        )
        await self.emit("handoff.started", conv, actor, {"reason": reason, "seq": appended.seq})

    async def _deliver(
        self,
        conv: Conversation,
        env: InboundMessage,
        user_turn: Turn,
        answer: Turn,
        *,
        deliver: bool,
        status: Status,
    ) -> None:
        publishes: list[Awaitable[Any]] = [
            self.emit(
                "turn.created",
                conv,
                "agent",
                {
                    "seq": answer.seq,
                    "role": "assistant",
                    "turn_id": answer.id,
                    "delivered": deliver,
                },
                key=answer.id,
            ),
        ]
        if deliver:
            outbound = OutboundEnvelope(
                id=f"out_{answer.id}",
                channel=conv.channel,
                conversation_id=conv.id,
                turn_id=answer.id,
                seq=answer.seq,
                session_type=conv.session_type,
                text=answer.content,
                recipient=conv.user_address,
                sender=conv.our_address,
                thread=env.thread,
                created_at=utcnow(),
            )
            publishes.append(
                self.bus.publish(
                    self.subjects.outbound(conv.channel), _enc.encode(outbound), msg_id=outbound.id
                )
            )
        await asyncio.gather(*publishes)
        self.metrics.messages.labels("core", env.channel, "answered" if deliver else "held").inc()
        await self._publish_reply(
            TurnReply(
                envelope_id=env.id,
                conversation_id=conv.id,
                outcome="answered" if deliver else "queued",
                session_status=status,
                message_seqs=(user_turn.seq, answer.seq),
                turn=answer,
                user_seq=user_turn.seq,
            )
        )

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

    async def emit(
        self,
        event_type: str,
        conv: Conversation,
        actor: str,
        data: dict[str, Any],
        key: str | None = None,
    ) -> Event:
        """Publish an event. With `key`, a redelivered step re-emits the same id (deduplicated)."""
        event = Event(
            id=f"evt_{event_type}_{key}" if key else new_id("evt"),
            type=event_type,
            occurred_at=utcnow(),
            conversation_id=conv.id,
            session_type=conv.session_type,
            actor=actor,
            data=data,
        )
        await self.bus.publish(self.subjects.event(event_type), _enc.encode(event), msg_id=event.id)
        return event
