"""The SMS worker: outbound envelopes to Twilio's Messages API, one at a time per recipient.

Per-partition ordered consumers (`max_ack_pending=1`) keep each recipient's messages in seq order.
Idempotent across redeliveries: the parts already accepted by Twilio are recorded on the delivery
before the next is sent, so a redelivery resumes instead of re-sending. (One window remains: a
crash between Twilio's 201 and that record re-sends that one part; see the README.)

Twilio unreachable, timing out, or answering 429/5xx is an outage: the message is held and retried
(`ProviderUnavailable`, up to the SMS retry horizon) and, its partition's consumer being ordered,
nothing for that recipient overtakes it. Twilio's 4xx error codes fail the delivery at once.
"""

from __future__ import annotations

import logging

import aiohttp
import msgspec
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from services.egress.connector import ChannelContext, Consumer
from services.egress.outages import Outages
from shared.bus import Delivery, ProviderUnavailable, Undeliverable, decode_or_dead
from shared.envelopes import OutboundEnvelope
from shared.identity import redact
from shared.models import Delivery as DeliveryRecord
from shared.models import utcnow
from shared.settings import EgressSettings
from shared.store import Store

log = logging.getLogger("switchboard.egress.sms")
_outbound = msgspec.json.Decoder(OutboundEnvelope)
MAX_SMS = 1600  # Twilio's limit for one Messages API body
TWILIO = "Twilio Messaging"


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
    def __init__(
        self, settings: EgressSettings, store: Store, client: Client, outages: Outages
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.outages = outages
        self.status_callback = settings.public_sms_url() + "/twilio/sms/status"

    def consumers(self, egress: ChannelContext) -> list[Consumer]:
        """One ordered consumer per partition: a recipient's replies leave in order."""
        settings, subjects = egress.settings, egress.subjects
        return [
            egress.one_at_a_time(
                f"egress-sms-p{partition}",
                subjects.outbound_partition("sms", partition),
                self.deliver,
                max_deliver=settings.sms_max_attempts,
                ack_wait=settings.twilio_timeout_seconds * 3 + 10,
                horizon=settings.sms_retry_horizon_seconds,
            )
            for partition in range(settings.partitions)
        ]

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
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                self.outages.failed(TWILIO, reason)
                raise ProviderUnavailable(TWILIO, reason) from exc
            except TwilioRestException as exc:
                if exc.status == 429 or exc.status >= 500:
                    reason = f"HTTP {exc.status}, error {exc.code}"
                    self.outages.failed(TWILIO, reason)
                    raise ProviderUnavailable(TWILIO, reason) from exc
                self.outages.recovered(TWILIO)
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
            self.outages.recovered(TWILIO)
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
