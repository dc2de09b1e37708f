"""The DEAD stream for operators: what died, why, and putting it back where it came from.

A replay republishes the original bytes on the original subject with `Nats-Msg-Id` =
`replay_<id>` and leaves a durable marker, so a letter is replayed at most once; the consumers'
own dedupe (envelope ids in core, delivery records in egress) keeps a replay of something that
had in fact been applied from doubling a turn or a reply.
"""

from __future__ import annotations

from litestar import Controller, get, post

from services.api.gateway import Gateway
from services.api.routes.dependencies import Limit
from services.api.schemas import (
    DeadLetterReplayed,
    DeadLettersReplayed,
    DeadLetterView,
    ItemList,
)
from shared.bus import DeadLetterEntry
from shared.errors import Conflict, InvalidRequest, NotFound


def _view(entry: DeadLetterEntry) -> DeadLetterView:
    letter = entry.letter
    return DeadLetterView(
        id=letter.id,
        seq=entry.seq,
        source_subject=letter.source_subject,
        reason=letter.reason,
        deliveries=letter.deliveries,
        failed_at=letter.failed_at,
        payload=letter.payload,
        replayed_at=entry.replay.replayed_at if entry.replay else None,
    )


class DeadLetterController(Controller):
    path = "/v1/dead-letters"
    tags = ["dead-letters"]
    opt = {"scope": "admin"}

    @get("/")
    async def list_dead_letters(
        self, gateway: Gateway, cursor: str | None = None, limit: Limit = 50
    ) -> ItemList[DeadLetterView]:
        if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
            raise InvalidRequest("cursor must be the next_cursor of a previous page")
        entries = await gateway.bus.dead_letters(after_seq=int(cursor or 0), limit=limit + 1)
        more = len(entries) > limit
        entries = entries[:limit]
        return ItemList(
            items=[_view(e) for e in entries],
            next_cursor=str(entries[-1].seq) if more else None,
        )

    @get("/{dead_letter_id:str}")
    async def get_dead_letter(self, dead_letter_id: str, gateway: Gateway) -> DeadLetterView:
        return _view(await _find(gateway, dead_letter_id))

    @post("/{dead_letter_id:str}/replay", status_code=200, opt={"errors": (409,)})
    async def replay(self, dead_letter_id: str, gateway: Gateway) -> DeadLetterReplayed:
        entry = await _find(gateway, dead_letter_id)
        if entry.replay is not None:
            raise Conflict(
                f"dead letter {dead_letter_id} was already replayed",
                details={"replayed_at": entry.replay.replayed_at},
            )
        replay = await gateway.bus.replay(entry)
        return DeadLetterReplayed(
            id=entry.letter.id,
            source_subject=entry.letter.source_subject,
            replayed_at=replay.replayed_at,
        )

    @post("/replay-all", status_code=200)
    async def replay_all(self, gateway: Gateway) -> DeadLettersReplayed:
        replayed, before = await gateway.bus.replay_all()
        return DeadLettersReplayed(replayed=replayed, already_replayed=before)


async def _find(gateway: Gateway, dead_letter_id: str) -> DeadLetterEntry:
    entry = await gateway.bus.dead_letter_by_id(dead_letter_id)
    if entry is None:
        raise NotFound(f"dead letter {dead_letter_id} not found")
    return entry
