"""The one store API over Redis/Valkey (redis-py asyncio).

Keys carry the namespace and a hash tag: everything about one conversation is `{conv_id}`-tagged
so it lives in one Redis Cluster slot and one Lua script can change it atomically. Changes that span
entities (indexes) happen in an order that a crash between steps cannot make inconsistent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, cast

import msgspec
import redis.asyncio as redis
from redis.asyncio.client import Pipeline

from shared.envelopes import Event, turn_created_event
from shared.errors import Conflict, ConversationClosed, IllegalTransition, NotFound
from shared.ids import new_id
from shared.models import (
    Agent,
    ApiKey,
    Approval,
    Author,
    Channel,
    Conversation,
    Delivery,
    EndUser,
    Evidence,
    IdentifierKind,
    Identity,
    Revision,
    Role,
    SessionType,
    Status,
    ToolCall,
    Turn,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)

T = TypeVar("T")

_enc = msgspec.json.Encoder()
_conv_doc_dec = msgspec.json.Decoder(dict[str, Any])
_event_dec = msgspec.json.Decoder(Event)


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


_stored_turn_dec = msgspec.json.Decoder(_StoredTurn)


def _store_turn(turn: Turn) -> bytes:
    fields = msgspec.structs.asdict(turn)
    del fields["conversation_id"], fields["seq"]
    return _enc.encode(_StoredTurn(**fields))


def _load_turn(cid: str, seq: int, raw: bytes | str) -> Turn:
    return Turn(
        conversation_id=cid, seq=seq, **msgspec.structs.asdict(_stored_turn_dec.decode(raw))
    )


# The turn log is a list: turn `seq` is at index seq - 1, so a page of history is one LRANGE and
# appending never rewrites what is there. The event log gets a marker (`t<seq>`) for the turn's
# `turn.created` event in the same step: the turn itself is the event's data, stored once.
# KEYS: conv, turn log, dedupe hash, pending, event order
# ARGV: stored turn, allowed statuses ("a,b"), updated_at, dedupe key ('' = none), dedupe ttl,
#       queue when not active ("1"/"0")
_APPEND_TURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
if ARGV[4] ~= '' then
  local seen = redis.call('HGET', KEYS[3], ARGV[4])
  if seen then return {tonumber(seen), redis.call('HGET', KEYS[1], 'status'), 'dup'} end
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
return {seq, status, '', redis.call('LLEN', KEYS[4])}
"""

# KEYS: conv. ARGV: new status, legal from-statuses ("a,b"), updated_at, closed reason
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'', 'not_found'} end
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[3])
    if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'closed_reason', ARGV[4]) end
    return {status, 'ok'}
  end
end
return {status, 'illegal'}
"""


# KEYS: per-conversation event hash, per-conversation event order list. ARGV: event id, json
_RECORD_EVENT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# KEYS: approval hash. ARGV: new status, reviewer, note, resolved_at
_RESOLVE_APPROVAL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'not_found' end
if status ~= 'pending' then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'reviewer', ARGV[2], 'note', ARGV[3],
           'resolved_at', ARGV[4])
return 'ok'
"""


@dataclass(frozen=True)
class Appended:
    """The result of appending a turn: its seq and the conversation status it was appended in."""

    seq: int
    status: Status
    duplicate: bool = False
    # User messages queued for the agent after this append (they wait while it is not active).
    pending: int = 0


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None


