"""Normalising identifiers so one person is one end user across channels.

Phone numbers become E.164 (SMS and voice share them); email addresses are case-folded. Distinct
identifiers are never merged implicitly: linking is an explicit API call.
"""

from __future__ import annotations

import phonenumbers

from shared.envelopes import Identifier
from shared.errors import InvalidRequest
from shared.models import IdentifierKind, RouteKind

# Numbers written without a country code are read as this region's (NANP, as Twilio's US numbers).
DEFAULT_REGION = "US"


def normalize_phone(raw: str, region: str = DEFAULT_REGION) -> str:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidRequest(f"not a phone number: {exc}", details={"field": "identifier"}) from exc
    if not phonenumbers.is_possible_number(number):
        raise InvalidRequest("not a possible phone number", details={"field": "identifier"})
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def normalize_email(raw: str) -> str:
    address = raw.strip()
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain or " " in address:
        raise InvalidRequest("not an email address", details={"field": "identifier"})
    return address.casefold()


def kind_for_channel(channel: str) -> IdentifierKind:
    """Which identifier a channel's senders have: SMS and voice share phone numbers."""
    return {"sms": "phone", "voice": "phone", "email": "email"}.get(channel, "external")  # type: ignore[return-value]


def make_identifier(kind: IdentifierKind, raw: str) -> Identifier:
    if kind == "phone":
        normalized = normalize_phone(raw)
    elif kind == "email":
        normalized = normalize_email(raw)
    else:
        normalized = raw.strip()
        if not normalized or len(normalized) > 256:
            raise InvalidRequest(
                "identifier must be 1-256 characters", details={"field": "identifier"}
            )
    return Identifier(kind=kind, raw=raw, normalized=normalized)


def route_address(raw: str) -> tuple[RouteKind, str]:
    """One of our addresses as the routing table keys it: an E.164 number, a case-folded email
    address, or `@domain` for every address of an email domain (`@example.com` or `example.com`)."""
    address = raw.strip()
    if address.startswith("@") or ("@" not in address and "." in address):
        domain = address.lstrip("@").casefold()
        if not domain or "@" in domain or " " in domain or "." not in domain:
            raise InvalidRequest("not an email domain", details={"field": "address"})
        return "domain", f"@{domain}"
    if "@" in address:
        return "email", normalize_email(address)
    return "phone", normalize_phone(address)


def redact(value: str | None) -> str:
    """For logs at info level: enough to correlate, not enough to identify (`+1415•••09`)."""
    if not value:
        return ""
    if len(value) <= 4:
        return "•••"
    return f"{value[:4]}•••{value[-2:]}"
