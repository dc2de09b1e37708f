"""Twilio, as the SMS and voice channels and egress use it: signatures in, REST out.

Provider plumbing shared by three services (sms, voice, egress); no channel logic lives here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NoReturn

from litestar import Request
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from shared.errors import Forbidden
from shared.settings import TwilioSettings

log = logging.getLogger("switchboard.twilio")
TWILIO_API = "https://api.twilio.com"


class SignatureError(Forbidden):
    code = "bad_signature"


def check_signature(
    settings: TwilioSettings, url: str, params: Mapping[str, str], signature: str | None
) -> None:
    """Validate `X-Twilio-Signature` with the auth token of the webhook's own AccountSid.

    Over URL + params only, before anything else is looked at: never route by `To` or
    `MessagingServiceSid` first (number pools would make legitimate traffic fail).
    """
    if settings.twilio_skip_signature:
        return
    if not signature:
        _refuse("missing X-Twilio-Signature header", "missing", url)
    account = params.get("AccountSid", "")
    token = settings.auth_tokens().get(account)
    if token is None:
        _refuse("the webhook's AccountSid is not one of ours", "unknown_account", url)
    if not RequestValidator(token).validate(url, dict(params), signature):
        _refuse("X-Twilio-Signature does not match this request", "mismatch", url)


async def signed_form(
    request: Request[Any, Any, Any], settings: TwilioSettings, public_url: str
) -> dict[str, str]:
    """A webhook's form, once Twilio's signature over (public URL + path + query, params) checks
    out; `public_url` is the service's own, as configured at Twilio."""
    form = await request.form()
    params = {k: str(form.get(k)) for k in form}
    url = public_url + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    check_signature(settings, url, params, request.headers.get("x-twilio-signature"))
    return params


def _refuse(message: str, reason: str, url: str) -> NoReturn:
    """Name the URL the signature was checked against, in the log and in `details`: behind a
    proxy or a tunnel (ngrok) a mismatch is nearly always a public URL setting that differs from
    the URL Twilio was given. (The webhook's error handler logs the message, URL included.)"""
    raise SignatureError(
        f"{message} (checked against {url}; set the service's public URL setting to the URL "
        "configured at Twilio)",
        details={"reason": reason, "url": url},
    )


def warn_if_unsigned(settings: TwilioSettings, service: str) -> None:
    if settings.twilio_skip_signature:
        log.warning(
            "!!! SWITCHBOARD_TWILIO_SKIP_SIGNATURE is on: %s accepts UNSIGNED webhooks. "
            "Anyone can forge messages. Never run this in production. !!!",
            service,
        )


class RedirectingHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """Sends the library's requests to `base_url` (a local fake in tests), always with a timeout."""

    def __init__(self, base_url: str, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.base_url = base_url.rstrip("/")

    async def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> TwilioResponse:
        if url.startswith(TWILIO_API):
            url = self.base_url + url[len(TWILIO_API) :]
        return await super().request(method, url, *args, **kwargs)


def rest_client(settings: TwilioSettings) -> tuple[Client, RedirectingHttpClient]:
    """The async REST client and its HTTP client, which the caller must close on shutdown."""
    http = RedirectingHttpClient(settings.twilio_base_url, settings.twilio_timeout_seconds)
    return Client(settings.twilio_account_sid, settings.twilio_auth_token, http_client=http), http
