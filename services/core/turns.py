"""How an inbound message is applied as a user turn: find its conversation, append the turn
(deduplicated by envelope id, queued if the conversation is not active), answer what queued
before it, then answer it or tell the waiting request that it is queued.
"""

from __future__ import annotations

from services.core import handoffs, replies, routing
from services.core.conversations import Conversations
from services.core.lifecycle import ACCEPTS_USER_TURNS
from shared.envelopes import ChannelKeyword, InboundMessage, TurnReply
from shared.errors import ConversationClosed, NotFound, Undeliverable
from shared.events import EndUserHelpRequested, EndUserOptedIn, EndUserOptedOut
from shared.models import Author, Conversation, Turn, utcnow


async def apply_message(c: Conversations, env: InboundMessage) -> None:
    try:
        conv = await routing.conversation_for(c, env)
    except NotFound as exc:
        # An API turn for a conversation that does not exist: nothing to retry.
        await c.outbox.reject(env, exc)
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
        message_id=env.thread.message_id if env.channel == "email" and env.thread else None,
    )
    try:
        user_turn, appended = await c.append(
            conv, user_turn, allowed=ACCEPTS_USER_TURNS, key=env.id, queue_if_inactive=True
        )
    except ConversationClosed as exc:
        await c.outbox.reject(env, exc)
        return
    if not appended.duplicate and env.original_text is not None:
        # Email: the turn is the new text; keep the whole.
        await c.store.put_original(conv.id, appended.seq, env.original_text)
    status = appended.status
    if status == "active" and not appended.duplicate and appended.pending:
        # Messages queued while a human or an approval had the conversation come first.
        status = await replies.answer_pending(c, conv, before_seq=appended.seq)
        if status != "active":
            await c.store.queue_pending(conv.id, appended.seq)
    if status != "active":
        if status == "awaiting_approval" and not appended.duplicate:
            await still_waiting(c, conv)
        elif status == "waiting_for_human":
            await handoffs.acknowledge_while_waiting(c, conv, appended.duplicate)
        c.metrics.messages.labels("core", env.channel, "queued").inc()
        await c.outbox.publish_reply(
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
    if appended.duplicate and await replies.finish_answered(
        c, conv, user_turn, thread=env.thread, stream=env.stream
    ):
        return
    await replies.respond(c, conv, user_turn, thread=env.thread, stream=env.stream)


async def apply_keyword(c: Conversations, env: ChannelKeyword) -> None:
    """STOP / START / HELP: recorded for the end user on our number; the agent never sees it."""
    if env.sender is None:
        raise Undeliverable("invalid: keyword without a sender")
    ours, theirs = env.recipient or "", env.sender.normalized
    user_id, _ = await c.store.resolve_identity(env.sender.kind, theirs)
    if env.keyword in ("stop", "start"):
        await c.store.set_opted_out(env.channel, ours, theirs, env.keyword == "stop")
    kind: type[EndUserOptedOut | EndUserOptedIn | EndUserHelpRequested]
    match env.keyword:
        case "stop":
            kind = EndUserOptedOut
        case "start":
            kind = EndUserOptedIn
        case "help":
            kind = EndUserHelpRequested
    await c.outbox.emit(
        kind(channel=env.channel, end_user_id=user_id, our_address=ours),
        None,
        "end_user",
        key=env.id,
        session_type=env.session_type,
    )


async def still_waiting(c: Conversations, conv: Conversation) -> None:
    """Tell a user who writes during an approval that we are waiting: once per approval."""
    current = await c.store.get_conversation(conv.id)
    if not current.approval_id or not await c.store.claim_once(f"notice:{current.approval_id}"):
        return
    await c.say(
        conv,
        c.settings.still_waiting_message,
        author=Author(kind="system"),
        allowed=("awaiting_approval",),
    )
