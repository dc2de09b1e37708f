"""Egress wiring: the bus, the store, the HTTP and Twilio clients, and one connector per channel
(webhooks, SMS, email, voice), whose consumers the bus runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from services.egress.connector import ChannelContext, Connector
from services.egress.email import EmailSender
from services.egress.outages import FailedDeliveries, Outages
from services.egress.sms import SmsSender
from services.egress.voice import VoiceSpeaker
from services.egress.webhooks import Webhooks
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
        self.connectors: list[Connector] = [self.webhooks, self.sms, self.email, self.voice]

    async def start(self) -> None:
        # Pushed first, so closed last: after the bus has drained the deliveries in flight.
        self._opened.push_async_callback(self.close_clients)
        await self._opened.enter_async_context(self.service.opened())
        egress = ChannelContext(self.subjects, self.settings, on_dead=self.failed.mark)
        for connector in self.connectors:
            for consumer in connector.consumers(egress):
                await consumer.start(self.bus)
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
