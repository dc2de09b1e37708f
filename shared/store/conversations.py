"""Conversations: the hash, the status transitions, and the indexes that find one (by id, newest
first, by (channel, thread key), by the inbound envelope that opened it)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import msgspec
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from shared.errors import ConversationClosed, IllegalTransition, NotFound
from shared.models import Conversation, SessionType, Status, utcnow
from shared.store.collection import Aggregate, Page, encode, not_found, text
from shared.store.connection import Connection

if TYPE_CHECKING:
    from shared.ratelimit import Limit, RateLimiter

conversation_doc = msgspec.json.Decoder(dict[str, Any])

# KEYS: conv. ARGV: new status, legal from-statuses ("a,b"), updated_at, reason. The reason is
# kept as `closed_reason` only when the new status is `closed`; reopening clears it.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'', 'not_found'} end
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[3])
    if ARGV[1] == 'closed' and ARGV[4] ~= '' then
      redis.call('HSET', KEYS[1], 'closed_reason', ARGV[4])
    elseif ARGV[1] ~= 'closed' then
      redis.call('HDEL', KEYS[1], 'closed_reason')
    end
    return {status, 'ok'}
  end
end
return {status, 'illegal'}
"""

# KEYS: a thread's entry. ARGV: the conversation claiming it, the closed one it may replace ('' if
# none). Returns the conversation the entry names afterwards.
_CLAIM_THREAD = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[2] then return current end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# KEYS: an index entry. ARGV: a conversation id. Deletes the entry only while it names that one.
_DROP_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def conversation_not_found(cid: str) -> NotFound:
    return not_found("conversation", cid, "conversation_id")


def status_forbids(status: str, message: str, details: dict[str, Any]) -> Exception:
    """The error for a change the conversation's current status does not allow."""
    error = ConversationClosed if status == "closed" else IllegalTransition
    return error(message, details=details)


def conversation_from_hash(raw: dict[Any, Any]) -> Conversation:
    doc = conversation_doc.decode(raw[b"doc"])
    doc["status"] = raw[b"status"].decode()
    doc["last_seq"] = int(raw[b"last_seq"])
    doc["updated_at"] = datetime.fromisoformat(raw[b"updated_at"].decode())
    for field in (b"closed_reason", b"approval_id", b"handoff_id"):
        if field in raw:
            doc[field.decode()] = raw[field].decode()
    if b"operator_id" in raw:  # a person has the conversation: they are its assigned agent
        doc["assigned_agent_id"] = raw[b"operator_id"].decode()
    return msgspec.convert(doc, Conversation, strict=False)


