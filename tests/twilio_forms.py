"""Requests as Twilio sends them: a form, signed (X-Twilio-Signature) for the public URL Twilio
was configured with, and POSTed to wherever the service under test listens."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx
from twilio.request_validator import RequestValidator

from tests.conftest import TWILIO_SID, TWILIO_TOKEN

OUR_NUMBER = "+15550001111"
ALICE = "+14155550109"


def sign(public_url: str, form: Mapping[str, str], token: str = TWILIO_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(public_url, dict(form)))


def sms_form(
    body: str, sender: str = ALICE, to: str = OUR_NUMBER, sid: str | None = None, **extra: str
) -> dict[str, str]:
    """An inbound SMS webhook's form (a new MessageSid unless `sid` is given)."""
    return {
        "MessageSid": sid or "SM" + secrets.token_hex(16),
        "AccountSid": TWILIO_SID,
        "From": sender,
        "To": to,
        "Body": body,
        "NumMedia": "0",
        **extra,
    }


def _signed(
    public_url: str,
    form: Mapping[str, str],
    listening: str | None,
    token: str,
    signature: str | None,
    headers: Mapping[str, str] | None,
) -> tuple[str, dict[str, str]]:
    """Where to send it (the public URL's origin replaced by `listening`) and its headers."""
    target = public_url
    if listening is not None:
        parts = urlsplit(public_url)
        target = listening.rstrip("/") + public_url[len(f"{parts.scheme}://{parts.netloc}") :]
    return target, {
        "X-Twilio-Signature": signature or sign(public_url, form, token),
        **(headers or {}),
    }


async def post_twilio(
    public_url: str,
    form: Mapping[str, str],
    *,
    listening: str | None = None,
    token: str = TWILIO_TOKEN,
    signature: str | None = None,
    headers: Mapping[str, str] | None = None,
    client: httpx.AsyncClient | None = None,
    timeout: float = 10.0,
) -> httpx.Response:
    target, all_headers = _signed(public_url, form, listening, token, signature, headers)
    if client is not None:
        return await client.post(target, data=dict(form), headers=all_headers)
    async with httpx.AsyncClient(timeout=timeout) as own:
        return await own.post(target, data=dict(form), headers=all_headers)


def post_twilio_sync(
    public_url: str,
    form: Mapping[str, str],
    *,
    listening: str | None = None,
    token: str = TWILIO_TOKEN,
    timeout: float = 10.0,
) -> httpx.Response:
    """The same, from synchronous code (Hypothesis tests, the `up` end-to-end test)."""
    target, headers = _signed(public_url, form, listening, token, None, None)
    return httpx.post(target, data=dict(form), headers=headers, timeout=timeout)
