"""Egress wiring: the bus, the store, an HTTP client, one worker per kind of delivery."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from services.egress.email import EmailSender
from services.egress.outages import FailedDeliveries, Outages
from services.egress.sms import SmsSender
from services.egress.voice import VoiceSpeaker
from services.egress.webhooks import Webhooks
from shared.bus import Hold
from shared.service import Service
from shared.settings import EgressSettings
from shared.twilio import rest_client

log = logging.getLogger("switchboard.egress")


class Egress:
    def __init__(self, settings: EgressSettings) -> None:
        self.settings = settings
        self.service = Service("egress", settings, probes_port=settings.egress_health_port)
        self.metrics, self.subjects = self.service.metrics, self.service.subjects
        self.bus, self.store = self.service.bus, self.service.store
        self._opened = contextlib.AsyncExitStack()
        self.http_client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_seconds, follow_redirects=False
        )
        self.outages = Outages(self.metrics)
        self.failed = FailedDeliveries(self.bus, self.store)
        self.webhooks = Webhooks(self.bus, self.store, self.http_client, self.outages)
        self.twilio, self.twilio_http = rest_client(settings)
        self.sms = SmsSender(settings, self.store, self.twilio, self.outages)
        self.email = EmailSender(settings, self.store, self.outages)
        self.voice = VoiceSpeaker(settings, self.store, self.twilio)

    def webhook_backoff(self, attempt: int) -> float:
        return float(min(self.settings.webhook_backoff_seconds * 2 ** (attempt - 1), 600.0))

    def hold(self, horizon: float, base: float | None = None) -> Hold:
        """How a channel's consumer holds its messages through a provider outage."""
        return Hold(
            horizon=horizon,
            base_delay=self.settings.egress_retry_base_seconds if base is None else base,
            max_delay=self.settings.egress_retry_max_delay_seconds,
        )

    async def start(self) -> None:
        # Pushed first, so closed last: after the bus has drained the deliveries in flight.
        self._opened.push_async_callback(self.close_clients)
        await self._opened.enter_async_context(self.service.opened())
        await self.bus.consume(
            stream=self.subjects.events_stream,
            durable="egress-webhook-fanout",
            filter_subject=self.subjects.events_all,
            handler=self.webhooks.fan_out,
            max_ack_pending=256,
            batch=64,  # unordered: under load one fetch brings many events
            before_batch=self.webhooks.load_subscriptions,
        )
        await self.bus.consume(
            stream=self.subjects.outbound_stream,
            durable="egress-webhook",
            filter_subject=self.subjects.outbound("webhook"),
            handler=self.webhooks.deliver,
            max_ack_pending=256,
            workers=self.settings.webhook_workers,
            max_deliver=self.settings.webhook_max_attempts,
            backoff=self.webhook_backoff,
            ack_wait=self.settings.webhook_timeout_seconds + 20,
            hold=self.hold(
                self.settings.webhook_retry_horizon_seconds, self.settings.webhook_backoff_seconds
            ),
        )
        for partition in range(self.settings.partitions):
            await self.bus.consume(
                stream=self.subjects.outbound_stream,
                durable=f"egress-sms-p{partition}",
                filter_subject=self.subjects.outbound_partition("sms", partition),
                handler=self.sms.deliver,
                max_ack_pending=1,
                max_deliver=self.settings.sms_max_attempts,
                ack_wait=self.settings.twilio_timeout_seconds * 3 + 10,
                hold=self.hold(self.settings.sms_retry_horizon_seconds),
                on_dead=self.failed.mark,
            )
        await self.bus.consume(
            stream=self.subjects.outbound_stream,
            durable="egress-email",
            filter_subject=self.subjects.outbound("email") + ".*",
            handler=self.email.deliver,
            max_ack_pending=1,
            max_deliver=self.settings.email_max_attempts,
            ack_wait=self.settings.smtp_relay_timeout_seconds * 2 + 10,
            hold=self.hold(self.settings.email_retry_horizon_seconds),
            on_dead=self.failed.mark,
        )
        await self.bus.consume(
            stream=self.subjects.outbound_stream,
            durable="egress-voice",
            filter_subject=self.subjects.outbound("voice") + ".*",
            handler=self.voice.deliver,
            max_ack_pending=64,
            workers=4,
            max_deliver=6,
            backoff=self.voice.head_start,
        )
        log.info("egress ready", extra={"health_port": self.service.probes_port})

    async def stop(self) -> None:
        await self._opened.aclose()

    async def close_clients(self) -> None:
        await self.http_client.aclose()
        await self.twilio_http.close()
        await self.email.close()


async def run(settings: EgressSettings, stop: asyncio.Event) -> None:
    egress = Egress(settings)
    await egress.start()
    try:
        await stop.wait()
    finally:
        log.info("egress stopping: finishing in-flight deliveries")
        await egress.stop()
