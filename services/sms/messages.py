"""Twilio's inbound SMS/MMS form, normalised into an envelope; carrier keywords recognised."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from shared.envelopes import (
    Attachment,
    ChannelKeyword,
    InboundEnvelope,
    InboundMessage,
    sms_thread_key,
)
from shared.errors import InvalidRequest
from shared.identity import make_identifier, normalize_phone
from shared.models import utcnow

# Twilio's default opt-out handling words (TWILIO.md); matched on the whole, trimmed body.
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
START_WORDS = frozenset({"START", "YES", "UNSTOP"})
HELP_WORDS = frozenset({"HELP", "INFO"})
MAX_MEDIA = 10


def keyword_of(body: str) -> Literal["stop", "start", "help"] | None:
    word = body.strip().strip(".!").upper()
    if word in STOP_WORDS:
        return "stop"
    if word in START_WORDS:
        return "start"
    if word in HELP_WORDS:
        return "help"
    return None


def _required(form: Mapping[str, str], name: str) -> str:
    value = form.get(name, "").strip()
    if not value:
        raise InvalidRequest(f"missing form field {name}", details={"field": name})
    return value


def envelope_from_form(form: Mapping[str, str]) -> InboundEnvelope:
    """The envelope id is derived from MessageSid, so Twilio's retries are one envelope."""
    sid = _required(form, "MessageSid")
    sender = make_identifier("phone", _required(form, "From"))
    recipient = normalize_phone(_required(form, "To"))
    body = form.get("Body", "")
    common = {
        "id": f"env_sms_{sid}",
        "channel": "sms",
        "received_at": utcnow(),
        "sender": sender,
        "recipient": recipient,
        "thread_key": sms_thread_key(sender.normalized, recipient),
        "provider_id": sid,
        "metadata": {
            k: form[k] for k in ("MessagingServiceSid", "NumSegments", "FromCountry") if form.get(k)
        },
    }
    keyword = keyword_of(body)
    if keyword is not None:
        return ChannelKeyword(keyword=keyword, text=body, **common)  # type: ignore[arg-type]
    try:
        media_count = min(int(form.get("NumMedia", "0") or 0), MAX_MEDIA)
    except ValueError as exc:
        raise InvalidRequest("NumMedia must be a number", details={"field": "NumMedia"}) from exc
    attachments = tuple(
        Attachment(
            url=form[f"MediaUrl{i}"],
            content_type=form.get(f"MediaContentType{i}", "application/octet-stream"),
        )
        for i in range(media_count)
        if form.get(f"MediaUrl{i}")
    )
    return InboundMessage(text=body, attachments=attachments, **common)  # type: ignore[arg-type]