class Conversations(Aggregate):
    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._transition = connection.script(_TRANSITION)
        self._claim_thread = connection.script(_CLAIM_THREAD)
        self._drop_if = connection.script(_DROP_IF)

    async def create_conversation(self, conv: Conversation) -> None:
        doc = msgspec.structs.asdict(conv)
        status, last_seq = doc.pop("status"), doc.pop("last_seq")
        doc.pop("updated_at")
        doc.pop("closed_reason")
        doc.pop("approval_id")
        doc.pop("handoff_id")

        def index(pipe: Pipeline) -> None:
            # Ids are time-sortable, so a lexicographic index pages in creation order.
            pipe.zadd(self._k.conversations(), {conv.id: 0})
            # The end user's conversations on every channel, for the agent's cross-channel history.
            pipe.zadd(self._k.end_user_conversations(conv.end_user_id), {conv.id: 0})
            if conv.created_by and conv.created_by.startswith("key_"):  # opened through the API
                # What a client key with `own` visibility lists, without scanning everyone's.
                pipe.zadd(self._k.key_conversations(conv.created_by), {conv.id: 0})

        def record(pipe: Pipeline) -> None:
            pipe.hset(
                self._k.conversation(conv.id),
                mapping={
                    "doc": encode(doc),
                    "status": status,
                    "last_seq": last_seq,
                    "updated_at": conv.updated_at.isoformat(),
                },
            )

        # The indexes first: a crash between leaves an id listings skip, never a conversation
        # that erasure cannot find (keys.py, rule 3).
        await self.connection.in_order(index, record)

    async def end_user_conversation_ids(self, end_user_id: str, limit: int) -> list[str]:
        """The end user's newest `limit` conversation ids (ids sort by creation time)."""
        key = self._k.end_user_conversations(end_user_id)
        return [text(i) for i in await self._r.zrevrangebylex(key, b"+", b"-", start=0, num=limit)]

    async def key_opened_conversation_with(self, key_id: str, end_user_id: str) -> bool:
        """Whether the API key opened any conversation with this end user."""
        ids = [
            text(i)
            for i in await self._r.zrange(self._k.end_user_conversations(end_user_id), 0, -1)
        ]
        if not ids:
            return False
        scores = await self._r.zmscore(self._k.key_conversations(key_id), ids)
        return any(score is not None for score in scores)

    async def get_conversation(self, cid: str) -> Conversation:
        raw = await self._r.hgetall(self._k.conversation(cid))
        if not raw:
            raise conversation_not_found(cid)
        return conversation_from_hash(raw)

    async def session_type_of(self, cid: str | None) -> SessionType:
        """The session type of a conversation; `live` when there is none (or it was erased), so
        provider events about unknown messages still reach webhooks."""
        doc = await self._r.hget(self._k.conversation(cid), "doc") if cid else None
        return cast(
            SessionType, conversation_doc.decode(doc).get("session_type", "live") if doc else "live"
        )

    async def get_conversation_rate_limited(
        self, cid: str, limiter: RateLimiter, limits: list[Limit]
    ) -> Conversation:
        """The conversation, with one hit of each limit counted in the same round trip.
        Raises NotFound before RateLimited: an unknown conversation is the caller's first problem."""
        for attempt in (1, 2):
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(self._k.conversation(cid))
            limiter.queue(pipe, limits)
            try:
                raw, *results = await pipe.execute()
                break
            except NoScriptError:
                if attempt == 2:
                    raise
                await limiter.load()  # the server lost its scripts (restart): load, run again
        if not raw:
            raise conversation_not_found(cid)
        limiter.verdict(limits, results)
        return conversation_from_hash(raw)

    async def get_conversations(self, ids: Sequence[str]) -> list[Conversation]:
        raws = await self._hashes(self._k.conversation(cid) for cid in ids)
        return [conversation_from_hash(raw) for raw in raws]

    async def list_conversations(
        self,
        *,
        cursor: str | None,
        limit: int,
        filters: dict[str, str],
        created_by: str | None = None,
    ) -> Page[Conversation]:
        """Newest first; `cursor` is the last id of the previous page. Filters apply per page scan.
        With `created_by`, only the conversations that API key opened (its own index)."""
        if created_by is not None:
            filters = {**filters, "created_by": created_by}
        return await self._page_newest_first(
            self._k.key_conversations(created_by) if created_by else self._k.conversations(),
            cursor=cursor,
            limit=limit,
            load=self.get_conversations,
            keep=lambda conv: all(str(getattr(conv, f)) == v for f, v in filters.items()),
            id_of=lambda conv: conv.id,
        )

    async def transition(
        self, cid: str, to: Status, legal_from: Iterable[str], reason: str = ""
    ) -> Status:
        """Atomically move to `to` if the current status is one of `legal_from`; returns the old one."""
        now = utcnow().isoformat()
        old, outcome = await self._transition(
            keys=[self._k.conversation(cid)], args=[to, ",".join(legal_from), now, reason]
        )
        old_status: Status = text(old)  # type: ignore[assignment]
        if outcome == b"not_found":
            raise conversation_not_found(cid)
        if outcome == b"illegal":
            raise status_forbids(
                old_status,
                f"conversation is {old_status}; cannot become {to}",
                {"status": old_status, "requested": to},
            )
        return old_status

    async def set_approval_id(self, cid: str, aid: str) -> None:
        await self._r.hset(self._k.conversation(cid), "approval_id", aid)

    # Which conversation an inbound envelope belongs to ------------------------------------------

    async def thread_conversation(self, channel: str, thread_key: str) -> str | None:
        """The conversation a channel's thread last had (open, or closed: the caller decides)."""
        return await self._text_at(self._k.thread(channel, thread_key))

    async def claim_thread(
        self, channel: str, thread_key: str, cid: str, previous: str | None
    ) -> str:
        """Make the thread's entry name `cid` unless another conversation got there first; returns
        the one it names. `previous` (the closed conversation it named) is replaced only if still
        there. The conversation's pointer is written first (keys.py, rule 3)."""
        await self._r.set(self._k.thread_of(cid), thread_key)
        winner = await self._claim_thread(
            keys=[self._k.thread(channel, thread_key)], args=[cid, previous or ""]
        )
        return text(winner)

    async def adopt_legacy_thread(
        self, channel: str, thread_key: str, end_user_id: str, ours: str, user_address: str
    ) -> str | None:
        """The read-through migration of threads from before thread keys (read on a miss of
        `thread`; remove with the old index once no deployment can hold one).

        Those versions indexed a conversation by (end user, channel, our address), so identities
        linked to one end user shared it; replies went to the address that opened it. The entry
        moves to the thread of that address only (`user_address`): a linked identity's text
        leaves it in place for its owner and starts its own thread. Two one-key steps (the keys
        are in different slots on a cluster; keys.py, rule 3): claim `thread`, then drop the old
        entry if it still names the conversation.
        """
        old = self._k.legacy_open_conversation(end_user_id, channel, ours)
        cid = await self._text_at(old)
        if cid is None:
            return None
        doc = await self._r.hget(self._k.conversation(cid), "doc")
        if doc is not None and conversation_doc.decode(doc).get("user_address") != user_address:
            return None
        winner = await self.claim_thread(channel, thread_key, cid, None) if doc else None
        await self._drop_if_names(old, cid)
        return winner

    async def _drop_if_names(self, key: str, cid: str) -> None:
        await self._drop_if(keys=[key], args=[cid])

    async def remember_inbound(self, envelope_id: str, cid: str, ttl: int) -> None:
        """Map an envelope to the conversation it opened, so a redelivery finds the same one."""
        await self._r.set(self._k.inbound(envelope_id), cid, ex=ttl, nx=True)

    async def inbound_conversation(self, envelope_id: str) -> str | None:
        return await self._text_at(self._k.inbound(envelope_id))
