"""Turns, the queue of user messages waiting for the agent, the audit event log, and usage counts.

The turn log is a list: turn `seq` is at index seq - 1, so a page of history is one LRANGE and
appending never rewrites what is there. The event log gets a marker (`t<seq>`) for the turn's
`turn.created` event in the same step: the turn itself is the event's data, stored once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import msgspec

from shared.envelopes import Event, turn_created_event
from shared.models import (
    Author,
    Channel,
    Conversation,
    Evidence,
    Role,
    SessionType,
    Status,
    ToolCall,
    Turn,
    utcnow,
)
from shared.store.collection import Aggregate, Codec, encode, text
from shared.store.connection import Connection
from shared.store.conversations import (
    conversation_doc,
    conversation_from_hash,
    conversation_not_found,
    status_forbids,
)


# A turn is stored as a positional JSON array without what its place already says (conversation
# id: the key; seq: the list index), trailing defaults omitted: about half the bytes of the API form.
class _StoredTurn(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    id: str
    role: Role
    content: str
    author: Author
    created_at: datetime
    tool_calls: tuple[ToolCall, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    envelope_id: str | None = None
    channel: Channel | None = None
    answered: bool = True
    message_id: str | None = None


_stored_turn = Codec(_StoredTurn)
_event = Codec(Event)


def _store_turn(turn: Turn) -> bytes:
    fields = msgspec.structs.asdict(turn)
    del fields["conversation_id"], fields["seq"]
    return encode(_StoredTurn(**fields))


def _load_turn(cid: str, seq: int, raw: bytes | str) -> Turn:
    return Turn(conversation_id=cid, seq=seq, **msgspec.structs.asdict(_stored_turn.decode(raw)))


# KEYS: conv, turn log, dedupe hash, pending, event order, usage
# ARGV: stored turn, allowed statuses ("a,b"), updated_at, dedupe key ('' = none), dedupe ttl,
#       queue when not active ("1"/"0"), usage field to count the turn under ('' = none),
#       return the conversation's hash as it is after the append ("1"/"0")
# The usage count moves with the append it counts (a duplicate counts nothing), in the same round
# trip. On a cluster the usage key is the shard of the conversation's own slot (keys.py, rule 4).
# Returning the conversation saves core its read before a user turn (one round trip per turn).
_APPEND_TURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local function conversation()
  if ARGV[8] == '1' then return redis.call('HGETALL', KEYS[1]) end
  return {}
end
if ARGV[4] ~= '' then
  local seen = redis.call('HGET', KEYS[3], ARGV[4])
  if seen then
    return {tonumber(seen), redis.call('HGET', KEYS[1], 'status'), 'dup', 0, conversation()}
  end
end
local status = redis.call('HGET', KEYS[1], 'status')
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == status then allowed = true end end
if not allowed then return {-2, status} end
local seq = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0') + 1
if redis.call('LLEN', KEYS[2]) ~= seq - 1 then
  return redis.error_reply('turn log of ' .. KEYS[1] .. ' is out of step with last_seq')
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'last_seq', seq, 'updated_at', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[4], seq)
  if tonumber(ARGV[5]) > 0 then redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5])) end
end
redis.call('RPUSH', KEYS[5], 't' .. seq)
if ARGV[6] == '1' and status ~= 'active' then redis.call('RPUSH', KEYS[4], seq) end
if ARGV[7] ~= '' then redis.call('HINCRBY', KEYS[6], ARGV[7], 1) end
return {seq, status, '', redis.call('LLEN', KEYS[4]), conversation()}
"""

# KEYS: per-conversation event hash, per-conversation event order list. ARGV: event id, json
_RECORD_EVENT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Appended:
    """The result of appending a turn: its seq and the conversation status it was appended in."""

    seq: int
    status: Status
    duplicate: bool = False
    # User messages queued for the agent after this append (they wait while it is not active).
    pending: int = 0
    # The conversation right after the append, when asked for (`append_turn(current=True)`).
    conversation: Conversation | None = None


