"""Erasure: everything Valkey keeps about one conversation or one end user, found and deleted.

What a conversation leaves behind (all found from the conversation itself, never by scanning the
keyspace): its hash, turn log, audit events, pending queue, dedupe hash, delivery records and the
provider ids that point at them, untrimmed email originals, the email thread with its reply token
and the Message-IDs indexed for threading, the call it was, the inbound-envelope markers of its
user turns, the approvals its replies asked for, the results of its tool calls, and its place in
the conversation indexes (all, the end user's) and its thread's entry (or the entry a version before
thread keys left). An end user adds their record and the identifiers that point at it.

Kept on purpose: SMS opt-outs (a suppression list must outlive erasure, or we would text a person
who said STOP again) and usage counters (aggregates). Webhook delivery logs lose the entries of
events about the erased conversations (their event ids name them); an attempt in flight during the
erasure may still log its event id and status code afterwards.

Order: the conversation hash goes last in its own step, so a crash part-way leaves a conversation
that can be found and erased again; an end user's record goes after their conversations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from redis.asyncio.client import Pipeline

from shared.envelopes import Event
from shared.models import Conversation, EndUser
from shared.store.channels import ChannelState
from shared.store.collection import Codec, encode, text
from shared.store.conversations import Conversations
from shared.store.handoffs import Handoffs
from shared.store.turns import Turns

_doc = msgspec.json.Decoder(dict[str, Any])
_SCAN = 500
_event = Codec(Event)


class Erasure(Conversations, Turns, Handoffs, ChannelState):
    async def conversation_ids_of(self, end_user_id: str) -> list[str]:
        """Every conversation of an end user: their index, and a scan of every conversation for
        those opened before that index existed (erasure is rare; being complete matters more)."""
        indexed = await self._r.zrange(self._k.end_user_conversations(end_user_id), 0, -1)
        found: list[str] = [text(i) for i in indexed]
        lower = b"-"
        while True:
            ids = await self._r.zrangebylex(
                self._k.conversations(), lower, b"+", start=0, num=_SCAN
            )
            if not ids:
                return list(dict.fromkeys(found))
            pipe = self._r.pipeline(transaction=False)
            for cid in ids:
                pipe.hget(self._k.conversation(text(cid)), "doc")
            for cid, doc in zip(ids, await pipe.execute(), strict=True):
                if doc and _doc.decode(doc).get("end_user_id") == end_user_id:
                    found.append(text(cid))
            lower = b"(" + text(ids[-1]).encode()

    async def conversations_idle_since(self, cutoff: datetime, limit: int) -> list[Conversation]:
        """Conversations opened and last active before `cutoff`, oldest first. Ids sort by
        creation time, so the scan stops at the first conversation opened after the cutoff."""
        found: list[Conversation] = []
        lower = b"-"
        while len(found) < limit:
            ids = await self._r.zrangebylex(
                self._k.conversations(), lower, b"+", start=0, num=_SCAN
            )
            if not ids:
                break
            for conv in await self.get_conversations([text(i) for i in ids]):
                if conv.created_at >= cutoff:
                    return found
                if conv.updated_at < cutoff:
                    found.append(conv)
            lower = b"(" + text(ids[-1]).encode()
        return found[:limit]

    async def erase_conversation(self, conv: Conversation) -> int:
        """Delete everything kept about `conv`; returns how many turns it had."""
        cid = conv.id
        turns = await self.turns_after(cid, 0, conv.last_seq + 1_000_000)
        deliveries = await self.list_deliveries(cid)
        thread = await self.email_thread(cid)
        call_sid = await self.call_of(cid)
        thread_key = await self._text_at(self._k.thread_of(cid))
        if thread_key is not None:  # the entry before its pointer (keys.py, rule 3)
            await self._drop_if_names(self._k.thread(conv.channel, thread_key), cid)
        keys: list[str] = [
            self._k.thread_of(cid),
            self._k.turn_log(cid),
            self._k.events(cid),
            self._k.event_order(cid),
            self._k.pending(cid),
            self._k.seen(cid),
            self._k.deliveries(cid),
            self._k.originals(cid),
            self._k.email_thread(cid),
            self._k.call_of(cid),
            self._k.tool_results(cid),
        ]
        for delivery in deliveries:
            for pid in delivery.provider_ids:
                keys += [self._k.provider_message(pid), self._k.message_id(pid)]
        message_ids = {*thread.get("references", "").split(), thread.get("last_message_id", "")}
        keys += [self._k.message_id(m) for m in message_ids if m]
        if thread.get("reply_token"):
            keys.append(self._k.reply_token(thread["reply_token"]))
        if call_sid:
            keys.append(self._k.call(call_sid))
        keys += [self._k.inbound(t.envelope_id) for t in turns if t.envelope_id]
        # Approval ids are derived from the reply that asked for them (see core's replies).
        approvals = [f"apr_{t.id.removeprefix('turn_')}" for t in turns if t.role == "assistant"]
        if conv.approval_id:
            approvals.append(conv.approval_id)
        pipe = self._r.pipeline(transaction=False)
        for key in keys:  # one key a command: a cluster sends each to its own node
            pipe.delete(key)
        for aid in approvals:
            pipe.delete(self._k.approval(aid))
        if approvals:
            pipe.zrem(self._k.approvals(), *approvals)
            pipe.zrem(self._k.approvals_pending(), *approvals)
            pipe.zrem(self._k.approvals_unapplied(), *approvals)
        await pipe.execute()
        await self.erase_handoffs(cid)
        # A version before thread keys may have left its index entry (keys.py).
        await self._drop_if_names(
            self._k.legacy_open_conversation(
                conv.end_user_id, conv.channel, conv.our_address or ""
            ),
            cid,
        )

        def unindex(pipe: Pipeline) -> None:
            pipe.zrem(self._k.conversations(), cid)
            pipe.zrem(self._k.end_user_conversations(conv.end_user_id), cid)
            if conv.created_by:
                pipe.zrem(self._k.key_conversations(conv.created_by), cid)

        # The hash, then the index entries: a crash between leaves ids listings skip, never a
        # conversation that no index finds (keys.py, rule 3).
        await self.connection.in_order(lambda pipe: pipe.delete(self._k.conversation(cid)), unindex)
        return len(turns)

    async def erase_end_user_record(self, user: EndUser) -> None:
        """The end user's record and the identifiers that resolve to them (their conversations
        first: see `erase_conversation`)."""
        for identity in user.identities:
            key = self._k.identity(identity.kind, identity.value)
            if text(await self._r.get(key) or b"") == user.id:
                await self._r.delete(key)
        # Rate-limit windows would expire within a minute; they name the person, so not even that.
        windows = [self._k.rate(f"user:{user.id}")]
        windows += [self._k.rate(f"sms:{i.value}") for i in user.identities if i.kind == "phone"]
        await self._r.delete(*windows)
        await self._r.delete(self._k.end_user_conversations(user.id))
        await self._r.delete(self._k.end_user(user.id))

    async def scrub_webhook_logs(self, conversation_ids: set[str]) -> None:
        """Drop delivery-log entries of events about these conversations (event ids name them)."""
        if not conversation_ids:
            return
        wanted = [cid.encode() for cid in conversation_ids]
        for wid in await self._r.hkeys(self._k.webhooks()):
            key = self._k.webhook_log(text(wid))
            for entry in await self._r.lrange(key, 0, -1):
                if any(cid in entry for cid in wanted):
                    await self._r.lrem(key, 0, text(entry))

    async def record_erasure(self, event: Event, keep: int = 100_000) -> None:
        """Keep the audit record of an erasure (ids and counts, no personal data): the events
        stream is a work queue, and the erased conversations' own audit logs are gone."""
        pipe = self._r.pipeline(transaction=False)
        pipe.lpush(self._k.erasure_log(), encode(event))
        pipe.ltrim(self._k.erasure_log(), 0, keep - 1)
        await pipe.execute()

    async def erasures(self, limit: int) -> list[Event]:
        return _event.decode_present(await self._r.lrange(self._k.erasure_log(), 0, limit - 1))
