"""Serving ASGI apps inside a service's event loop, and the probes every service exposes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from litestar import Litestar, MediaType, Response, get
from litestar.handlers import HTTPRouteHandler

from shared.telemetry import Metrics

log = logging.getLogger("switchboard.http")

ReadyCheck = Callable[[], Awaitable[dict[str, bool]]]


def probe_handlers(ready: ReadyCheck, metrics: Metrics) -> list[HTTPRouteHandler]:
    """`/healthz` (the process answers), `/readyz` (its dependencies answer), `/metrics`."""

    @get("/healthz", media_type=MediaType.JSON, include_in_schema=False, opt={"public": True})
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "service": metrics.service}

    @get("/readyz", include_in_schema=False, opt={"public": True})
    async def readyz() -> Response[dict[str, object]]:
        checks = await ready()
        ok = all(checks.values())
        return Response({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @get("/metrics", include_in_schema=False, opt={"public": True})
    async def prometheus() -> Response[bytes]:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return [healthz, readyz, prometheus]


def probe_app(ready: ReadyCheck, metrics: Metrics) -> Litestar:
    return Litestar(
        route_handlers=probe_handlers(ready, metrics), openapi_config=None, logging_config=None
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM and stops us in order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """uvicorn running in the current loop, owned by the service that started it."""

    def __init__(self, app: Litestar, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            loop="none",
            http="httptools",
            timeout_graceful_shutdown=10,
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None
        self.host, self.port = host, port

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(
            self.server.serve(sockets=[sock]), name=f"http:{self.port}"
        )
        while not self.server.started:
            if self._task.done():
                self._task.result()  # re-raise why it could not start
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