def _text(value: Any) -> str:
    """redis-py types replies as bytes | str; with decode_responses=False they are bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    def __init__(self, url: str, namespace: str = "") -> None:
        self.redis: redis.Redis = redis.Redis.from_url(
            url, decode_responses=False, health_check_interval=10
        )
        self.ns = f"{namespace}:" if namespace else ""
        self._append = self.redis.register_script(_APPEND_TURN)
        self._transition = self.redis.register_script(_TRANSITION)
        self._record_event = self.redis.register_script(_RECORD_EVENT)
        self._resolve_approval = self.redis.register_script(_RESOLVE_APPROVAL)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()

    # Keys ---------------------------------------------------------------------------------------

    def _conv(self, cid: str) -> str:
        return f"{self.ns}conv:{{{cid}}}"

    def _turns(self, cid: str) -> str:
        return f"{self.ns}turn-log:{{{cid}}}"

    def _events(self, cid: str) -> str:
        return f"{self.ns}events:{{{cid}}}"

    def _event_order(self, cid: str) -> str:
        return f"{self.ns}event-order:{{{cid}}}"

    def _pending(self, cid: str) -> str:
        return f"{self.ns}pending:{{{cid}}}"

    def _seen(self, cid: str) -> str:
        return f"{self.ns}seen:{{{cid}}}"

    def _open(self, end_user_id: str, channel: str, address: str) -> str:
        return f"{self.ns}open:{{{end_user_id}}}:{channel}:{address}"

    def _ident(self, kind: str, value: str) -> str:
        return f"{self.ns}ident:{kind}:{value}"

    def _user(self, uid: str) -> str:
        return f"{self.ns}user:{{{uid}}}"

    def _inbound_seen(self, envelope_id: str) -> str:
        return f"{self.ns}inbound:{envelope_id}"

    # Conversations ------------------------------------------------------------------------------

    async def create_conversation(self, conv: Conversation) -> None:
        doc = msgspec.structs.asdict(conv)
        status, last_seq = doc.pop("status"), doc.pop("last_seq")
        doc.pop("updated_at")
        doc.pop("closed_reason")
        doc.pop("approval_id")
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self._conv(conv.id),
            mapping={
                "doc": _enc.encode(doc),
                "status": status,
                "last_seq": last_seq,
                "updated_at": conv.updated_at.isoformat(),
            },
        )
        # Ids are time-sortable, so a lexicographic index pages in creation order.
        pipe.zadd(f"{self.ns}convs", {conv.id: 0})
        await pipe.execute()

    async def get_conversation(self, cid: str) -> Conversation:
        raw = await self.redis.hgetall(self._conv(cid))
        if not raw:
            raise NotFound(f"conversation {cid} not found", details={"conversation_id": cid})
        return _conversation_from_hash(raw)

    async def session_type_of(self, cid: str | None) -> SessionType:
        """The session type of a conversation; `live` when there is none (or it was erased), so
        provider events about unknown messages still reach webhooks."""
        doc = await self.redis.hget(self._conv(cid), "doc") if cid else None
        return cast(
            SessionType, _conv_doc_dec.decode(doc).get("session_type", "live") if doc else "live"
        )

    async def get_conversation_with(
        self, cid: str, also: Callable[[Pipeline], None]
    ) -> tuple[Conversation, list[Any]]:
        """The conversation, read in one round trip with whatever `also` queues on the pipeline
        (rate-limit hits); returns the conversation and the results of those extra commands."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self._conv(cid))
        also(pipe)
        raw, *rest = await pipe.execute()
        if not raw:
            raise NotFound(f"conversation {cid} not found", details={"conversation_id": cid})
        return _conversation_from_hash(raw), rest

    async def get_conversations(self, ids: Sequence[str]) -> list[Conversation]:
        pipe = self.redis.pipeline(transaction=False)
        for cid in ids:
            pipe.hgetall(self._conv(cid))
        return [_conversation_from_hash(raw) for raw in await pipe.execute() if raw]

    async def list_conversations(
        self, *, cursor: str | None, limit: int, filters: dict[str, str]
    ) -> Page:
        """Newest first; `cursor` is the last id of the previous page. Filters apply per page scan."""
        key = f"{self.ns}convs"
        found: list[Conversation] = []
        upper = f"({cursor}".encode() if cursor else b"+"
        while len(found) <= limit:
            ids = await self.redis.zrevrangebylex(key, upper, b"-", start=0, num=max(limit * 2, 50))
            if not ids:
                break
            batch = await self.get_conversations([_text(i) for i in ids])
            for conv in batch:
                if all(str(getattr(conv, f)) == v for f, v in filters.items()):
                    found.append(conv)
            upper = b"(" + _text(ids[-1]).encode()
        items = found[:limit]
        more = len(found) > limit
        return Page(items=items, next_cursor=items[-1].id if more and items else None)

    async def transition(
        self, cid: str, to: Status, legal_from: Iterable[str], reason: str = ""
    ) -> Status:
        """Atomically move to `to` if the current status is one of `legal_from`; returns the old one."""
        now = utcnow().isoformat()
        old, outcome = await self._transition(
            keys=[self._conv(cid)], args=[to, ",".join(legal_from), now, reason]
        )
        old_status: Status = _text(old)  # type: ignore[assignment]
        if outcome == b"not_found":
            raise NotFound(f"conversation {cid} not found", details={"conversation_id": cid})
        if outcome == b"illegal":
            error = ConversationClosed if old_status == "closed" else IllegalTransition
            raise error(
                f"conversation is {old_status}; cannot become {to}",
                details={"status": old_status, "requested": to},
            )
        return old_status

    # Turns --------------------------------------------------------------------------------------

    async def append_turn(
        self,
        turn: Turn,
        *,
        allowed: Iterable[str],
        dedupe_key: str | None = None,
        dedupe_ttl: int = 0,
        queue_if_inactive: bool = False,
    ) -> Appended:
        """Append `turn` with the next seq if the conversation's status is in `allowed`.

        With `dedupe_key`, a second append under the same key returns the first one's seq instead.
        Raises NotFound, or ConversationClosed / IllegalTransition when the status forbids it.
        """
        cid = turn.conversation_id
        result = await self._append(
            keys=[
                self._conv(cid),
                self._turns(cid),
                self._seen(cid),
                self._pending(cid),
                self._event_order(cid),
            ],
            args=[
                _store_turn(turn),
                ",".join(allowed),
                utcnow().isoformat(),
                dedupe_key or "",
                dedupe_ttl,
                "1" if queue_if_inactive else "0",
            ],
        )
        seq = int(result[0])
        status = _text(result[1]) if result[1] else ""
        if seq == -1:
            raise NotFound(f"conversation {cid} not found", details={"conversation_id": cid})
        if seq == -2:
            error = ConversationClosed if status == "closed" else IllegalTransition
            raise error(f"conversation is {status}", details={"status": status})
        return Appended(
            seq=seq,
            status=status,  # type: ignore[arg-type]
            duplicate=len(result) > 2 and result[2] == b"dup",
            pending=int(result[3]) if len(result) > 3 else 0,
        )

    async def get_turn(self, cid: str, seq: int) -> Turn | None:
        raw = await self.redis.lindex(self._turns(cid), seq - 1) if seq > 0 else None
        return _load_turn(cid, seq, raw) if raw else None

    async def turns_after(self, cid: str, after_seq: int, limit: int) -> list[Turn]:
        """Turns with seq > after_seq, in order: one LRANGE, however long the history is."""
        if limit <= 0:
            return []
        raws = await self.redis.lrange(self._turns(cid), after_seq, after_seq + limit - 1)
        return [_load_turn(cid, after_seq + i + 1, raw) for i, raw in enumerate(raws)]

    async def seen_seq(self, cid: str, dedupe_key: str) -> int | None:
        raw = await self.redis.hget(self._seen(cid), dedupe_key)
        return int(raw) if raw is not None else None

    async def pending_seqs(self, cid: str) -> list[int]:
        return [int(s) for s in await self.redis.lrange(self._pending(cid), 0, -1)]

    async def set_approval_id(self, cid: str, aid: str) -> None:
        await self.redis.hset(self._conv(cid), "approval_id", aid)

    async def queue_pending(self, cid: str, seq: int) -> None:
        await self.redis.rpush(self._pending(cid), str(seq))

    async def next_pending(self, cid: str) -> int | None:
        """The oldest queued user message, still queued (pop it with `drop_pending` once answered)."""
        raw = await self.redis.lindex(self._pending(cid), 0)
        return int(raw) if raw is not None else None

    async def drop_pending(self, cid: str, seq: int) -> None:
        await self.redis.lrem(self._pending(cid), 1, str(seq))

    # Audit events and usage ----------------------------------------------------------------------

    async def record_event(self, cid: str, event: Event) -> bool:
        """Keep the event in the conversation's audit log once, however often it is emitted.
        (`turn.created` is not recorded here: appending the turn logged it.)"""
        created = await self._record_event(
            keys=[self._events(cid), self._event_order(cid)],
            args=[event.id, _enc.encode(event)],
        )
        return bool(created)

    async def list_events(self, cid: str, offset: int, limit: int) -> list[Event]:
        entries = [
            _text(e)
            for e in await self.redis.lrange(self._event_order(cid), offset, offset + limit - 1)
        ]
        if not entries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self._conv(cid), "doc")
        for entry in entries:
            if entry.startswith("t"):
                pipe.lindex(self._turns(cid), int(entry[1:]) - 1)
            else:
                pipe.hget(self._events(cid), entry)
        doc, *raws = await pipe.execute()
        fields = _conv_doc_dec.decode(doc) if doc else {}
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
                events.append(_event_dec.decode(raw))
        return events

    async def count_usage(self, channel: str, *, conversations: int = 0, turns: int = 0) -> None:
        pipe = self.redis.pipeline(transaction=False)
        if conversations:
            pipe.hincrby(f"{self.ns}usage", f"conversations:{channel}", conversations)
        if turns:
            pipe.hincrby(f"{self.ns}usage", f"turns:{channel}", turns)
        await pipe.execute()

    async def usage(self) -> dict[str, int]:
        raw = await self.redis.hgetall(f"{self.ns}usage")
        return {_text(k): int(v) for k, v in raw.items()}

    # Approvals -----------------------------------------------------------------------------------

    def _approval(self, aid: str) -> str:
        return f"{self.ns}approval:{{{aid}}}"

    async def create_approval(self, approval: Approval) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self._approval(approval.id),
            mapping={"doc": _enc.encode(approval), "status": approval.status},
        )
        pipe.zadd(f"{self.ns}approvals", {approval.id: 0})
        pipe.zadd(f"{self.ns}approvals:pending", {approval.id: approval.timeout_at.timestamp()})
        await pipe.execute()

    async def get_approval(self, aid: str) -> Approval:
        raw = await self.redis.hgetall(self._approval(aid))
        if not raw:
            raise NotFound(f"approval {aid} not found", details={"approval_id": aid})
        return _approval_from_hash(raw)

    async def get_approvals(self, ids: Sequence[str]) -> list[Approval]:
        pipe = self.redis.pipeline(transaction=False)
        for aid in ids:
            pipe.hgetall(self._approval(aid))
        return [_approval_from_hash(raw) for raw in await pipe.execute() if raw]

    async def resolve_approval(
        self, aid: str, status: str, reviewer: str, note: str | None
    ) -> Approval:
        """pending → `status`, once. A second resolve is a Conflict carrying the current status."""
        outcome = _text(
            await self._resolve_approval(
                keys=[self._approval(aid)],
                args=[status, reviewer, note or "", utcnow().isoformat()],
            )
        )
        if outcome == "not_found":
            raise NotFound(f"approval {aid} not found", details={"approval_id": aid})
        if outcome != "ok":
            raise Conflict(f"approval is already {outcome}", details={"status": outcome})
        await self.mark_unapplied(aid)
        return await self.get_approval(aid)

    async def mark_unapplied(self, aid: str) -> None:
        """Decided but not yet carried out by core: the sweeper re-sends it until it is."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(f"{self.ns}approvals:pending", aid)
        pipe.zadd(f"{self.ns}approvals:unapplied", {aid: utcnow().timestamp()}, nx=True)
        await pipe.execute()

    async def mark_applied(self, aid: str) -> None:
        await self.redis.zrem(f"{self.ns}approvals:unapplied", aid)

    async def approvals_due(self, now: float, limit: int = 100) -> list[str]:
        ids = await self.redis.zrangebyscore(
            f"{self.ns}approvals:pending", "-inf", now, start=0, num=limit
        )
        return [_text(i) for i in ids]

    async def approvals_unapplied(self, before: float, limit: int = 100) -> list[str]:
        ids = await self.redis.zrangebyscore(
            f"{self.ns}approvals:unapplied", "-inf", before, start=0, num=limit
        )
        return [_text(i) for i in ids]

    async def list_approvals(self, *, status: str | None, cursor: str | None, limit: int) -> Page:
        upper = f"({cursor}".encode() if cursor else b"+"
        found: list[Approval] = []
        while len(found) <= limit:
            ids = await self.redis.zrevrangebylex(
                f"{self.ns}approvals", upper, b"-", start=0, num=max(limit * 2, 50)
            )
            if not ids:
                break
            for approval in await self.get_approvals([_text(aid) for aid in ids]):
                if status is None or approval.status == status:
                    found.append(approval)
            upper = b"(" + _text(ids[-1]).encode()
        items = found[:limit]
        return Page(items=items, next_cursor=items[-1].id if len(found) > limit and items else None)

    async def claim_once(self, key: str, ttl: int = 7 * 24 * 3600) -> bool:
        """True the first time `key` is claimed (e.g. one "still waiting" notice per approval)."""
        return bool(await self.redis.set(f"{self.ns}once:{key}", 1, nx=True, ex=ttl))

    # Channel opt-outs (SMS STOP) --------------------------------------------------------------------

    def _optout(self, channel: str, ours: str, theirs: str) -> str:
        return f"{self.ns}optout:{channel}:{ours}:{theirs}"

    async def set_opted_out(self, channel: str, ours: str, theirs: str, opted_out: bool) -> None:
        if opted_out:
            await self.redis.set(self._optout(channel, ours, theirs), utcnow().isoformat())
        else:
            await self.redis.delete(self._optout(channel, ours, theirs))

    async def is_opted_out(self, channel: str, ours: str, theirs: str) -> bool:
        return bool(await self.redis.exists(self._optout(channel, ours, theirs)))

    # Deliveries ------------------------------------------------------------------------------------

    def _deliveries(self, cid: str) -> str:
        return f"{self.ns}deliveries:{{{cid}}}"

    async def get_delivery(self, cid: str, turn_id: str) -> Delivery | None:
        raw = await self.redis.hget(self._deliveries(cid), turn_id)
        return msgspec.json.decode(raw, type=Delivery) if raw else None

    async def list_deliveries(self, cid: str) -> list[Delivery]:
        raw = await self.redis.hgetall(self._deliveries(cid))
        items = [msgspec.json.decode(v, type=Delivery) for v in raw.values()]
        return sorted(items, key=lambda d: d.turn_id)

    async def put_delivery(self, delivery: Delivery) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            self._deliveries(delivery.conversation_id), delivery.turn_id, _enc.encode(delivery)
        )
        for sid in delivery.provider_ids:
            pipe.set(f"{self.ns}provider:{sid}", f"{delivery.conversation_id}|{delivery.turn_id}")
        await pipe.execute()

    async def delivery_by_provider_id(self, provider_id: str) -> Delivery | None:
        raw = await self.redis.get(f"{self.ns}provider:{provider_id}")
        if not raw:
            return None
        cid, _, turn_id = _text(raw).partition("|")
        return await self.get_delivery(cid, turn_id)

    # Email threads -----------------------------------------------------------------------------------

    async def put_call(self, call_sid: str, cid: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"{self.ns}call:{call_sid}", cid, ex=7 * 24 * 3600)
        pipe.set(f"{self.ns}call-of:{{{cid}}}", call_sid, ex=7 * 24 * 3600)
        await pipe.execute()

    async def conversation_by_call(self, call_sid: str) -> str | None:
        raw = await self.redis.get(f"{self.ns}call:{call_sid}")
        return _text(raw) if raw else None

    async def call_of(self, cid: str) -> str | None:
        raw = await self.redis.get(f"{self.ns}call-of:{{{cid}}}")
        return _text(raw) if raw else None

    async def put_original(self, cid: str, seq: int, text: str) -> None:
        """The full original of a turn whose content was trimmed (email quotes), for audit."""
        await self.redis.hset(f"{self.ns}originals:{{{cid}}}", str(seq), text)

    async def get_original(self, cid: str, seq: int) -> str | None:
        raw = await self.redis.hget(f"{self.ns}originals:{{{cid}}}", str(seq))
        return _text(raw) if raw is not None else None

    async def index_message_ids(
        self, cid: str, message_ids: Sequence[str], ttl: int = 400 * 24 * 3600
    ) -> None:
        """Message-ID → conversation, for replies that quote it in In-Reply-To / References."""
        pipe = self.redis.pipeline(transaction=False)
        for mid in message_ids:
            pipe.set(f"{self.ns}msgid:{mid}", cid, ex=ttl)
        await pipe.execute()

    async def conversation_by_message_ids(self, message_ids: Sequence[str]) -> str | None:
        """The newest conversation any of these Message-IDs belongs to."""
        if not message_ids:
            return None
        found = await self.redis.mget([f"{self.ns}msgid:{m}" for m in reversed(message_ids)])
        return next((_text(f) for f in found if f), None)

    async def put_reply_token(self, token: str, cid: str) -> None:
        await self.redis.set(f"{self.ns}replytoken:{token}", cid)

    async def conversation_by_reply_token(self, token: str) -> str | None:
        raw = await self.redis.get(f"{self.ns}replytoken:{token}")
        return _text(raw) if raw else None

    async def update_email_thread(self, cid: str, fields: dict[str, str]) -> None:
        await self.redis.hset(f"{self.ns}email-thread:{{{cid}}}", mapping=dict[Any, Any](fields))

    async def email_thread(self, cid: str) -> dict[str, str]:
        raw = await self.redis.hgetall(f"{self.ns}email-thread:{{{cid}}}")
        return {_text(k): _text(v) for k, v in raw.items()}

    # Webhook subscriptions -----------------------------------------------------------------------

    async def put_webhook(self, sub: WebhookSubscription) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(f"{self.ns}webhooks", sub.id, _enc.encode(sub))
        await pipe.execute()

    async def list_webhooks(self) -> list[WebhookSubscription]:
        raw = await self.redis.hgetall(f"{self.ns}webhooks")
        subs = [msgspec.json.decode(v, type=WebhookSubscription) for v in raw.values()]
        return sorted(subs, key=lambda s: s.id)

    async def get_webhook(self, wid: str) -> WebhookSubscription:
        raw = await self.redis.hget(f"{self.ns}webhooks", wid)
        if not raw:
            raise NotFound(f"webhook {wid} not found", details={"webhook_id": wid})
        return msgspec.json.decode(raw, type=WebhookSubscription)

    async def delete_webhook(self, wid: str) -> None:
        if not await self.redis.hdel(f"{self.ns}webhooks", wid):
            raise NotFound(f"webhook {wid} not found", details={"webhook_id": wid})

    async def log_delivery(self, wid: str, delivery: WebhookDelivery, keep: int = 200) -> None:
        key = f"{self.ns}webhook-log:{wid}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(key, _enc.encode(delivery))
        pipe.ltrim(key, 0, keep - 1)
        await pipe.execute()

    async def deliveries(self, wid: str, limit: int = 50) -> list[WebhookDelivery]:
        raws = await self.redis.lrange(f"{self.ns}webhook-log:{wid}", 0, limit - 1)
        return [msgspec.json.decode(r, type=WebhookDelivery) for r in raws]

    # Which conversation an inbound envelope belongs to ------------------------------------------

    async def open_conversation_id(
        self, end_user_id: str, channel: str, address: str
    ) -> str | None:
        raw = await self.redis.get(self._open(end_user_id, channel, address))
        return _text(raw) if raw else None

    async def claim_open_conversation(
        self, end_user_id: str, channel: str, address: str, cid: str, previous: str | None
    ) -> str:
        """Point the (user, channel, our address) index at `cid` unless someone else got there first.

        `previous` is the closed conversation the index pointed at, replaced only if still there.
        """
        key = self._open(end_user_id, channel, address)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    current = await pipe.get(key)
                    current_id = _text(current) if current else None
                    if current_id is not None and current_id != previous:
                        return current_id
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, cid)
                    await pipe.execute()
                    return cid
                except redis.WatchError:
                    continue

    async def remember_inbound(self, envelope_id: str, cid: str, ttl: int) -> None:
        """Map an envelope to the conversation it opened, so a redelivery finds the same one."""
        await self.redis.set(self._inbound_seen(envelope_id), cid, ex=ttl, nx=True)

    async def inbound_conversation(self, envelope_id: str) -> str | None:
        raw = await self.redis.get(self._inbound_seen(envelope_id))
        return _text(raw) if raw else None

    # End users and identities -------------------------------------------------------------------

    async def resolve_identity(self, kind: IdentifierKind, value: str) -> tuple[str, bool]:
        """(end_user_id, created). Creates the user first, then claims the identifier, so a crash
        between the two leaves at most an orphan user, never an identifier pointing at nothing."""
        existing = await self.redis.get(self._ident(kind, value))
        if existing:
            return _text(existing), False
        user = EndUser(
            id=new_id("usr"), created_at=utcnow(), identities=(Identity(kind=kind, value=value),)
        )
        await self.redis.set(self._user(user.id), _enc.encode(user))
        if await self.redis.set(self._ident(kind, value), user.id, nx=True):
            return user.id, True
        await self.redis.delete(self._user(user.id))
        winner = await self.redis.get(self._ident(kind, value))
        return _text(winner), False

    async def create_anonymous_user(self) -> str:
        user = EndUser(id=new_id("usr"), created_at=utcnow())
        await self.redis.set(self._user(user.id), _enc.encode(user))
        return user.id

    async def get_end_user(self, uid: str) -> EndUser:
        raw = await self.redis.get(self._user(uid))
        if not raw:
            raise NotFound(f"end user {uid} not found", details={"end_user_id": uid})
        return msgspec.json.decode(raw, type=EndUser)

    # Agents and revisions (immutable once written) -----------------------------------------------

    async def put_agent(self, agent: Agent) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(f"{self.ns}agent:{agent.id}", _enc.encode(agent))
        pipe.zadd(f"{self.ns}agents", {agent.id: 0})
        await pipe.execute()

    async def get_agent(self, agent_id: str) -> Agent:
        return await self._get(f"{self.ns}agent:{agent_id}", Agent, f"agent {agent_id}")

    async def list_agents(self) -> list[Agent]:
        ids = await self.redis.zrange(f"{self.ns}agents", 0, -1)
        raws = await self.redis.mget([f"{self.ns}agent:{_text(i)}" for i in ids]) if ids else []
        return [msgspec.json.decode(r, type=Agent) for r in raws if r]

    async def next_revision_number(self, agent_id: str) -> int:
        return int(await self.redis.incr(f"{self.ns}agent-revisions:{agent_id}"))

    async def put_revision(self, revision: Revision) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(f"{self.ns}revision:{revision.id}", _enc.encode(revision))
        pipe.zadd(f"{self.ns}revisions:{revision.agent_id}", {revision.id: revision.number})
        await pipe.execute()

    async def get_revision(self, revision_id: str) -> Revision:
        return await self._get(
            f"{self.ns}revision:{revision_id}", Revision, f"revision {revision_id}"
        )

    async def list_revisions(self, agent_id: str) -> list[Revision]:
        ids = await self.redis.zrange(f"{self.ns}revisions:{agent_id}", 0, -1)
        raws = await self.redis.mget([f"{self.ns}revision:{_text(i)}" for i in ids]) if ids else []
        return [msgspec.json.decode(r, type=Revision) for r in raws if r]

    # API keys ------------------------------------------------------------------------------------

    async def put_api_key(self, key: ApiKey, secret_hash: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(f"{self.ns}apikey:{secret_hash}", _enc.encode(key))
        pipe.zadd(f"{self.ns}apikeys", {key.id: 0})
        await pipe.execute()

    async def api_key_by_hash(self, secret_hash: str) -> ApiKey | None:
        raw = await self.redis.get(f"{self.ns}apikey:{secret_hash}")
        return msgspec.json.decode(raw, type=ApiKey) if raw else None

    # Helpers -------------------------------------------------------------------------------------

    async def _get(self, key: str, type_: type[T], what: str) -> T:
        raw = await self.redis.get(key)
        if not raw:
            raise NotFound(f"{what} not found")
        return msgspec.json.decode(raw, type=type_)


def _conversation_from_hash(raw: dict[Any, Any]) -> Conversation:
    doc = _conv_doc_dec.decode(raw[b"doc"])
    doc["status"] = raw[b"status"].decode()
    doc["last_seq"] = int(raw[b"last_seq"])
    doc["updated_at"] = datetime.fromisoformat(raw[b"updated_at"].decode())
    for field in (b"closed_reason", b"approval_id"):
        if field in raw:
            doc[field.decode()] = raw[field].decode()
    return msgspec.convert(doc, Conversation, strict=False)


def _approval_from_hash(raw: dict[Any, Any]) -> Approval:
    approval = msgspec.json.decode(raw[b"doc"], type=Approval)
    resolved = raw.get(b"resolved_at")
    return msgspec.structs.replace(
        approval,
        status=_text(raw[b"status"]),
        reviewer=_text(raw[b"reviewer"]) if raw.get(b"reviewer") else None,
        note=_text(raw[b"note"]) if raw.get(b"note") else None,
        resolved_at=datetime.fromisoformat(_text(resolved)) if resolved else None,
    )
