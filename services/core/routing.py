"""How an inbound message finds its conversation.

The API names its conversation; channel traffic is threaded here, and a new channel conversation
is answered by the agent the routing table names for our number or address (else the default). SMS finds the end user's open
conversation on our number (opening one if there is none or it is closed), a call is one
conversation per CallSid, and mail threads by its headers. Every decision is remembered against
the envelope id, so a redelivered envelope lands in the same conversation even if another one was
opened meanwhile.
"""

from __future__ import annotations

import hashlib

from services.core.conversations import Conversations
from shared.envelopes import InboundEnvelope, ThreadHints
from shared.errors import NotFound, Undeliverable
from shared.models import Conversation


async def conversation_for(c: Conversations, env: InboundEnvelope) -> Conversation:
    """The conversation an envelope belongs to, opening one for channel traffic if needed."""
    if env.conversation_id:
        return await c.store.get_conversation(env.conversation_id)
    remembered = await c.store.inbound_conversation(env.id)
    if remembered:
        return await c.store.get_conversation(remembered)
    if env.sender is None:
        raise Undeliverable("invalid: channel envelope without a sender")
    if env.thread is not None and env.thread.message_id is not None:
        return await email_conversation_for(c, env, env.thread)
    if env.thread is not None and env.thread.call_sid is not None:
        return await call_conversation_for(c, env, env.thread.call_sid)
    user_id, _ = await c.store.resolve_identity(env.sender.kind, env.sender.normalized)
    address = env.recipient or ""
    previous = await c.store.open_conversation_id(user_id, env.channel, address)
    if previous:
        try:
            conv = await c.store.get_conversation(previous)
            if conv.status != "closed":
                await c.store.remember_inbound(env.id, conv.id, c.settings.dedupe_ttl_seconds)
                return conv
        except NotFound:
            pass
    conv = await open_for_sender(c, env, user_id)
    winner = await c.store.claim_open_conversation(user_id, env.channel, address, conv.id, previous)
    if winner != conv.id:
        conv = await c.store.get_conversation(winner)
    await c.store.remember_inbound(env.id, conv.id, c.settings.dedupe_ttl_seconds)
    return conv


async def email_conversation_for(
    c: Conversations, env: InboundEnvelope, thread: ThreadHints
) -> Conversation:
    """Mail threads by its headers, not by sender: a reply continues its conversation through
    In-Reply-To/References to our Message-IDs or its reply+TOKEN address; anything else (the
    same sender with a new subject included) opens a new one."""
    assert env.sender is not None
    assert thread.message_id is not None
    cid = await c.store.conversation_by_message_ids(
        [*thread.references, *([thread.in_reply_to] if thread.in_reply_to else [])]
    )
    if cid is None and thread.reply_token:
        cid = await c.store.conversation_by_reply_token(thread.reply_token)
    conv = await c.store.get_conversation(cid) if cid else None
    if conv is None or conv.status == "closed":
        conv = await open_for_sender(c, env)
        token = hashlib.sha256(conv.id.encode()).hexdigest()[:20]
        await c.store.put_reply_token(token, conv.id)
        await c.store.update_email_thread(
            conv.id, {"reply_token": token, "subject": thread.subject or ""}
        )
    previous = await c.store.email_thread(conv.id)
    references = " ".join(
        dict.fromkeys(
            [*previous.get("references", "").split(), *thread.references, thread.message_id]
        )
    )
    await c.store.update_email_thread(
        conv.id, {"last_message_id": thread.message_id, "references": references[-8000:]}
    )
    await c.store.index_message_ids(conv.id, [thread.message_id])
    await c.store.remember_inbound(env.id, conv.id, c.settings.dedupe_ttl_seconds)
    return conv


async def call_conversation_for(
    c: Conversations, env: InboundEnvelope, call_sid: str
) -> Conversation:
    """A phone call is one conversation, keyed by its CallSid; the caller is the same end user
    as on SMS (E.164)."""
    assert env.sender is not None
    cid = await c.store.conversation_by_call(call_sid)
    if cid is not None:
        return await c.store.get_conversation(cid)
    conv = await open_for_sender(c, env)
    await c.store.put_call(call_sid, conv.id)
    # The voice service may be waiting for it (a caller who speaks before we are done).
    await c.bus.publish_core(c.subjects.call_opened(call_sid), conv.id.encode())
    return conv


async def open_for_sender(
    c: Conversations, env: InboundEnvelope, user_id: str | None = None
) -> Conversation:
    """A new channel conversation for whoever sent `env`, answered on the same channel."""
    assert env.sender is not None
    if user_id is None:
        user_id, _ = await c.store.resolve_identity(env.sender.kind, env.sender.normalized)
    # Phones are dialled in E.164; an email reply goes to the address as the sender wrote it.
    address = env.sender.normalized if env.sender.kind == "phone" else env.sender.raw
    return await c.open(
        channel=env.channel,
        end_user_id=user_id,
        # The routing table names the agent for our number or address; unrouted: the default.
        agent_id=await c.store.routed_agent(env.recipient),
        session_type=env.session_type,
        our_address=env.recipient,
        user_address=address,
        routing_key=env.routing_key,
        actor="channel",
    )
