"""Erasure of an end user, and retention: personal data removed from Valkey and from JetStream.

`DELETE /v1/end-users/{id}` reaches core as a command: every conversation of the end user is
erased from the store (turns, originals, delivery records and addresses, threading indexes; see
`shared/store/erasure.py`), then their record and identifiers, then every message still held in a
stream (INBOUND, OUTBOUND with webhook jobs, EVENTS, DEAD) that names them: their id, one of their
conversations, or one of their identifiers (a phone number, an address). JetStream overwrites a
deleted message's bytes. What stays is one `end_user.erased` event with counts and no personal data.

Retention (`SWITCHBOARD_RETENTION_DAYS`, off by default): a periodic sweep closes and erases
conversations opened and last active more than N days ago, the same way, one
`conversation.erased` event each. Those events are kept in the store's erasure log
(`GET /v1/erasures`) as well as published. One core replica sweeps per period (a claim in Valkey). Stream
messages are matched by conversation id only (the person may have newer conversations): an inbound
channel envelope, which names the sender but not the conversation, leaves with the INBOUND
stream's own 7-day age limit.

Limits, stated: the scan reads every message the streams still hold — INBOUND, OUTBOUND and EVENTS
are work queues, so only what is not yet processed (a reply held through a provider outage, a
webhook job still retrying), and DEAD keeps 30 days — one direct get each, so erasure costs time in
proportion to that; a message an ingress publishes for the end user while the erasure runs is not
erased.
"""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import timedelta

import msgspec
from nats.js.errors import NotFoundError

from services.core.conversations import Conversations
from shared.bus import Bus
from shared.events import ConversationErased, EndUserErased, make_event
from shared.ids import new_id
from shared.models import utcnow

log = logging.getLogger("switchboard.core.erasure")


async def erase_end_user(c: Conversations, end_user_id: str, actor: str) -> dict[str, int]:
    user = await c.store.get_end_user(end_user_id)
    conversations = await c.store.get_conversations(await c.store.conversation_ids_of(end_user_id))
    needles = {user.id, *(i.value for i in user.identities)}
    for conv in conversations:
        needles.add(conv.id)
        if conv.user_address:
            needles.add(conv.user_address)
    # Streams first, then the store, the record last: an erasure cut short (a crash, a restart)
    # is simply run again, and still finds everything that names the person.
    removed = await scrub_streams(c.bus, needles)
    turns = 0
    for conv in conversations:
        turns += await c.store.erase_conversation(conv)
    await c.store.scrub_webhook_logs({conv.id for conv in conversations})
    await c.store.erase_end_user_record(user)
    counts = {"conversations": len(conversations), "turns": turns, "stream_messages": removed}
    erased = EndUserErased(
        end_user_id=user.id, conversations=len(conversations), turns=turns, stream_messages=removed
    )
    await _audit(c, erased, actor)
    log.info("end user erased", extra={"end_user_id": user.id, **counts})
    return counts


async def sweep_retention(c: Conversations, days: float, limit: int = 500) -> int:
    """Close and erase conversations idle for more than `days`; returns how many."""
    cutoff = utcnow() - timedelta(days=days)
    stale = await c.store.conversations_idle_since(cutoff, limit)
    if not stale:
        return 0
    needles: set[str] = set()
    for conv in stale:
        if conv.status != "closed":
            await c.close(conv.id, "retention", "retention")
        # Its id only: the person's address may name their newer conversations too.
        needles.add(conv.id)
    removed = await scrub_streams(c.bus, needles)
    await c.store.scrub_webhook_logs(needles)
    for conv in stale:
        turns = await c.store.erase_conversation(conv)
        await _audit(
            c,
            ConversationErased(conversation_id=conv.id, reason="retention", turns=turns),
            "retention",
        )
    log.info("retention sweep", extra={"conversations": len(stale), "stream_messages": removed})
    return len(stale)


async def scrub_streams(bus: Bus, needles: set[str]) -> int:
    """Delete every stream message whose payload names one of `needles` (case-insensitively);
    returns how many. Walks the messages each stream holds, oldest first, with direct gets by
    sequence (no consumer: INBOUND, OUTBOUND and EVENTS are work queues, which refuse a second
    consumer), up to the last message it held when the walk began."""
    wanted = [n.lower().encode() for n in needles if n]
    if not wanted:
        return 0
    s = bus.subjects
    removed = examined = 0
    started = time.perf_counter()
    for stream, subject in (
        (s.inbound_stream, s.inbound_all),
        (s.outbound_stream, s.outbound_all),
        (s.events_stream, s.events_all),
        (s.dead_stream, s.dead_all),
    ):
        info = await bus.js.stream_info(stream)
        if not info.state.messages:
            continue
        seq, last = max(info.state.first_seq, 1), info.state.last_seq
        while seq <= last:
            try:
                msg = await bus.js.get_msg(stream, seq, subject=subject, next=True)
            except NotFoundError:
                break  # nothing at or after seq
            if msg.seq is None or msg.seq > last:
                break
            examined += 1
            if any(n in (msg.data or b"").lower() for n in wanted):
                with contextlib.suppress(NotFoundError):  # acked and gone meanwhile
                    await bus.js.delete_msg(stream, msg.seq)
                    removed += 1
            seq = msg.seq + 1
    log.info(
        "streams scrubbed",
        extra={
            "examined": examined,
            "removed": removed,
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    return removed


async def _audit(c: Conversations, data: EndUserErased | ConversationErased, actor: str) -> None:
    """An audit event without personal data: ids and counts only. `live`, so webhooks get it."""
    event = make_event(
        data, id=new_id("evt"), occurred_at=utcnow(), session_type="live", actor=actor
    )
    await c.store.record_erasure(event)
    await c.bus.publish(
        c.bus.subjects.event(event.type), msgspec.json.encode(event), msg_id=event.id
    )
