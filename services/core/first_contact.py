"""Conversations opened through the API, including ones where we write first on SMS or email.

An SMS or email conversation opened with the end user's address gets our side of the channel
too (our number, our support address), the same routing key inbound traffic from that person
would have, and the indexes their replies are matched by: the thread of (their number, our number)
for SMS, a reply token for email. So an operator's or agent's first message is delivered, and the
answer continues the same conversation.
"""

from __future__ import annotations

import hashlib

from services.core.conversations import Conversations
from shared.envelopes import OpenConversation, sms_thread_key
from shared.errors import AddressRequired, ConversationExists, NotFound
from shared.models import Conversation


def our_address(c: Conversations, channel: str) -> str:
    if channel == "sms":
        if not c.settings.sms_from_number:
            raise AddressRequired(
                "no number to text from: set SWITCHBOARD_SMS_FROM_NUMBER",
                details={"setting": "SWITCHBOARD_SMS_FROM_NUMBER"},
            )
        return c.settings.sms_from_number
    return f"{c.settings.email_from_local}@{c.settings.domains()[0]}"


async def open_conversation(c: Conversations, cmd: OpenConversation) -> Conversation:
    if cmd.user_address is None or cmd.channel not in ("sms", "email"):
        return await c.open(
            channel=cmd.channel,
            end_user_id=cmd.end_user_id,
            agent_id=cmd.agent_id,
            session_type=cmd.session_type,
            context_variables=cmd.context_variables,
            actor=cmd.actor,
        )
    ours = our_address(c, cmd.channel)
    # SMS: the thread of the person's texts from that number to ours (as the SMS ingress keys it).
    thread = sms_thread_key(cmd.user_address, ours) if cmd.channel == "sms" else None
    previous = None
    if thread is not None:
        previous = await c.store.thread_conversation("sms", thread)
        if previous is None:  # a thread an older version indexed by end user
            previous = await c.store.adopt_legacy_thread(
                "sms", thread, cmd.end_user_id, ours, cmd.user_address
            )
        await _refuse_if_open(c, previous)
    conv = await c.open(
        channel=cmd.channel,
        end_user_id=cmd.end_user_id,
        # Without an agent_id, the agent routed for our number or address, as for inbound traffic.
        agent_id=cmd.agent_id or await c.store.routed_agent(ours),
        session_type=cmd.session_type,
        context_variables=cmd.context_variables,
        our_address=ours,
        user_address=cmd.user_address,
        # What the person's own messages to us are ordered by: same partition, same order.
        routing_key=f"{cmd.user_address}|{ours}",
        actor=cmd.actor,
    )
    if thread is not None:
        winner = await c.store.claim_thread("sms", thread, conv.id, previous)
        if winner != conv.id:  # their text opened one meanwhile: keep theirs
            await c.close(conv.id, "superseded", cmd.actor)
            raise ConversationExists(
                "this number already has an open SMS conversation with ours",
                details={"conversation_id": winner},
            )
    else:
        token = hashlib.sha256(conv.id.encode()).hexdigest()[:20]
        await c.store.put_reply_token(token, conv.id)
        await c.store.update_email_thread(conv.id, {"reply_token": token, "subject": ""})
    return conv


async def _refuse_if_open(c: Conversations, cid: str | None) -> None:
    if cid is None:
        return
    try:
        existing = await c.store.get_conversation(cid)
    except NotFound:
        return
    if existing.status != "closed":
        raise ConversationExists(
            "this number already has an open SMS conversation with ours",
            details={"conversation_id": existing.id, "status": existing.status},
        )
