"""How an inbound message is applied as a user turn: find its conversation, append the turn
(deduplicated by envelope id, queued if the conversation is not active), answer what queued
before it, then answer it or tell the waiting request that it is queued.
"""

from __future__ import annotations

from services.core import handoffs, replies, routing
from services.core.conversations import Conversations, Known
from services.core.lifecycle import ACCEPTS_USER_TURNS
from shared.envelopes import ChannelKeyword, InboundMessage, TurnReply
from shared.errors import ConversationClosed, NotFound, Undeliverable
from shared.events import EndUserHelpRequested, EndUserOptedIn, EndUserOptedOut
from shared.models import Author, Conversation, Turn, utcnow


async def apply_message(c: Conversations, env: InboundMessage) -> None:
    # An API turn names a conversation this process has usually seen: the append itself returns
    # the conversation, so the turn costs no read before it (`Known`).
    known = c.known(env.conversation_id)
    if known is not None:
        if await _apply_to(c, env, known):
            return
        c.forget(known.id)  # erased meanwhile: the path below reads it, and says so
    try:
        conv = await routing.conversation_for(c, env)
    except NotFound as exc:
        # An API turn for a conversation that does not exist: nothing to retry.
        await c.outbox.reject(env, exc)
        return
    await _apply_to(c, env, c.remember(conv) if env.conversation_id else conv)


async def _apply_to(c: Conversations, env: InboundMessage, target: Conversation | Known) -> bool:
    """Append the message as a user turn of `target` and answer it (or queue it). False if the
    conversation `target` knows of no longer exists (nothing was done)."""
    user_turn = Turn(
        id=f"turn_{env.id}",
        conversation_id=target.id,
        seq=0,
        role="user",
        content=env.text,
        author=Author(kind="end_user", id=target.end_user_id),
        created_at=utcnow(),
        envelope_id=env.id,
        channel=env.channel,
        message_id=env.thread.message_id if env.channel == "email" and env.thread else None,
    )
    try:
        user_turn, appended = await c.append(
            target,
            user_turn,
            allowed=ACCEPTS_USER_TURNS,
            key=env.id,
            queue_if_inactive=True,
            current=True,
        )
    except ConversationClosed as exc:
        await c.outbox.reject(env, exc)
        return True
    except NotFound:
        if isinstance(target, Conversation):
            raise
        return False
    assert appended.conversation is not None  # asked for with `current`
    conv = appended.conversation
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
        c.metrics.count("core", env.channel, "queued")
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
        return True
    if appended.duplicate and await replies.finish_answered(
        c, conv, user_turn, thread=env.thread, stream=env.stream
    ):
        return True
    await replies.respond(c, conv, user_turn, thread=env.thread, stream=env.stream)
    return True


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
