"""What leaves core: outbound envelopes for the channels, events, replies and token streams.

Every durable publish carries a deterministic Nats-Msg-Id derived from the turn or event it
carries, so a redelivered step re-publishes the same message and JetStream drops the copy. Replies
(`gw.reply.*`) and token deltas (`gw.stream.*`) are core NATS, fire-and-forget: they only wake a
waiting request, which can always read the durable state instead. They go to the inbox of the
process that waits (`reply_inbox` on the envelope, shared/bus/replies.py) while that envelope is
applied (`answering`), else to the conversation's subject (an older API or voice service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Iterator
from typing import Any

import msgspec

from services.core.audience import OperatorAudience, WebhookAudience
from shared.bus import Bus
from shared.envelopes import (
    Event,
    InboundMessage,
    OutboundEnvelope,
    Resume,
    StreamDelta,
    ThreadHints,
    TurnReply,
    turn_created_event,
)
from shared.errors import SwitchboardError
from shared.events import (
    ApprovalCancelled,
    ApprovalRequested,
    ApprovalResolved,
    ConversationStatusChanged,
    EventData,
    HandoffAssigned,
    HandoffResolved,
    HandoffStarted,
    HandoffUnclaimed,
    TurnNotice,
    make_event,
    type_of,
)
from shared.ids import new_id
from shared.models import Channel, Conversation, SessionType, Status, Turn, utcnow
from shared.store import Store
from shared.telemetry import Metrics

log = logging.getLogger("switchboard.core")
_enc = msgspec.json.Encoder()
_WORDS = re.compile(r"\S+\s*")


def for_operators(data: EventData) -> bool:
    """What operators' screens follow, besides every `turn.created` (see `_notice`)."""
    match data:
        case HandoffStarted() | HandoffAssigned() | HandoffResolved() | HandoffUnclaimed():
            return True
        case ApprovalRequested() | ApprovalResolved() | ApprovalCancelled():
            return True
        case ConversationStatusChanged():
            return True
        case _:
            return False


