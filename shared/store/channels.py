"""What the channels keep beside the conversation: delivery records of replies (and the provider
ids that find them), SMS opt-outs, the call ↔ conversation map, and email threading (Message-IDs,
reply tokens, thread headers, untrimmed originals)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.models import Delivery, utcnow
from shared.store.collection import Aggregate, Codec, encode, text

_delivery = Codec(Delivery)
_WEEK = 7 * 24 * 3600


class ChannelState(Aggregate):
    # Opt-outs (SMS STOP) --------------------------------------------------------------------------

    async def set_opted_out(self, channel: str, ours: str, theirs: str, opted_out: bool) -> None:
        key = self._k.opt_out(channel, ours, theirs)
        if opted_out:
            await self._r.set(key, utcnow().isoformat())
        else:
            await self._r.delete(key)

    async def is_opted_out(self, channel: str, ours: str, theirs: str) -> bool:
        return bool(await self._r.exists(self._k.opt_out(channel, ours, theirs)))

    # Deliveries of replies -------------------------------------------------------------------------

    async def get_delivery(self, cid: str, turn_id: str) -> Delivery | None:
        raw = await self._r.hget(self._k.deliveries(cid), turn_id)
        return _delivery.decode(raw) if raw else None

    async def list_deliveries(self, cid: str) -> list[Delivery]:
        raw = await self._r.hgetall(self._k.deliveries(cid))
        return sorted(_delivery.decode_present(raw.values()), key=lambda d: d.turn_id)

    async def put_delivery(self, delivery: Delivery) -> None:
        cid = delivery.conversation_id
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(self._k.deliveries(cid), delivery.turn_id, encode(delivery))
        for sid in delivery.provider_ids:
            pipe.set(self._k.provider_message(sid), f"{cid}|{delivery.turn_id}")
        await pipe.execute()

    async def delivery_by_provider_id(self, provider_id: str) -> Delivery | None:
        raw = await self._r.get(self._k.provider_message(provider_id))
        if not raw:
            return None
        cid, _, turn_id = text(raw).partition("|")
        return await self.get_delivery(cid, turn_id)

    # Calls -----------------------------------------------------------------------------------------

    async def put_call(self, call_sid: str, cid: str) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.set(self._k.call(call_sid), cid, ex=_WEEK)
        pipe.set(self._k.call_of(cid), call_sid, ex=_WEEK)
        await pipe.execute()

    async def conversation_by_call(self, call_sid: str) -> str | None:
        return await self._text_at(self._k.call(call_sid))

    async def call_of(self, cid: str) -> str | None:
        return await self._text_at(self._k.call_of(cid))

    # Email threads ---------------------------------------------------------------------------------

    async def put_original(self, cid: str, seq: int, text: str) -> None:
        """The full original of a turn whose content was trimmed (email quotes), for audit."""
        await self._r.hset(self._k.originals(cid), str(seq), text)

    async def get_original(self, cid: str, seq: int) -> str | None:
        raw = await self._r.hget(self._k.originals(cid), str(seq))
        return text(raw) if raw is not None else None

    async def index_message_ids(
        self, cid: str, message_ids: Sequence[str], ttl: int = 400 * 24 * 3600
    ) -> None:
        """Message-ID → conversation, for replies that quote it in In-Reply-To / References."""
        pipe = self._r.pipeline(transaction=False)
        for mid in message_ids:
            pipe.set(self._k.message_id(mid), cid, ex=ttl)
        await pipe.execute()

    async def conversation_by_message_ids(self, message_ids: Sequence[str]) -> str | None:
        """The newest conversation any of these Message-IDs belongs to."""
        if not message_ids:
            return None
        found = await self.connection.get_many(
            [self._k.message_id(m) for m in reversed(message_ids)]
        )
        return next((text(f) for f in found if f), None)

    async def put_reply_token(self, token: str, cid: str) -> None:
        await self._r.set(self._k.reply_token(token), cid)

    async def conversation_by_reply_token(self, token: str) -> str | None:
        return await self._text_at(self._k.reply_token(token))

    async def update_email_thread(self, cid: str, fields: dict[str, str]) -> None:
        await self._r.hset(self._k.email_thread(cid), mapping=dict[Any, Any](fields))

    async def email_thread(self, cid: str) -> dict[str, str]:
        raw = await self._r.hgetall(self._k.email_thread(cid))
        return {text(k): text(v) for k, v in raw.items()}
