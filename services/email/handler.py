"""The SMTP conversation: recipients only at our domains, size-limited, and `250` only once the
envelope is stored in JetStream (`451` on a transient failure, so the sender retries)."""

from __future__ import annotations

import hashlib
import logging

import msgspec
from aiosmtpd.smtp import SMTP, Envelope, Session

from services.email.parsing import ParsedMail, fallback_message_id, parse
from services.email.quotes import new_text
from shared import tracing
from shared.bus import Bus
from shared.envelopes import (
    Attachment,
    InboundMessage,
    ThreadHints,
    email_thread_key,
)
from shared.errors import InvalidRequest
from shared.events import EmailAutoReplyDropped, EmailBounced, make_event, type_of
from shared.identity import make_identifier, redact
from shared.models import utcnow
from shared.settings import EmailSettings
from shared.store import Store

log = logging.getLogger("switchboard.email")
_enc = msgspec.json.Encoder()
MAX_TEXT = 16_000


def loop_reason(mail: ParsedMail, mail_from: str) -> str | None:
    """Why a message must never become a turn or be answered (RFC 3834 and common practice)."""
    headers = mail.headers
    auto = headers.get("auto-submitted", "").lower()
    if auto and auto != "no":
        return "auto_submitted"
    if headers.get("precedence", "").lower() in ("bulk", "junk", "list"):
        return "precedence"
    if headers.get("list-id"):
        return "mailing_list"
    if headers.get("x-autoreply") or headers.get("x-autorespond"):
        return "x_autoreply"
    if mail_from in ("", "<>"):
        return "empty_return_path"
    return None


class InboundMail:
    """aiosmtpd handler: every hook answers with a precise SMTP reply."""

    def __init__(self, settings: EmailSettings, bus: Bus, store: Store) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.domains = settings.domains()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain not in self.domains:
            return f"550 5.7.1 Relaying denied: this server accepts mail only for {', '.join(self.domains)}"
        if len(envelope.rcpt_tos) >= self.settings.email_max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)  # aiosmtpd leaves this to a handler that overrides RCPT
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # One trace per message, from here to the reply.
        with tracing.traced("smtp DATA", kind="server"):
            return await self.accept(envelope)

    async def accept(self, envelope: Envelope) -> str:
        raw = (
            envelope.content
            if isinstance(envelope.content, bytes)
            else str(envelope.content).encode()
        )
        try:
            mail = parse(raw)
        except Exception:  # the parser is lenient; this is the last line of defence
            log.warning("unparseable message refused", exc_info=True)
            return "554 5.6.0 Message could not be parsed as MIME"
        mail_from = envelope.mail_from or ""
        try:
            if mail.content_type == "multipart/report" and mail.report_type == "delivery-status":
                await self.bounce(mail)
                return "250 2.0.0 OK: bounce recorded"
            reason = loop_reason(mail, mail_from)
            if reason is not None:
                await self.event(
                    EmailAutoReplyDropped(message_id=mail.message_id, reason=reason), mail
                )
                return "250 2.0.0 OK: automatic message noted, not answered"
            try:
                env = self.envelope(mail, raw, envelope.rcpt_tos)
            except InvalidRequest as exc:
                return f"550 5.6.0 {exc.message}"
            await self.bus.publish(
                self.bus.subjects.inbound("email", env.routing_key), _enc.encode(env), msg_id=env.id
            )
        except Exception:
            log.exception("could not store the message; asking the sender to retry")
            return "451 4.3.0 Temporary failure, please try again later"
        log.info("mail accepted", extra={"envelope_id": env.id, "from": redact(mail.sender)})
        return "250 2.0.0 OK: queued"

    def envelope(self, mail: ParsedMail, raw: bytes, rcpt_tos: list[str]) -> InboundMessage:
        if not mail.sender:
            raise InvalidRequest("The From header has no usable address")
        text = new_text(mail.text)[:MAX_TEXT]
        if not text and not mail.attachments:
            raise InvalidRequest("The message has no readable text")
        if not text:  # attachments only: say so, so the transcript and the agent see something
            names = ", ".join(name or ctype for name, ctype, _ in mail.attachments)
            text = f"[attachments: {names}]"
        sender = make_identifier("email", mail.sender)
        ours = next((r for r in rcpt_tos if r.rpartition("@")[2].lower() in self.domains), "")
        local, _, domain = ours.lower().rpartition("@")
        token = local.partition("+")[2] if local.startswith("reply+") else None
        if token:  # replies come back to reply+TOKEN@; we answer as the support address
            ours = f"{self.settings.email_from_local}@{domain}"
        message_id = mail.message_id or fallback_message_id(raw)
        digest = hashlib.sha256(message_id.encode()).hexdigest()[:32]
        in_reply_to = mail.in_reply_to[0] if mail.in_reply_to else None
        return InboundMessage(
            id=f"env_email_{digest}",
            channel="email",
            received_at=utcnow(),
            sender=sender,
            recipient=ours.lower(),
            provider_id=message_id,
            text=text,
            thread_key=email_thread_key(message_id, in_reply_to, mail.references),
            thread=ThreadHints(
                message_id=message_id,
                in_reply_to=in_reply_to,
                references=mail.references,
                subject=mail.subject[:998],
                reply_token=token,
            ),
            attachments=tuple(
                Attachment(name=name, content_type=ctype, size=size)
                for name, ctype, size in mail.attachments
            ),
            original_text=mail.text[:100_000],
            metadata={"size": len(raw)},
        )

    async def bounce(self, mail: ParsedMail) -> None:
        """A DSN: mark the delivery of the message it refers to as failed; never a turn."""
        failed = []
        conversation_id: str | None = None
        for message_id in mail.bounced_message_ids:
            delivery = await self.store.delivery_by_provider_id(message_id)
            if delivery is not None:
                conversation_id = conversation_id or delivery.conversation_id
            if delivery is not None and delivery.status != "failed":
                await self.store.put_delivery(
                    msgspec.structs.replace(
                        delivery, status="failed", error_message="bounced", updated_at=utcnow()
                    )
                )
                failed.append(delivery.turn_id)
        await self.event(
            EmailBounced(
                message_id=mail.message_id,
                message_ids=list(mail.bounced_message_ids),
                failed_turns=failed,
            ),
            mail,
            conversation_id=conversation_id,
        )

    async def event(
        self,
        data: EmailBounced | EmailAutoReplyDropped,
        mail: ParsedMail,
        conversation_id: str | None = None,
    ) -> None:
        key = hashlib.sha256((mail.message_id or repr(data)).encode()).hexdigest()[:32]
        event_type = type_of(data)
        event = make_event(
            data,
            id=f"evt_{event_type}_{key}",
            occurred_at=utcnow(),
            actor="email",
            conversation_id=conversation_id,
            # Without a session type, webhook fan-out would drop it as if it were a test session.
            session_type=await self.store.session_type_of(conversation_id),
        )
        await self.bus.publish(
            self.bus.subjects.event(event_type), _enc.encode(event), msg_id=event.id
        )
