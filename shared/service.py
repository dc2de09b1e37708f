"""The skeleton every service stands on: its metrics, subjects, bus, store and probes, opened in one
order and closed in the reverse one.

    service = Service("core", settings, probes_port=settings.core_health_port)
    async with service.opened():      # probes, then bus (connected, streams ensured)
        ...                           # consumers, servers: what the service itself does
                                      # closed: bus (drains in-flight handlers), store, probes

HTTP services serve the probes on their own app (`probe_handlers(service.ready, service.metrics)`)
and pass no `probes_port`; the others get a small side server for them. The bus closes before the
store because draining runs handlers that still write to the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from shared.bus import Bus
from shared.http import HttpServer, probe_app
from shared.settings import CommonSettings
from shared.store import Store
from shared.telemetry import Metrics


class Service:
    def __init__(
        self,
        name: str,
        settings: CommonSettings,
        *,
        probes_port: int | None = None,
        checks: dict[str, Callable[[], bool]] | None = None,
    ) -> None:
        self.name = name
        self.metrics = Metrics(name)
        self.bus = Bus.of(settings, f"switchboard-{name}", self.metrics)
        self.subjects = self.bus.subjects
        self.store = Store(settings.redis_url, settings.namespace)
        self._checks = checks or {}
        self.probes = (
            HttpServer(probe_app(self.ready, self.metrics), settings.host, probes_port)
            if probes_port is not None
            else None
        )

    @property
    def probes_port(self) -> int | None:
        """The side port the probes listen on (the real one once opened, when 0 was asked for)."""
        return self.probes.port if self.probes is not None else None

    async def ready(self) -> dict[str, bool]:
        """What `/readyz` reports: NATS and Valkey answer, plus the service's own checks."""
        checks = {"nats": self.bus.ready, "redis": await self.store.ping()}
        return checks | {name: check() for name, check in self._checks.items()}

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[Service]:
        async with contextlib.AsyncExitStack() as stack:
            if self.probes is not None:
                await self.probes.start()
                stack.push_async_callback(self.probes.stop)
            stack.push_async_callback(self.store.close)
            stack.push_async_callback(self.bus.close)
            await self.bus.connect()
            await self.bus.ensure_streams()
            yield self