class Turns(Aggregate):
    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._append = connection.script(_APPEND_TURN)
        self._record_event = connection.script(_RECORD_EVENT)

    async def append_turn(
        self,
        turn: Turn,
        *,
        allowed: Iterable[str],
        dedupe_key: str | None = None,
        dedupe_ttl: int = 0,
        queue_if_inactive: bool = False,
        usage_channel: str | None = None,
        current: bool = False,
    ) -> Appended:
        """Append `turn` with the next seq if the conversation's status is in `allowed`.

        With `dedupe_key`, a second append under the same key returns the first one's seq instead.
        With `usage_channel`, the turn counts in usage (`turns:<channel>`) when it is appended.
        With `current`, the result carries the conversation as the append left it (read in the
        same script, so its status is the one the append saw).
        Raises NotFound, or ConversationClosed / IllegalTransition when the status forbids it.
        """
        cid = turn.conversation_id
        keys = [
            self._k.conversation(cid),
            self._k.turn_log(cid),
            self._k.seen(cid),
            self._k.pending(cid),
            self._k.event_order(cid),
            self._k.usage_shard(cid),
        ]
        args: list[bytes | str | int] = [
            _store_turn(turn),
            ",".join(allowed),
            utcnow().isoformat(),
            dedupe_key or "",
            dedupe_ttl,
            "1" if queue_if_inactive else "0",
            f"turns:{usage_channel}" if usage_channel else "",
            "1" if current else "0",
        ]
        if self.connection.wait_replicas:
            # A duplicate waits too: the first append's acknowledgement may have been lost.
            result = await self.connection.replicated_script(
                _APPEND_TURN, keys, args, applied=lambda r: int(r[0]) > 0
            )
        else:
            result = await self._append(keys=keys, args=args)
        seq = int(result[0])
        status = text(result[1]) if result[1] else ""
        if seq == -1:
            raise conversation_not_found(cid)
        if seq == -2:
            raise status_forbids(status, f"conversation is {status}", {"status": status})
        fields = result[4] if len(result) > 4 else []
        return Appended(
            seq=seq,
            status=status,  # type: ignore[arg-type]
            duplicate=len(result) > 2 and result[2] == b"dup",
            pending=int(result[3]) if len(result) > 3 else 0,
            conversation=(
                conversation_from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
                if fields
                else None
            ),
        )

    async def get_turn(self, cid: str, seq: int) -> Turn | None:
        raw = await self._r.lindex(self._k.turn_log(cid), seq - 1) if seq > 0 else None
        return _load_turn(cid, seq, raw) if raw else None

    async def turns_after(self, cid: str, after_seq: int, limit: int) -> list[Turn]:
        """Turns with seq > after_seq, in order: one LRANGE, however long the history is."""
        if limit <= 0:
            return []
        raws = await self._r.lrange(self._k.turn_log(cid), after_seq, after_seq + limit - 1)
        return [_load_turn(cid, after_seq + i + 1, raw) for i, raw in enumerate(raws)]

    async def last_turns(self, cid: str, count: int) -> list[Turn]:
        """The conversation's last `count` turns, in order (the inbox's "last message")."""
        pipe = self._r.pipeline(transaction=True)
        pipe.lrange(self._k.turn_log(cid), -count, -1)
        pipe.llen(self._k.turn_log(cid))
        raws, total = await pipe.execute()
        first = total - len(raws) + 1
        return [_load_turn(cid, first + i, raw) for i, raw in enumerate(raws)]

    async def seen_seq(self, cid: str, dedupe_key: str) -> int | None:
        raw = await self._r.hget(self._k.seen(cid), dedupe_key)
        return int(raw) if raw is not None else None

    # Messages waiting while the conversation is not active ---------------------------------------

    async def pending_seqs(self, cid: str) -> list[int]:
        return [int(s) for s in await self._r.lrange(self._k.pending(cid), 0, -1)]

    async def queue_pending(self, cid: str, seq: int) -> None:
        await self._r.rpush(self._k.pending(cid), str(seq))

    async def next_pending(self, cid: str) -> int | None:
        """The oldest queued user message, still queued (pop it with `drop_pending` once answered)."""
        raw = await self._r.lindex(self._k.pending(cid), 0)
        return int(raw) if raw is not None else None

    async def drop_pending(self, cid: str, seq: int) -> None:
        await self._r.lrem(self._k.pending(cid), 1, str(seq))

    # Audit events and usage ----------------------------------------------------------------------

    async def record_event(self, cid: str, event: Event) -> bool:
        """Keep the event in the conversation's audit log once, however often it is emitted.
        (`turn.created` is not recorded here: appending the turn logged it.)"""
        created = await self._record_event(
            keys=[self._k.events(cid), self._k.event_order(cid)],
            args=[event.id, encode(event)],
        )
        return bool(created)

    async def list_events(self, cid: str, offset: int, limit: int) -> list[Event]:
        entries = [
            text(e)
            for e in await self._r.lrange(self._k.event_order(cid), offset, offset + limit - 1)
        ]
        if not entries:
            return []
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(self._k.conversation(cid), "doc")
        for entry in entries:
            if entry.startswith("t"):
                pipe.lindex(self._k.turn_log(cid), int(entry[1:]) - 1)
            else:
                pipe.hget(self._k.events(cid), entry)
        doc, *raws = await pipe.execute()
        fields = conversation_doc.decode(doc) if doc else {}
        session_type = cast(SessionType, fields.get("session_type", "live"))
        channel = cast(Channel | None, fields.get("channel"))
        events = []
        for entry, raw in zip(entries, raws, strict=True):
            if raw is None:
                continue
            if entry.startswith("t"):
                turn = _load_turn(cid, int(entry[1:]), raw)
                events.append(turn_created_event(turn, session_type, channel))
            else:
                events.append(_event.decode(raw))
        return events

    async def count_usage(self, channel: str, *, conversations: int = 0, turns: int = 0) -> None:
        pipe = self._r.pipeline(transaction=False)
        if conversations:
            pipe.hincrby(self._k.usage(), f"conversations:{channel}", conversations)
        if turns:
            pipe.hincrby(self._k.usage(), f"turns:{channel}", turns)
        await pipe.execute()

    async def usage(self) -> dict[str, int]:
        """The counts, summed over the global hash and (on a cluster) every slot's shard."""
        pipe = self._r.pipeline(transaction=False)
        for key in [self._k.usage(), *self._k.usage_shards()]:
            pipe.hgetall(key)
        counts: dict[str, int] = {}
        for raw in await pipe.execute():
            for k, v in raw.items():
                counts[text(k)] = counts.get(text(k), 0) + int(v)
        return counts

    # Tool results -------------------------------------------------------------------------------

    async def tool_result(self, cid: str, key: str) -> bytes | None:
        """A tool call's recorded result (JSON) by its idempotency key."""
        raw = await self._r.hget(self._k.tool_results(cid), key)
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else raw.encode()

    async def put_tool_result(self, cid: str, key: str, result: bytes, ttl: int) -> None:
        name = self._k.tool_results(cid)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(name, key, result)
        pipe.expire(name, ttl)
        await pipe.execute()
