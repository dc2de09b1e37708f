"""The SMS service: Twilio's messaging webhook and status callback, signature-checked.

A message is answered `200` (empty TwiML) only after its envelope is stored in JetStream, with
`Nats-Msg-Id` = MessageSid so a retried webhook is stored once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post
from litestar.datastructures import State
from twilio.twiml.messaging_response import MessagingResponse

from services.sms.messages import envelope_from_form
from shared.envelopes import ChannelKeyword
from shared.errors import InvalidRequest
from shared.events import MessageStatus, make_event
from shared.http import probe_handlers, provider_webhook_error, serve_until, trace_requests
from shared.identity import redact
from shared.models import DELIVERY_RANK, utcnow
from shared.ratelimit import Limit, RateLimiter
from shared.service import Service
from shared.settings import SmsSettings
from shared.twilio import signed_form, warn_if_unsigned

log = logging.getLogger("switchboard.sms")
_enc = msgspec.json.Encoder()
MAX_BODY = 64 * 1024
TWIML = "text/xml"
NO_REPLY = str(MessagingResponse())  # built once: the answer to nearly every webhook


def create_app(settings: SmsSettings) -> Litestar:
    service = Service("sms", settings)
    metrics, subjects, bus, store = service.metrics, service.subjects, service.bus, service.store
    limiter = RateLimiter(store.connection)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        warn_if_unsigned(settings, "sms")
        async with service.opened():
            log.info(
                "sms ready",
                extra={"port": settings.sms_port, "public_url": settings.public_sms_url()},
            )
            yield

    @post("/twilio/sms", status_code=200, media_type=TWIML)
    async def inbound(request: Request[Any, Any, Any]) -> Response[str]:
        form = await signed_form(request, settings, settings.public_sms_url())
        env = envelope_from_form(form)
        sender = env.sender.normalized if env.sender else ""
        if not isinstance(env, ChannelKeyword):  # STOP / START / HELP are always honoured
            await limiter.check(
                Limit(
                    f"sms:{sender}", settings.rate_limit_sms_per_sender_per_minute, 60.0, "sender"
                )
            )
        await bus.publish(
            subjects.inbound("sms", env.routing_key),
            _enc.encode(env),
            msg_id=env.provider_id or env.id,
        )
        metrics.messages.labels("sms_ingress", "sms", env.__struct_config__.tag or "").inc()
        log.info("sms accepted", extra={"envelope_id": env.id, "from": redact(sender)})
        if not (isinstance(env, ChannelKeyword) and env.keyword == "help"):
            return Response(NO_REPLY, media_type=TWIML)
        # The agent routed for our number answers HELP in its own words (else the settings').
        revision = await store.answering_revision(env.recipient, settings.default_agent)
        twiml = MessagingResponse()
        twiml.message((revision.sms_help_text if revision else None) or settings.sms_help_text)
        return Response(str(twiml), media_type=TWIML)

    @post("/twilio/sms/status", status_code=200, media_type=TWIML)
    async def status(request: Request[Any, Any, Any]) -> Response[str]:
        """Delivery status of one of our messages: queued → sent → delivered / failed."""
        form = await signed_form(request, settings, settings.public_sms_url())
        sid, state = form.get("MessageSid", ""), form.get("MessageStatus", "")
        if not sid or state not in DELIVERY_RANK:
            raise InvalidRequest("MessageSid and a known MessageStatus are required")
        error_code = form.get("ErrorCode") or None
        delivery = await store.delivery_by_provider_id(sid)
        session_type = await store.session_type_of(delivery.conversation_id if delivery else None)
        event = make_event(
            MessageStatus(
                provider_id=sid,
                status=state,
                error_code=error_code,
                turn_id=delivery.turn_id if delivery else None,
            ),
            id=f"evt_delivery_{sid}_{state}",
            occurred_at=utcnow(),
            actor="twilio",
            conversation_id=delivery.conversation_id if delivery else None,
            # Without a session type, webhook fan-out would drop it as if it were a test session.
            session_type=session_type,
        )
        await bus.publish(subjects.event(event.type), _enc.encode(event), msg_id=event.id)
        if delivery is None:
            log.info("status for an unknown message", extra={"provider_id": sid})
        elif DELIVERY_RANK[state] >= DELIVERY_RANK.get(delivery.status, 0):
            await store.put_delivery(
                msgspec.structs.replace(
                    delivery,
                    status=state,
                    error_code=error_code or delivery.error_code,
                    updated_at=utcnow(),
                )
            )
        return Response(NO_REPLY, media_type=TWIML)

    return Litestar(
        route_handlers=[inbound, status, *probe_handlers(service.ready, metrics)],
        lifespan=[lifespan],
        middleware=[trace_requests],
        exception_handlers={Exception: provider_webhook_error},
        state=State({"bus": bus, "store": store}),
        request_max_body_size=MAX_BODY,
        openapi_config=None,
        logging_config=None,
    )


async def run(settings: SmsSettings, stop: asyncio.Event) -> None:
    await serve_until(create_app(settings), settings.host, settings.sms_port, stop, "sms")
