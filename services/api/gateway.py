"""What the API asks of the rest of the gateway: commands to core, and turns through JetStream."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from shared.bus import Bus
from shared.envelopes import Command, CommandResult, InboundMessage, TurnReply
from shared.errors import TurnTimeout, Unavailable, error_from_code
from shared.ids import new_id
from shared.models import Conversation, utcnow
from shared.settings import ApiSettings
from shared.store import Store

_enc = msgspec.json.Encoder()
_result = msgspec.json.Decoder(CommandResult)
_reply = msgspec.json.Decoder(TurnReply)


def envelope_id_for(conversation_id: str, idempotency_key: str | None) -> str:
    """A client's Idempotency-Key maps to one envelope id, so its retries are one turn."""
    if not idempotency_key:
        return new_id("env")
    digest = hashlib.sha256(f"{conversation_id}\x00{idempotency_key}".encode()).hexdigest()
    return f"env_idem_{digest[:32]}"


class Gateway:
    def __init__(self, settings: ApiSettings, bus: Bus, store: Store) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.subjects = bus.subjects

    async def command(self, verb: str, command: Command) -> Conversation:
        try:
            raw = await self.bus.request(
                self.subjects.command(verb),
                _enc.encode(command),
                timeout=self.settings.command_timeout_seconds,
            )
        except (NoRespondersError, NatsTimeout) as exc:
            raise Unavailable("core did not answer; try again") from exc
        result = _result.decode(raw)
        if not result.ok or result.conversation is None:
            raise error_from_code(
                result.error_code or "internal_error",
                result.error_message or "command failed",
                result.error_details,
            )
        return result.conversation

    async def post_turn(
        self,
        conv: Conversation,
        text: str,
        *,
        idempotency_key: str | None,
        metadata: dict[str, Any],
    ) -> TurnReply:
        """Publish the user's message durably and wait for core's reply to that very envelope."""
        env = InboundMessage(
            id=envelope_id_for(conv.id, idempotency_key),
            channel="api",
            received_at=utcnow(),
            session_type=conv.session_type,
            conversation_id=conv.id,
            text=text,
            metadata=metadata,
        )
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[TurnReply] = loop.create_future()

        async def on_reply(msg: Msg) -> None:
            reply = _reply.decode(msg.data)
            if reply.envelope_id == env.id and not answered.done():
                answered.set_result(reply)

        # Subscribed before publishing, on the same connection: the reply cannot overtake us.
        sub = await self.bus.nc.subscribe(self.subjects.reply(conv.id), cb=on_reply)
        try:
            ack = await self.bus.publish(
                self.subjects.inbound("api", conv.id), _enc.encode(env), msg_id=env.id
            )
            if ack.duplicate:
                # A client retry of an envelope JetStream already holds: answer from the store if
                # core is done with it, else wait for the reply of the delivery in flight.
                earlier = await self.earlier_reply(conv.id, env.id)
                if earlier is not None:
                    return earlier
            return await asyncio.wait_for(answered, self.settings.turn_timeout_seconds)
        except TimeoutError as exc:
            raise TurnTimeout(
                "the agent did not answer in time; the turn is accepted and will "
                "appear in the transcript",
                details={"envelope_id": env.id},
            ) from exc
        finally:
            await sub.unsubscribe()

    async def earlier_reply(self, cid: str, envelope_id: str) -> TurnReply | None:
        conv = await self.store.get_conversation(cid)
        user_seq = await self.store.seen_seq(cid, envelope_id)
        if user_seq is None:
            return None
        answer_seq = await self.store.seen_seq(cid, f"{envelope_id}:reply")
        answer = await self.store.get_turn(cid, answer_seq) if answer_seq else None
        if answer is not None:
            return TurnReply(
                envelope_id=envelope_id,
                conversation_id=cid,
                outcome="answered",
                session_status=conv.status,
                message_seqs=(user_seq, answer.seq),
                turn=answer,
                user_seq=user_seq,
            )
        if conv.status != "active":
            return TurnReply(
                envelope_id=envelope_id,
                conversation_id=cid,
                outcome="queued",
                session_status=conv.status,
                message_seqs=(user_seq,),
                user_seq=user_seq,
            )
        return None
