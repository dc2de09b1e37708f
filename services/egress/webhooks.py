"""Customer webhooks: at-least-once, signed, retried with backoff, every attempt logged.

Two steps, both durable: each event of a `live` session becomes one job per subscription that
wants it (`gw.out.webhook`, Nats-Msg-Id = event + subscription, so a re-run fans out nothing
twice); each job is POSTed until the receiver answers 2xx. A receiver that fails is in an outage:
the job is held and retried with growing delays up to the webhook retry horizon (then DEAD), and
the log says once that the endpoint is failing, with the reason, and once that it recovered.

Receivers verify `X-Switchboard-Signature: v1=<hex>` = HMAC-SHA256(secret, "<timestamp>." + body)
with `X-Switchboard-Timestamp`, and dedupe on `X-Switchboard-Event-Id`.
"""

from __future__ import annotations

import logging

import httpx
import msgspec

from services.egress.connector import ChannelContext, Consumer
from services.egress.outages import Outages
from shared.bus import Bus, Delivery, ProviderUnavailable, decode_or_dead
from shared.envelopes import Event
from shared.errors import NotFound
from shared.models import WebhookDelivery, WebhookSubscription, utcnow
from shared.signing import signature_headers
from shared.store import Store

log = logging.getLogger("switchboard.egress.webhooks")
_event = msgspec.json.Decoder(Event)


class WebhookJob(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    subscription_id: str
    event_id: str
    event_type: str
    body: str  # the event exactly as it is signed and sent


_job = msgspec.json.Decoder(WebhookJob)


class Webhooks:
    def __init__(self, bus: Bus, store: Store, http: httpx.AsyncClient, outages: Outages) -> None:
        self.bus = bus
        self.store = store
        self.http = http
        self.outages = outages
        self._subscriptions: list[WebhookSubscription] = []

    def consumers(self, egress: ChannelContext) -> list[Consumer]:
        settings, subjects = egress.settings, egress.subjects

        def backoff(attempt: int) -> float:
            return float(min(settings.webhook_backoff_seconds * 2 ** (attempt - 1), 600.0))

        return [
            Consumer(
                stream=subjects.events_stream,
                durable="egress-webhook-fanout",
                filter_subject=subjects.events_all,
                handler=self.fan_out,
                max_ack_pending=256,
                batch=64,  # unordered: under load one fetch brings many events
                before_batch=self.load_subscriptions,
            ),
            Consumer(
                stream=subjects.outbound_stream,
                durable="egress-webhook",
                filter_subject=subjects.outbound("webhook"),
                handler=self.deliver,
                max_ack_pending=256,
                workers=settings.webhook_workers,
                max_deliver=settings.webhook_max_attempts,
                backoff=backoff,
                ack_wait=settings.webhook_timeout_seconds + 20,
                hold=egress.hold(
                    settings.webhook_retry_horizon_seconds, settings.webhook_backoff_seconds
                ),
            ),
        ]

    async def load_subscriptions(self) -> None:
        """Read the subscriptions once per fetched batch of events. Every event in the batch was
        published before this read, so a subscription created before an event is always seen."""
        self._subscriptions = await self.store.list_webhooks()

    async def fan_out(self, delivery: Delivery) -> None:
        event = decode_or_dead(_event, delivery.data)
        if event.session_type != "live":
            return  # test and simulation sessions never fire webhooks
        for sub in self._subscriptions:
            if not sub.wants(event.type):
                continue
            job = WebhookJob(
                id=f"whj_{event.id}_{sub.id}",
                subscription_id=sub.id,
                event_id=event.id,
                event_type=event.type,
                body=delivery.data.decode(),
            )
            await self.bus.publish(
                self.bus.subjects.outbound("webhook"), msgspec.json.encode(job), msg_id=job.id
            )

    async def deliver(self, delivery: Delivery) -> None:
        job = decode_or_dead(_job, delivery.data)
        try:
            sub = await self.store.get_webhook(job.subscription_id)
        except NotFound:
            return  # the subscription was deleted meanwhile
        body = job.body.encode()
        headers = {
            "content-type": "application/json",
            "user-agent": "Switchboard-Webhooks/1",
            "x-switchboard-event-id": job.event_id,
            "x-switchboard-event-type": job.event_type,
            "x-switchboard-delivery-attempt": str(delivery.attempt),
            **signature_headers(sub.secret, body),
        }
        status: int | None = None
        error: str | None = None
        try:
            response = await self.http.post(sub.url, content=body, headers=headers)
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        await self.store.log_delivery(
            sub.id,
            WebhookDelivery(
                event_id=job.event_id,
                event_type=job.event_type,
                attempt=delivery.attempt,
                ok=error is None,
                status_code=status,
                error=error,
                at=utcnow(),
            ),
        )
        endpoint = f"webhook {sub.id}"
        if error is not None:
            self.outages.failed(endpoint, error)
            raise ProviderUnavailable(endpoint, error)
        self.outages.recovered(endpoint)
