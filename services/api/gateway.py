"""What the API asks of the rest of the gateway: commands to core, and turns through JetStream."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from services.api.screens import OperatorScreens
from shared.bus import Bus, Reply, ReplyInbox
from shared.envelopes import (
    Command,
    CommandResult,
    InboundMessage,
    TurnReply,
)
from shared.errors import TurnTimeout, Unavailable, error_from_code
from shared.events import EventData, make_event, type_of
from shared.ids import new_id, reply_key
from shared.models import Conversation, utcnow
from shared.ratelimit import Limit, RateLimiter
from shared.settings import ApiSettings
from shared.store import Store

_enc = msgspec.json.Encoder()
_result = msgspec.json.Decoder(CommandResult)


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
        self.inbox = ReplyInbox(bus)  # opened by the app's lifespan, with the bus
        # Streams re-read once every core has heard of them: the announcement at once, else
        # core's next read of the presence key (settings.operator_presence_seconds, the same
        # setting as core's) — plus a second for the announcement's flight and the read.
        self.screens = OperatorScreens(store, bus, settings.operator_presence_seconds + 1.0)
        self.limiter = RateLimiter(store.connection)
        self._end_users: dict[str, str] = {}  # conversation id -> end user id

    def key_limit(self, key_id: str) -> Limit:
        return Limit(f"key:{key_id}", self.settings.rate_limit_per_key_per_second, 1.0, "API key")

    def end_user_limit(self, end_user_id: str) -> Limit:
        return Limit(
            f"user:{end_user_id}",
            self.settings.rate_limit_turns_per_end_user_per_minute,
            60.0,
            "end user",
        )

    async def conversation_for_turn(self, conversation_id: str, key_id: str) -> Conversation:
        """The conversation a turn goes to, with the key's and its end user's rate limits counted
        in the same round trip (a conversation's end user never changes, so it is remembered)."""
        end_user = self._end_users.get(conversation_id)
        limits = [self.key_limit(key_id)]
        if end_user is not None:
            limits.append(self.end_user_limit(end_user))
        conv = await self.store.get_conversation_rate_limited(conversation_id, self.limiter, limits)
        if end_user is None:
            if len(self._end_users) >= 100_000:
                self._end_users.clear()
            self._end_users[conv.id] = conv.end_user_id
            await self.limiter.check(self.end_user_limit(conv.end_user_id))
        return conv

    async def run(self, verb: str, command: Command, timeout: float | None = None) -> CommandResult:
        """Ask core to do something and wait for its answer; core's errors come back as ours."""
        try:
            raw = await self.bus.request(
                self.subjects.command(verb),
                _enc.encode(command),
                timeout=timeout or self.settings.command_timeout_seconds,
            )
        except (NoRespondersError, NatsTimeout) as exc:
            raise Unavailable("core did not answer; try again") from exc
        result = _result.decode(raw)
        if not result.ok:
            raise error_from_code(
                result.error_code or "internal_error",
                result.error_message or "command failed",
                result.error_details,
            )
        return result

    async def audit(self, data: EventData, key: str, actor: str) -> None:
        """Publish an audit event that belongs to no conversation (webhooks get it: `live`).
        `key` makes its id, so a retried request's event is stored once (JetStream dedupe)."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        event_type = type_of(data)
        event = make_event(
            data,
            id=f"evt_{event_type}_{digest}",
            occurred_at=utcnow(),
            session_type="live",
            actor=actor,
        )
        await self.bus.publish(self.subjects.event(event_type), _enc.encode(event), msg_id=event.id)

    async def command(self, verb: str, command: Command) -> Conversation:
        result = await self.run(verb, command)
        if result.conversation is None:
            raise Unavailable(f"core answered {verb} without a conversation")
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
        reply: TurnReply | None = None
        # Read to its end (the feed stops after the reply), so the generator closes here and
        # now, not later through the event loop's async-generator finaliser.
        async for item in self.turn_feed(
            conv, text, idempotency_key=idempotency_key, metadata=metadata, stream=False
        ):
            if isinstance(item, TurnReply):
                reply = item
        if reply is None:  # unreachable: the feed ends with a reply or raises
            raise TurnTimeout("the agent did not answer")
        return reply

    async def turn_feed(
        self,
        conv: Conversation,
        text: str,
        *,
        idempotency_key: str | None,
        metadata: dict[str, Any],
        stream: bool,
    ) -> AsyncGenerator[Reply, None]:
        """Yield the reply's deltas (when `stream`) and then the reply itself."""
        env = InboundMessage(
            id=envelope_id_for(conv.id, idempotency_key),
            channel="api",
            received_at=utcnow(),
            session_type=conv.session_type,
            conversation_id=conv.id,
            # Core orders it with the conversation's channel traffic (an SMS or email
            # conversation's own key), not apart from it.
            order_key=conv.partition_key,
            text=text,
            metadata=metadata,
            stream=stream,
            reply_inbox=self.inbox.token,
        )
        deadline = asyncio.get_running_loop().time() + self.settings.turn_timeout_seconds
        # Expected before publishing: the reply cannot arrive before anyone waits for it.
        with self.inbox.expect(env.id) as replies:
            # Not stored → Unavailable (503): only a stored message may be called accepted below.
            ack = await self.bus.publish(
                self.subjects.inbound("api", conv.partition_key), _enc.encode(env), msg_id=env.id
            )
            if not ack.duplicate:
                async for item in _until_reply(replies, deadline, env.id):
                    yield item
                return
        # A client retry of an envelope JetStream already holds: core answers the first publish,
        # whose request may wait in another process. Listening from now, then reading the store
        # (core records the answer before it replies), misses neither an answer already given
        # nor one still to come.
        async with self.inbox.following(conv.id, env.id) as feed:
            earlier = await self.earlier_reply(conv.id, env.id)
            if earlier is not None:
                yield earlier
                return
            async for item in _until_reply(feed, deadline, env.id):
                yield item

    async def webhooks_changed(self) -> None:
        """Tell core at once that webhook subscriptions changed (services/core/audience.py):
        published before the request is answered, on the connection the client's next turn
        will be published on, so core hears of it first."""
        await self.bus.publish_core(self.subjects.webhooks_changed, b"")

    async def earlier_reply(self, cid: str, envelope_id: str) -> TurnReply | None:
        conv = await self.store.get_conversation(cid)
        user_seq = await self.store.seen_seq(cid, envelope_id)
        if user_seq is None:
            return None
        answer_seq = await self.store.seen_seq(cid, reply_key(envelope_id))
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


async def _until_reply(
    replies: asyncio.Queue[Reply], deadline: float, envelope_id: str
) -> AsyncGenerator[Reply, None]:
    """What arrives for one envelope, up to and including its reply, by `deadline`."""
    while True:
        try:
            item = replies.get_nowait()
        except asyncio.QueueEmpty:
            try:
                # Only the wait runs under the deadline, never the caller's work between items.
                async with asyncio.timeout_at(deadline):
                    item = await replies.get()
            except TimeoutError as exc:
                raise TurnTimeout(
                    "the agent did not answer in time; the turn is accepted and will "
                    "appear in the transcript",
                    details={"envelope_id": envelope_id},
                ) from exc
        yield item
        if isinstance(item, TurnReply):
            return