class Outbox:
    def __init__(
        self,
        store: Store,
        bus: Bus,
        metrics: Metrics,
        audience: WebhookAudience,
        screens: OperatorAudience,
    ) -> None:
        self.store = store
        self.bus = bus
        self.subjects = bus.subjects
        self.metrics = metrics
        # Events go through the broker, and notices to operators' screens, only while someone
        # reads them there (audience.py).
        self.audience = audience
        self.screens = screens
        self._inboxes: dict[str, str] = {}  # envelope id -> the inbox waiting for its reply

    @contextlib.contextmanager
    def answering(self, env: InboundMessage) -> Iterator[None]:
        """While `env` is applied, its reply and deltas go to the inbox it names, if any."""
        if env.reply_inbox is None:
            yield
            return
        self._inboxes[env.id] = env.reply_inbox
        try:
            yield
        finally:
            self._inboxes.pop(env.id, None)

    def reply_subject(self, conversation_id: str, envelope_id: str) -> str:
        return self.subjects.reply(conversation_id, self._inboxes.get(envelope_id))

    def stream_subject(self, conversation_id: str, envelope_id: str) -> str:
        return self.subjects.stream(conversation_id, self._inboxes.get(envelope_id))

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
        """Send an answer to the user (unless `deliver` is False: held, kept in the transcript
        only) and wake the request waiting for it."""
        envelope_id = user_turn.envelope_id or answer.id
        if deliver:
            if stream:
                subject = self.stream_subject(conv.id, envelope_id)
                for piece in _WORDS.findall(answer.content):
                    await self.bus.publish_core(
                        subject,
                        _enc.encode(StreamDelta(envelope_id=envelope_id, text=piece)),
                    )
            await self.publish_outbound(conv, answer, thread=thread)
        self.metrics.count("core", conv.channel, "answered" if deliver else "held")
        await self.publish_reply(
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
        if conv.channel == "api":
            # Nothing delivers API messages: the client has the answer in its response, and reads
            # everything else (operators' turns, late answers) from the transcript or its stream.
            return
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

    async def publish_reply(self, reply: TurnReply) -> None:
        subject = self.reply_subject(reply.conversation_id, reply.envelope_id)
        await self.bus.publish_core(subject, _enc.encode(reply))

    async def record_turn(self, turn: Turn, session_type: SessionType, channel: Channel) -> None:
        """Publish the turn's `turn.created` event to whoever reads it off the broker: webhook
        subscriptions, operators' screens (the append already put it in the audit log and
        counted it in usage)."""
        webhooks, screens = self.audience.wants(session_type), self.screens.wants(session_type)
        if not (webhooks or screens):
            return  # the common case: nobody reads it off the broker
        event = turn_created_event(turn, session_type, channel)
        work: list[Awaitable[Any]] = []
        if webhooks:
            work.append(
                self.bus.publish(
                    self.subjects.event(event.type), _enc.encode(event), msg_id=event.id
                )
            )
        if screens:
            notice = make_event(
                TurnNotice(seq=turn.seq),
                id=event.id,
                occurred_at=event.occurred_at,
                conversation_id=event.conversation_id,
                session_type=event.session_type,
                actor=event.actor,
            )
            work.append(self._notice(notice))
        await (work[0] if len(work) == 1 else asyncio.gather(*work))

    async def reject(self, env: InboundMessage, exc: SwitchboardError) -> None:
        """An inbound message that cannot become a turn: tell the request waiting for it why."""
        self.metrics.count("core", env.channel, "rejected")
        log.info("inbound rejected: %s", exc.code, extra={"envelope_id": env.id})
        if env.conversation_id:
            status = exc.details.get("status", "closed")
            await self.publish_reply(
                TurnReply(
                    envelope_id=env.id,
                    conversation_id=env.conversation_id,
                    outcome="rejected",
                    session_status=status,
                    error_code=exc.code,
                    error_message=exc.message,
                )
            )

    async def resume(self, conv: Conversation, key: str) -> None:
        """Ask the conversation's ordered consumer to answer what queued while it was not active."""
        env = Resume(
            id=f"env_resume_{key}",
            channel=conv.channel,
            received_at=utcnow(),
            session_type=conv.session_type,
            conversation_id=conv.id,
            order_key=conv.partition_key,
        )
        await self.bus.publish(
            self.subjects.inbound(conv.channel, conv.partition_key), _enc.encode(env), msg_id=env.id
        )

    async def emit(
        self,
        data: EventData,
        conv: Conversation | None,
        actor: str,
        key: str | None = None,
        session_type: SessionType | None = None,
    ) -> Event:
        """Publish an event and keep it in its conversation's audit log.

        With `key`, a redelivered step re-emits the same id, deduplicated in both places.
        """
        event_type = type_of(data)
        event = make_event(
            data,
            id=f"evt_{event_type}_{key}" if key else new_id("evt"),
            occurred_at=utcnow(),
            conversation_id=conv.id if conv else None,
            session_type=conv.session_type if conv else session_type,
            actor=actor,
        )
        work: list[Awaitable[Any]] = []
        if self.audience.wants(event.session_type):
            work.append(
                self.bus.publish(
                    self.subjects.event(event_type), _enc.encode(event), msg_id=event.id
                )
            )
        if for_operators(data) and self.screens.wants(event.session_type):
            work.append(self._notice(event))
        if conv is not None:
            work.append(self.store.record_event(conv.id, event))
        await asyncio.gather(*work)
        return event

    async def _notice(self, event: Event) -> None:
        """Operators' screens (the console's live inbox) follow these on core NATS while one is
        open, whether or not a webhook subscription makes events go through JetStream; nothing is
        stored, so a screen that missed one re-reads the API (it does on every reconnect)."""
        await self.bus.publish_core(self.subjects.operator_event(event.type), _enc.encode(event))
