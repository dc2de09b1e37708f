"""Serving ASGI apps inside a service's event loop, and the probes every service exposes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import uvicorn
from litestar import Litestar, MediaType, Request, Response, get
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared import tracing
from shared.errors import RateLimited, SwitchboardError, error_body
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


_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


def trace_requests(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: each request (but probes) runs in a trace — the caller's `traceparent`
    continued, or a new one — so everything it publishes and logs carries the same trace id."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP or scope["path"] in _UNTRACED:
            await app(scope, receive, send)
            return
        parent = next((v.decode() for k, v in scope["headers"] if k == b"traceparent"), None)
        with tracing.traced(f"{scope.get('method', 'HTTP')} {scope['path']}", parent, "server"):
            await app(scope, receive, send)

    return middleware


def probe_app(ready: ReadyCheck, metrics: Metrics) -> Litestar:
    return Litestar(
        route_handlers=probe_handlers(ready, metrics), openapi_config=None, logging_config=None
    )


class _Transport:
    """A connection's transport whose writes are held until the end of the event loop's current
    step. uvicorn writes a response's head when the app starts the response and its body when the
    app sends it: two send() calls, and two TCP segments the client reads apart. Held together they
    are one, for every response whose head and body the app sends in one step (all but streams)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self._flush)
        self._held.append(data)

    def _flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.write(b"".join(held))

    def close(self) -> None:
        self._flush()  # what was written before close is sent, as with the transport itself
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # the rest of the transport's interface, as it is
        return getattr(self._transport, name)


class _OneWritePerResponse(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through `_Transport`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        held = _Transport(cast(asyncio.Transport, transport), asyncio.get_running_loop())
        super().connection_made(cast(asyncio.Transport, held))


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
            http=_OneWritePerResponse,
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


def provider_webhook_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The error answer of a provider's webhook (Twilio): 4xx with a reason for a request we
    refuse; 503 for our own failure, because nothing was acknowledged and the provider retries."""
    if isinstance(exc, SwitchboardError):
        status, code, message, details = exc.status, exc.code, exc.message, exc.details
    elif isinstance(exc, HTTPException):
        status = 422 if exc.status_code == 400 else exc.status_code
        code, message, details = "invalid_request", exc.detail, {}
    else:
        log.exception("webhook failed", extra={"path": request.url.path})
        status, code, message, details = 503, "unavailable", "try again", {}
    if status in (403, 429):
        log.warning("rejected webhook: %s", message, extra={"path": request.url.path})
    body = error_body(code, message, details)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


async def serve_until(app: Litestar, host: str, port: int, stop: asyncio.Event, name: str) -> None:
    """Run an HTTP service until `stop` is set, then shut it down gracefully."""
    server = HttpServer(app, host, port)
    await server.start()
    try:
        await stop.wait()
    finally:
        log.info("%s stopping", name)
        await server.stop()
