"""Approvals: a hash per approval (its document plus the fields a resolution changes), an index of
all, a deadline index of the pending ones, and the decided-but-not-applied set the sweeper drains."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec
from redis.asyncio.client import Pipeline

from shared.errors import Conflict
from shared.models import Approval, utcnow
from shared.store.collection import Aggregate, Codec, Page, encode, not_found, text
from shared.store.connection import Connection

_approval = Codec(Approval)

# KEYS: approval hash. ARGV: new status, reviewer, note, resolved_at, reviewer's display name
_RESOLVE_APPROVAL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'not_found' end
if status ~= 'pending' then return status end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'reviewer', ARGV[2], 'note', ARGV[3],
           'resolved_at', ARGV[4], 'reviewer_name', ARGV[5])
return 'ok'
"""


def _approval_from_hash(raw: dict[Any, Any]) -> Approval:
    approval = _approval.decode(raw[b"doc"])
    resolved = raw.get(b"resolved_at")
    return msgspec.structs.replace(
        approval,
        status=text(raw[b"status"]),
        reviewer=text(raw[b"reviewer"]) if raw.get(b"reviewer") else None,
        reviewer_name=text(raw[b"reviewer_name"]) if raw.get(b"reviewer_name") else None,
        note=text(raw[b"note"]) if raw.get(b"note") else None,
        resolved_at=datetime.fromisoformat(text(resolved)) if resolved else None,
    )


class Approvals(Aggregate):
    def __init__(self, connection: Connection) -> None:
        super().__init__(connection)
        self._resolve_approval = connection.script(_RESOLVE_APPROVAL)

    async def create_approval(self, approval: Approval) -> None:

        def record(pipe: Pipeline) -> None:
            pipe.hset(
                self._k.approval(approval.id),
                mapping={"doc": encode(approval), "status": approval.status},
            )

        def index(pipe: Pipeline) -> None:
            pipe.zadd(self._k.approvals(), {approval.id: 0})
            pipe.zadd(self._k.approvals_pending(), {approval.id: approval.timeout_at.timestamp()})

        # The indexes first: an approval no deadline index holds would never time out; an id
        # without its record (a crash between) is skipped by listings (keys.py, rule 3).
        await self.connection.in_order(index, record)

    async def get_approval(self, aid: str) -> Approval:
        raw = await self._r.hgetall(self._k.approval(aid))
        if not raw:
            raise not_found("approval", aid, "approval_id")
        return _approval_from_hash(raw)

    async def get_approvals(self, ids: Sequence[str]) -> list[Approval]:
        raws = await self._hashes(self._k.approval(aid) for aid in ids)
        return [_approval_from_hash(raw) for raw in raws]

    async def resolve_approval(
        self,
        aid: str,
        status: str,
        reviewer: str,
        note: str | None,
        reviewer_name: str | None = None,
    ) -> Approval:
        """pending → `status`, once. A second resolve is a Conflict carrying the current status."""
        outcome = text(
            await self._resolve_approval(
                keys=[self._k.approval(aid)],
                args=[status, reviewer, note or "", utcnow().isoformat(), reviewer_name or ""],
            )
        )
        if outcome == "not_found":
            raise not_found("approval", aid, "approval_id")
        if outcome != "ok":
            raise Conflict(f"approval is already {outcome}", details={"status": outcome})
        await self.mark_unapplied(aid)
        return await self.get_approval(aid)

    async def mark_unapplied(self, aid: str) -> None:
        """Decided but not yet carried out by core: the sweeper re-sends it until it is."""
        pipe = self._r.pipeline(transaction=False)
        pipe.zrem(self._k.approvals_pending(), aid)
        pipe.zadd(self._k.approvals_unapplied(), {aid: utcnow().timestamp()}, nx=True)
        await pipe.execute()

    async def mark_applied(self, aid: str) -> None:
        await self._r.zrem(self._k.approvals_unapplied(), aid)

    async def approvals_due(self, now: float, limit: int = 100) -> list[str]:
        return await self._ids_scored_until(self._k.approvals_pending(), now, limit)

    async def approvals_unapplied(self, before: float, limit: int = 100) -> list[str]:
        return await self._ids_scored_until(self._k.approvals_unapplied(), before, limit)

    async def _ids_scored_until(self, index: str, until: float, limit: int) -> list[str]:
        ids = await self._r.zrangebyscore(index, "-inf", until, start=0, num=limit)
        return [text(i) for i in ids]

    async def list_approvals(
        self, *, status: str | None, cursor: str | None, limit: int
    ) -> Page[Approval]:
        return await self._page_newest_first(
            self._k.approvals(),
            cursor=cursor,
            limit=limit,
            load=self.get_approvals,
            keep=lambda approval: status is None or approval.status == status,
            id_of=lambda approval: approval.id,
        )

    async def claim_once(self, key: str, ttl: int = 7 * 24 * 3600) -> bool:
        """True the first time `key` is claimed (e.g. one "still waiting" notice per approval)."""
        return bool(await self._r.set(self._k.once(key), 1, nx=True, ex=ttl))

    async def claim_or_holder(self, key: str, holder: str, ttl: int = 7 * 24 * 3600) -> str | None:
        """Claim `key` for `holder`: None if this call claimed it, else who holds it. One
        `SET NX GET`, so two claimants can never both see None."""
        previous = await self._r.set(self._k.once(key), holder, nx=True, get=True, ex=ttl)
        return (
            None
            if previous is None
            else previous.decode()
            if isinstance(previous, bytes)
            else str(previous)
        )
