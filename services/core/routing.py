"""How an inbound message finds its conversation.

The API names its conversation. Channel traffic carries a thread key computed by its ingress (SMS:
sender + our number; a call: its CallSid; mail: the thread's root Message-ID), and one rule maps
(channel, thread key) to the thread's open conversation, or opens a new one answered by the agent
the routing table names for our number or address (else the default). Each channel says only how
its key is looked up and indexed (`Threads`): SMS keeps the key itself in the store's thread index
(one thread per phone number and our number: two numbers linked to one end user text in two
conversations, each answered on its own number; the agent still sees both through the end user's
history), a call keeps its one conversation per CallSid even once closed, and mail also matches any
Message-ID of ours it references and its reply+TOKEN address. Every decision is remembered against
the envelope id, so a redelivered envelope lands in the same conversation even if another one was
opened meanwhile.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.core.conversations import Conversations
from shared.envelopes import InboundEnvelope, email_thread_key, sms_thread_key
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
    threads = _THREADS.get(env.channel, BY_KEY)
    key = env.thread_key or legacy_thread_key(env)
    found = await threads.find(c, env, key)
    conv = await _current(c, found, threads.closed_ends_thread)
    if conv is None:
        conv = await threads.claim(c, env, key, await open_for_sender(c, env), found)
    await threads.joined(c, env, conv)
    await c.store.remember_inbound(env.id, conv.id, c.settings.dedupe_ttl_seconds)
    return conv


def legacy_thread_key(env: InboundEnvelope) -> str:
    """The thread key of an envelope from an ingress older than `thread_key`, by the same recipes
    the ingress uses now. Remove once no such envelope can be in a stream."""
    assert env.sender is not None
    hints = env.thread
    if hints is not None and hints.message_id is not None:
        return email_thread_key(hints.message_id, hints.in_reply_to, hints.references)
    if hints is not None and hints.call_sid is not None:
        return hints.call_sid
    return sms_thread_key(env.sender.normalized, env.recipient or "")


async def _current(
    c: Conversations, cid: str | None, closed_ends_thread: bool
) -> Conversation | None:
    """The thread's conversation, unless there is none (or it closed, where that ends a thread)."""
    if cid is None:
        return None
    try:
        conv = await c.store.get_conversation(cid)
    except NotFound:
        return None
    return None if closed_ends_thread and conv.status == "closed" else conv


Find = Callable[[Conversations, InboundEnvelope, str], Awaitable[str | None]]
Claim = Callable[
    [Conversations, InboundEnvelope, str, Conversation, str | None], Awaitable[Conversation]
]
Joined = Callable[[Conversations, InboundEnvelope, Conversation], Awaitable[None]]


async def _nothing(c: Conversations, env: InboundEnvelope, conv: Conversation) -> None:
    return None


@dataclass(frozen=True)
class Threads:
    """How one channel's thread keys map to conversations."""

    find: Find  # the conversation the thread key names (if any)
    claim: Claim  # make the key name this new conversation (or return the one that beat it)
    closed_ends_thread: bool = True  # a closed conversation's thread continues in a new one
    joined: Joined = _nothing  # after the envelope has its conversation


# SMS (and any channel without its own index): the thread key names the conversation ----------------


async def _find_by_key(c: Conversations, env: InboundEnvelope, key: str) -> str | None:
    found = await c.store.thread_conversation(env.channel, key)
    if found is None:  # perhaps a thread an older version indexed by end user (the store moves it)
        assert env.sender is not None
        user_id, _ = await c.store.resolve_identity(env.sender.kind, env.sender.normalized)
        found = await c.store.adopt_legacy_thread(
            env.channel, key, user_id, env.recipient or "", user_address(env)
        )
    return found


async def _claim_by_key(
    c: Conversations, env: InboundEnvelope, key: str, conv: Conversation, previous: str | None
) -> Conversation:
    winner = await c.store.claim_thread(env.channel, key, conv.id, previous)
    return conv if winner == conv.id else await c.store.get_conversation(winner)


BY_KEY = Threads(find=_find_by_key, claim=_claim_by_key)


# Calls: one conversation per CallSid -----------------------------------------------------------------


async def _find_call(c: Conversations, env: InboundEnvelope, key: str) -> str | None:
    return await c.store.conversation_by_call(key)


async def _claim_call(
    c: Conversations, env: InboundEnvelope, key: str, conv: Conversation, previous: str | None
) -> Conversation:
    await c.store.put_call(key, conv.id)
    # The voice service may be waiting for it (a caller who speaks before we are done).
    await c.bus.publish_core(c.subjects.call_opened(key), conv.id.encode())
    return conv


# The caller is the same end user as on SMS (E.164); the call ending closes its conversation,
# and what arrives for the call after that still belongs to it.
CALLS = Threads(find=_find_call, claim=_claim_call, closed_ends_thread=False)


# Mail: by its headers, not by sender -------------------------------------------------------------


async def _find_mail(c: Conversations, env: InboundEnvelope, key: str) -> str | None:
    """A reply continues its conversation through In-Reply-To/References to any of our
    Message-IDs (the root, the key, among them) or its reply+TOKEN address; anything else (the
    same sender with a new subject included) opens a new one."""
    thread = env.thread
    if thread is None:
        return None
    cid = await c.store.conversation_by_message_ids(
        [*thread.references, *([thread.in_reply_to] if thread.in_reply_to else [])]
    )
    if cid is None and thread.reply_token:
        cid = await c.store.conversation_by_reply_token(thread.reply_token)
    return cid


async def _claim_mail(
    c: Conversations, env: InboundEnvelope, key: str, conv: Conversation, previous: str | None
) -> Conversation:
    token = hashlib.sha256(conv.id.encode()).hexdigest()[:20]
    await c.store.put_reply_token(token, conv.id)
    subject = env.thread.subject if env.thread else None
    await c.store.update_email_thread(conv.id, {"reply_token": token, "subject": subject or ""})
    return conv


async def _mail_joined(c: Conversations, env: InboundEnvelope, conv: Conversation) -> None:
    """The thread headers our replies continue (References grows with every message)."""
    thread = env.thread
    if thread is None or thread.message_id is None:
        return
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


MAIL = Threads(find=_find_mail, claim=_claim_mail, joined=_mail_joined)

_THREADS: dict[str, Threads] = {"voice": CALLS, "email": MAIL}


async def open_for_sender(
    c: Conversations, env: InboundEnvelope, user_id: str | None = None
) -> Conversation:
    """A new channel conversation for whoever sent `env`, answered on the same channel."""
    assert env.sender is not None
    if user_id is None:
        user_id, _ = await c.store.resolve_identity(env.sender.kind, env.sender.normalized)
    return await c.open(
        channel=env.channel,
        end_user_id=user_id,
        # The routing table names the agent for our number or address; unrouted: the default.
        agent_id=await c.store.routed_agent(env.recipient),
        session_type=env.session_type,
        our_address=env.recipient,
        user_address=user_address(env),
        routing_key=env.routing_key,
        actor="channel",
    )


def user_address(env: InboundEnvelope) -> str:
    """Where replies to the sender go: phones are dialled in E.164; an email reply goes to the
    address as the sender wrote it."""
    assert env.sender is not None
    return env.sender.normalized if env.sender.kind == "phone" else env.sender.raw
