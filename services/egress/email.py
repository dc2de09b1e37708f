"""The email worker: outbound envelopes become threaded replies sent through an SMTP relay.

Replies carry a Message-ID at our domain (indexed before sending, so the user's answer threads),
In-Reply-To and References of the thread, `Reply-To: reply+TOKEN@domain`, `Subject: Re: …`,
`Auto-Submitted: auto-replied` (RFC 3834: other robots must not answer), and text + HTML parts.
One SMTP connection is reused. A relay that is unreachable, times out or answers 4xx is an
outage: the reply is held and retried (`ProviderUnavailable`, up to the email retry horizon, 24 h
by default, as MTAs queue). A 5xx answer fails the delivery at once.
"""

from __future__ import annotations

import asyncio
import html
import logging
from email.message import EmailMessage
from email.utils import formatdate
from typing import NoReturn

import aiosmtplib
import msgspec

from services.egress.connector import ChannelContext, Consumer
from services.egress.outages import Outages
from shared.bus import Delivery, ProviderUnavailable, Undeliverable, decode_or_dead
from shared.envelopes import OutboundEnvelope
from shared.identity import redact
from shared.models import Delivery as DeliveryRecord
from shared.models import utcnow
from shared.settings import EgressSettings
from shared.store import Store

log = logging.getLogger("switchboard.egress.email")
_outbound = msgspec.json.Decoder(OutboundEnvelope)


def reply_subject(subject: str) -> str:
    subject = subject.strip() or "Your message"
    return subject if subject.lower().startswith("re:") else f"Re: {subject}"


class EmailSender:
    def __init__(self, settings: EgressSettings, store: Store, outages: Outages) -> None:
        self.settings = settings
        self.store = store
        self.outages = outages
        self.relay = f"SMTP relay {settings.smtp_relay_host}:{settings.smtp_relay_port}"
        self.domain = settings.domains()[0]
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection

    def consumers(self, egress: ChannelContext) -> list[Consumer]:
        settings, subjects = egress.settings, egress.subjects
        return [
            egress.one_at_a_time(
                "egress-email",
                subjects.outbound("email") + ".*",
                self.deliver,
                max_deliver=settings.email_max_attempts,
                ack_wait=settings.smtp_relay_timeout_seconds * 2 + 10,
                horizon=settings.email_retry_horizon_seconds,
            )
        ]

    def build(self, out: OutboundEnvelope, thread: dict[str, str]) -> EmailMessage:
        msg = EmailMessage()
        sender = out.sender or f"{self.settings.email_from_local}@{self.domain}"
        domain = sender.rpartition("@")[2] or self.domain
        msg["From"] = sender
        msg["To"] = out.recipient or ""
        # A reply says "Re:"; a first message of ours (an API-opened conversation) does not.
        first = not thread.get("last_message_id")
        subject = thread.get("subject", "")
        msg["Subject"] = (subject or "Your message") if first else reply_subject(subject)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = f"<{out.turn_id}@{domain}>"
        # In-Reply-To names the message this reply answers (RFC 5322 §3.6.4): the user's mail the
        # turn came from, not whatever arrived in the thread since.
        answered = out.thread.message_id if out.thread and out.thread.message_id else None
        if answered or thread.get("last_message_id"):
            msg["In-Reply-To"] = answered or thread["last_message_id"]
        if thread.get("references"):
            msg["References"] = thread["references"]
        if thread.get("reply_token"):
            msg["Reply-To"] = f"reply+{thread['reply_token']}@{domain}"
        msg["Auto-Submitted"] = "auto-replied"
        msg.set_content(out.text)
        paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in out.text.split("\n\n"))
        msg.add_alternative(f"<html><body>{paragraphs}</body></html>", subtype="html")
        return msg

    async def deliver(self, delivery: Delivery) -> None:
        out = decode_or_dead(_outbound, delivery.data)
        if out.session_type == "simulation":
            return
        if not out.recipient:
            raise Undeliverable("invalid: email outbound without a recipient")
        msg = self.build(out, await self.store.email_thread(out.conversation_id))
        message_id = str(msg["Message-ID"])
        record = DeliveryRecord(
            turn_id=out.turn_id,
            conversation_id=out.conversation_id,
            channel="email",
            status="pending",
            provider_ids=(message_id,),
            updated_at=utcnow(),
        )
        await self.store.index_message_ids(out.conversation_id, [message_id])
        await self.store.put_delivery(record)
        try:
            await self.send(msg)
        except aiosmtplib.SMTPNotSupported as exc:  # e.g. a UTF-8 address the relay cannot take
            await self.store.put_delivery(
                msgspec.structs.replace(
                    record, status="failed", error_message=str(exc), updated_at=utcnow()
                )
            )
            raise Undeliverable(f"smtp_not_supported: {exc}") from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(400 <= code < 500 for code in codes):
                await self._held(record, f"SMTP {codes[0]}: recipient refused for now")
            await self._failed(record, str(codes[0]), str(exc))
            raise Undeliverable(f"smtp_error {codes[0]}: recipient refused") from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                await self._held(record, f"SMTP {exc.code}: {exc.message}")
            await self._failed(record, str(exc.code), exc.message)
            raise Undeliverable(f"smtp_error {exc.code}: {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:  # unreachable, timed out, hung up
            await self._held(record, f"{type(exc).__name__}: {exc}")
        self.outages.recovered(self.relay)
        await self.store.put_delivery(
            msgspec.structs.replace(record, status="sent", updated_at=utcnow())
        )
        log.info("email sent", extra={"turn_id": out.turn_id, "to": redact(out.recipient)})

    async def _held(self, record: DeliveryRecord, reason: str) -> NoReturn:
        """The relay cannot take it now: say so on the record, and hold the message."""
        self.outages.failed(self.relay, reason)
        await self.store.put_delivery(
            msgspec.structs.replace(record, error_message=reason, updated_at=utcnow())
        )
        raise ProviderUnavailable(self.relay, reason)

    async def _failed(self, record: DeliveryRecord, code: str, message: str) -> None:
        self.outages.recovered(self.relay)  # it answered: whatever it said, it is up
        await self.store.put_delivery(
            msgspec.structs.replace(
                record,
                status="failed",
                error_code=code,
                error_message=message,
                updated_at=utcnow(),
            )
        )

    async def send(self, msg: EmailMessage) -> None:
        async with self._lock:
            for attempt in (1, 2):  # a reused connection may have been closed by the relay
                smtp = await self._connection()
                try:
                    await smtp.send_message(msg)
                    return
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                    self._smtp = None
                    if attempt == 2:
                        raise

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is None or not self._smtp.is_connected:
            smtp = aiosmtplib.SMTP(
                hostname=self.settings.smtp_relay_host,
                port=self.settings.smtp_relay_port,
                timeout=self.settings.smtp_relay_timeout_seconds,
                start_tls=False,
            )
            await smtp.connect()
            self._smtp = smtp
        return self._smtp

    async def close(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.quit()
            except aiosmtplib.SMTPException:
                self._smtp.close()
        self._smtp = None
