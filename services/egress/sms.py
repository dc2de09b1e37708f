"""The SMS worker: outbound envelopes to Twilio's Messages API, one at a time per recipient.

Per-partition ordered consumers (`max_ack_pending=1`) keep each recipient's messages in seq order.
Idempotent across redeliveries: the parts already accepted by Twilio are recorded on the delivery
before the next is sent, so a redelivery resumes instead of re-sending. (One window remains: a
crash between Twilio's 201 and that record re-sends that one part; see the README.)
"""

from __future__ import annotations

import logging

import msgspec
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from shared.bus import Delivery, Undeliverable, decode_or_dead
from shared.envelopes import OutboundEnvelope
from shared.identity import redact
from shared.models import Delivery as DeliveryRecord
from shared.models import utcnow
from shared.settings import EgressSettings
from shared.store import Store

log = logging.getLogger("switchboard.egress.sms")
_outbound = msgspec.json.Decoder(OutboundEnvelope)
MAX_SMS = 1600  # Twilio's limit for one Messages API body


def split_text(text: str, limit: int = MAX_SMS) -> list[str]:
    """Split at whitespace into parts of at most `limit` characters (hard-cut a longer word)."""
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        cut = rest.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest or not parts:
        parts.append(rest)
    return parts


class SmsSender:
    def __init__(self, settings: EgressSettings, store: Store, client: Client) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.status_callback = settings.public_sms_url() + "/twilio/sms/status"

    async def deliver(self, delivery: Delivery) -> None:
        out = decode_or_dead(_outbound, delivery.data)
        if out.session_type == "simulation":
            return
        if not out.recipient or not out.sender:
            raise Undeliverable("invalid: SMS outbound without recipient or sender")
        record = await self.store.get_delivery(out.conversation_id, out.turn_id) or DeliveryRecord(
            turn_id=out.turn_id,
            conversation_id=out.conversation_id,
            channel="sms",
            status="pending",
            updated_at=utcnow(),
        )
        if await self.store.is_opted_out("sms", out.sender, out.recipient):
            await self.store.put_delivery(
                msgspec.structs.replace(
                    record,
                    status="suppressed",
                    error_message="recipient opted out (STOP)",
                    updated_at=utcnow(),
                )
            )
            log.info("not sent: recipient opted out", extra={"turn_id": out.turn_id})
            return
        sent = list(record.provider_ids)
        parts = split_text(out.text)
        for index, part in enumerate(parts[len(sent) :], start=len(sent)):
            try:
                message = await self.client.messages.create_async(
                    to=out.recipient,
                    from_=out.sender,
                    body=part,
                    # Names the turn and part: Twilio has no idempotency key for sends, so a
                    # crash between its 201 and our record resends, and this makes the
                    # duplicate recognisable in Twilio's logs and in our status callbacks.
                    status_callback=f"{self.status_callback}?turn={out.turn_id}&part={index}",
                )
            except TwilioRestException as exc:
                if exc.status == 429 or exc.status >= 500:
                    raise  # retried with backoff by the bus, then dead-lettered
                await self.store.put_delivery(
                    msgspec.structs.replace(
                        record,
                        provider_ids=tuple(sent),
                        status="failed",
                        error_code=str(exc.code),
                        error_message=exc.msg,
                        updated_at=utcnow(),
                    )
                )
                raise Undeliverable(f"twilio_error {exc.code}: {exc.msg}") from exc
            sent.append(str(message.sid))
            record = msgspec.structs.replace(
                record,
                provider_ids=tuple(sent),
                status=str(message.status or "queued"),
                updated_at=utcnow(),
            )
            await self.store.put_delivery(record)
        log.info(
            "sms sent",
            extra={"turn_id": out.turn_id, "parts": len(parts), "to": redact(out.recipient)},
        )
