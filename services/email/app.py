"""The email service: aiosmtpd on the SMTP port, probes and metrics on a side port."""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import SMTP

from services.email.handler import InboundMail
from shared.bus import Bus
from shared.http import HttpServer, probe_app
from shared.settings import EmailSettings
from shared.store import Store
from shared.subjects import Subjects
from shared.telemetry import Metrics

log = logging.getLogger("switchboard.email")


class EmailService:
    def __init__(self, settings: EmailSettings) -> None:
        self.settings = settings
        self.metrics = Metrics("email")
        self.bus = Bus(
            settings.nats_url,
            Subjects(settings.namespace, settings.partitions),
            name="switchboard-email",
            replicas=settings.stream_replicas,
            metrics=self.metrics,
        )
        self.store = Store(settings.redis_url, settings.namespace)
        self.handler = InboundMail(settings, self.bus, self.store)
        self.http = HttpServer(
            probe_app(self.ready, self.metrics), settings.host, settings.email_health_port
        )
        self._server: asyncio.Server | None = None
        self.port = settings.smtp_port

    async def ready(self) -> dict[str, bool]:
        return {
            "nats": self.bus.ready,
            "redis": await self.store.ping(),
            "smtp": self._server is not None and self._server.is_serving(),
        }

    async def start(self) -> None:
        await self.http.start()
        await self.bus.connect()
        await self.bus.ensure_streams()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(
                self.handler,
                data_size_limit=self.settings.email_max_bytes,
                enable_SMTPUTF8=True,
                hostname=self.settings.domains()[0],
                ident="Switchboard ESMTP",
                timeout=60,
                loop=loop,
            ),
            host=self.settings.host,
            port=self.settings.smtp_port,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("email ready", extra={"smtp_port": self.port, "domains": self.settings.domains()})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.bus.close()
        await self.store.close()
        await self.http.stop()


async def run(settings: EmailSettings, stop: asyncio.Event) -> None:
    service = EmailService(settings)
    await service.start()
    try:
        await stop.wait()
    finally:
        log.info("email stopping")
        await service.stop()
