"""Handoff records in Valkey: one hash per handoff, one index (sorted set) per status.

A handoff lives beside its conversation: its id is `hof_<ulid>_<conversation id>` and its key
carries the conversation's hash tag, so the Lua scripts below change the handoff and the
conversation hash together, atomically (a claim can never leave a conversation showing one
operator and the handoff another). The per-status indexes are cross-slot, so they are moved in a
pipeline *after* the script: a crash between the two leaves an index entry whose record says
otherwise, and every read of an index checks the record and heals the entry. Listing never scans
conversations.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from shared.errors import Conflict
from shared.ids import ulid
from shared.models import Channel, Handoff, HandoffStatus, utcnow
from shared.store.collection import Aggregate, encode, not_found, text
from shared.store.connection import Connection

_doc = msgspec.json.Decoder(dict[str, Any])

# KEYS: handoff, conversation, the conversation's set of handoff ids. ARGV: handoff id, doc
# Creates the handoff only while the conversation waits for a human and has none open; returns
# the open handoff's id either way (a redelivered handoff converges on the first record).
_CREATE = """
local status = redis.call('HGET', KEYS[2], 'status')
if not status then return {'not_found', ''} end
local open = redis.call('HGET', KEYS[2], 'handoff_id')
if open and open ~= '' then return {'exists', open} end
if status ~= 'waiting_for_human' then return {'status', status} end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'status', 'requested')
redis.call('HSET', KEYS[2], 'handoff_id', ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
return {'ok', ARGV[1]}
"""

# KEYS: handoff, conversation. ARGV: operator key id, operator name, assigned_at, force ("1": an
# admin reassigns). A claim of a handoff someone else holds returns the holder instead.
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'not_found'} end
if status == 'resolved' then return {'resolved'} end
local holder = redis.call('HGET', KEYS[1], 'assignee')
if status == 'assigned' and holder ~= ARGV[1] and ARGV[4] ~= '1' then
  return {'held', holder, redis.call('HGET', KEYS[1], 'assignee_name') or ''}
end
redis.call('HSET', KEYS[1], 'status', 'assigned', 'assignee', ARGV[1], 'assignee_name', ARGV[2],
           'assigned_at', ARGV[3])
redis.call('HSET', KEYS[2], 'operator_id', ARGV[1], 'operator_name', ARGV[2])
return {'ok', status}
"""

# KEYS: handoff, conversation. ARGV: handoff id, outcome, resolved_at, only from this status
# ('' = any open one)
_RESOLVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'not_found' end
if status == 'resolved' then return 'resolved' end
if ARGV[4] ~= '' and status ~= ARGV[4] then return 'resolved' end
redis.call('HSET', KEYS[1], 'status', 'resolved', 'outcome', ARGV[2], 'resolved_at', ARGV[3])
if redis.call('HGET', KEYS[2], 'handoff_id') == ARGV[1] then
  redis.call('HDEL', KEYS[2], 'handoff_id', 'operator_id', 'operator_name')
end
return status
"""

# KEYS: handoff. ARGV: unclaimed_at. Marks a still-unclaimed handoff once.
_MARK_UNCLAIMED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'requested' then return 0 end
return redis.call('HSETNX', KEYS[1], 'unclaimed_at', ARGV[1])
"""


def conversation_of(handoff_id: str) -> str:
    """The conversation a handoff id names (`hof_<ulid>_<conversation id>`)."""
    parts = handoff_id.split("_", 2)
    if len(parts) != 3 or parts[0] != "hof" or not parts[1] or not parts[2]:
        raise not_found("handoff", handoff_id, "handoff_id")
    return parts[2]


def _from_hash(raw: dict[Any, Any]) -> Handoff:
    doc = _doc.decode(raw[b"doc"])
    for field in (b"status", b"assignee", b"assignee_name", b"outcome"):
        if raw.get(field):
            doc[field.decode()] = text(raw[field])
    for field in (b"assigned_at", b"resolved_at", b"unclaimed_at"):
        if raw.get(field):
            doc[field.decode()] = datetime.fromisoformat(text(raw[field]))
    return msgspec.convert(doc, Handoff, strict=False)


class Handoffs(Aggregate):
    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._create_handoff = connection.script(_CREATE)
        self._claim_handoff = connection.script(_CLAIM)
        self._resolve_handoff = connection.script(_RESOLVE)
        self._mark_unclaimed = connection.script(_MARK_UNCLAIMED)

    def _handoff_keys(self, handoff_id: str) -> list[str]:
        """The handoff's hash and its conversation's hash (one slot: both `{cid}`-tagged)."""
        cid = conversation_of(handoff_id)
        return [self._k.handoff(cid, handoff_id.split("_", 2)[1]), self._k.conversation(cid)]

    async def create_handoff(
        self,
        *,
        conversation_id: str,
        reason: str,
        channel: Channel,
        end_user_id: str,
        requested_by: str,
        unclaimed_after: float,
    ) -> Handoff:
        """The conversation's open handoff, created if it has none (it must be waiting)."""
        now = utcnow()
        handoff = Handoff(
            id=f"hof_{ulid()}_{conversation_id}",
            conversation_id=conversation_id,
            reason=reason,
            channel=channel,
            end_user_id=end_user_id,
            requested_at=now,
            requested_by=requested_by,
        )
        outcome, hid = (
            text(r)
            for r in await self._create_handoff(
                keys=[
                    *self._handoff_keys(handoff.id),
                    self._k.conversation_handoffs(conversation_id),
                ],
                args=[handoff.id, encode(handoff)],
            )
        )
        if outcome == "not_found":
            raise not_found("conversation", conversation_id, "conversation_id")
        if outcome == "status":
            raise Conflict(
                f"conversation is {hid}; a handoff needs waiting_for_human",
                details={"status": hid},
            )
        if outcome == "ok":
            pipe = self._r.pipeline(transaction=False)
            pipe.zadd(self._k.handoffs("requested"), {handoff.id: 0})
            pipe.zadd(self._k.handoffs_unclaimed(), {handoff.id: now.timestamp() + unclaimed_after})
            await pipe.execute()
        return await self.get_handoff(hid)

    async def get_handoff(self, handoff_id: str) -> Handoff:
        raw = await self._r.hgetall(self._handoff_keys(handoff_id)[0])
        if not raw:
            raise not_found("handoff", handoff_id, "handoff_id")
        return _from_hash(raw)

    async def claim_handoff(
        self, handoff_id: str, operator_id: str, name: str, force: bool
    ) -> Handoff:
        """Assign the handoff to the calling operator, atomically. Someone else's claim is a
        Conflict naming the holder (an admin may take it over with `force`)."""
        result = [
            text(r)
            for r in await self._claim_handoff(
                keys=self._handoff_keys(handoff_id),
                args=[operator_id, name, utcnow().isoformat(), "1" if force else "0"],
            )
        ]
        if result[0] == "not_found":
            raise not_found("handoff", handoff_id, "handoff_id")
        if result[0] == "resolved":
            raise Conflict("the handoff is already resolved", details={"status": "resolved"})
        if result[0] == "held":
            raise Conflict(
                f"the handoff is already claimed by {result[2] or result[1]}",
                details={"status": "assigned", "assignee": result[1], "assignee_name": result[2]},
            )
        pipe = self._r.pipeline(transaction=False)
        pipe.zrem(self._k.handoffs("requested"), handoff_id)
        pipe.zrem(self._k.handoffs_unclaimed(), handoff_id)
        pipe.zadd(self._k.handoffs("assigned"), {handoff_id: 0})
        await pipe.execute()
        return await self.get_handoff(handoff_id)

    async def resolve_handoff(
        self, handoff_id: str, outcome: str, only_if: HandoffStatus | None = None
    ) -> bool:
        """Resolve the handoff with `outcome`; False when it already was (or, with `only_if`,
        when it is not in that status: a claim won the race)."""
        previous = text(
            await self._resolve_handoff(
                keys=self._handoff_keys(handoff_id),
                args=[handoff_id, outcome, utcnow().isoformat(), only_if or ""],
            )
        )
        if previous == "not_found":
            raise not_found("handoff", handoff_id, "handoff_id")
        if previous == "resolved":
            return False
        pipe = self._r.pipeline(transaction=False)
        pipe.zrem(self._k.handoffs("requested"), handoff_id)
        pipe.zrem(self._k.handoffs("assigned"), handoff_id)
        pipe.zrem(self._k.handoffs_unclaimed(), handoff_id)
        pipe.zadd(self._k.handoffs("resolved"), {handoff_id: 0})
        await pipe.execute()
        return True

    async def erase_handoffs(self, cid: str) -> None:
        """Delete every handoff record of a conversation and its index entries (erasure)."""
        ids = [text(i) for i in await self._r.smembers(self._k.conversation_handoffs(cid))]
        pipe = self._r.pipeline(transaction=False)
        for hid in ids:
            pipe.delete(self._handoff_keys(hid)[0])
        if ids:
            for status in ("requested", "assigned", "resolved"):
                pipe.zrem(self._k.handoffs(status), *ids)
            pipe.zrem(self._k.handoffs_unclaimed(), *ids)
        pipe.delete(self._k.conversation_handoffs(cid))
        await pipe.execute()

    async def handoffs_unclaimed_due(self, now: float, limit: int = 100) -> list[str]:
        ids = await self._r.zrangebyscore(
            self._k.handoffs_unclaimed(), "-inf", now, start=0, num=limit
        )
        return [text(i) for i in ids]

    async def mark_handoff_unclaimed(self, handoff_id: str) -> bool:
        """True once, for a handoff still unclaimed past its time; drops it from the timer."""
        marked = await self._mark_unclaimed(
            keys=self._handoff_keys(handoff_id)[:1], args=[utcnow().isoformat()]
        )
        await self._r.zrem(self._k.handoffs_unclaimed(), handoff_id)
        return bool(marked)

    async def list_handoffs(
        self, *, status: HandoffStatus, cursor: str | None, limit: int
    ) -> tuple[list[Handoff], str | None]:
        """Newest first from the status's index; entries a crash left behind are healed."""
        index = self._k.handoffs(status)
        stale: list[str] = []

        async def load(ids: list[str]) -> list[Handoff]:
            pipe = self._r.pipeline(transaction=False)
            for hid in ids:
                pipe.hgetall(self._handoff_keys(hid)[0])
            found = []
            for hid, raw in zip(ids, await pipe.execute(), strict=True):
                handoff = _from_hash(raw) if raw else None
                if handoff is not None and handoff.status == status:
                    found.append(handoff)
                else:
                    stale.append(hid)
            return found

        page = await self._page_newest_first(
            index, cursor=cursor, limit=limit, load=load, keep=lambda _: True, id_of=lambda h: h.id
        )
        if stale:
            await self._r.zrem(index, *stale)
        return page.items, page.next_cursor
