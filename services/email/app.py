"""The email service: aiosmtpd on the SMTP port, probes and metrics on a side port."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiosmtpd.smtp import SMTP

from services.email.handler import InboundMail
from shared.service import Service
from shared.settings import EmailSettings

log = logging.getLogger("switchboard.email")


class EmailService:
    def __init__(self, settings: EmailSettings) -> None:
        self.settings = settings
        self.service = Service(
            "email",
            settings,
            probes_port=settings.email_health_port,
            checks={"smtp": lambda: self._server is not None and self._server.is_serving()},
        )
        self.metrics, self.bus, self.store = (
            self.service.metrics,
            self.service.bus,
            self.service.store,
        )
        self.handler = InboundMail(settings, self.bus, self.store)
        self._server: asyncio.Server | None = None
        self._opened = contextlib.AsyncExitStack()
        self.port = settings.smtp_port

    async def start(self) -> None:
        await self._opened.enter_async_context(self.service.opened())
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
        await self._opened.aclose()


async def run(settings: EmailSettings, stop: asyncio.Event) -> None:
    service = EmailService(settings)
    await service.start()
    try:
        await stop.wait()
    finally:
        log.info("email stopping")
        await service.stop()
