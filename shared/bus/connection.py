"""The NATS connection life cycle, JetStream streams, durable publish, core NATS request/reply
and awaiting replies (`listen`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self, TypeVar

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    PubAck,
    StreamConfig,
)

from shared import tracing
from shared.bus.types import NOT_STORED
from shared.errors import Unavailable
from shared.settings import CommonSettings
from shared.streams import StreamLimits, ensure_streams, stream_configs
from shared.subjects import Subjects
from shared.telemetry import Metrics

T = TypeVar("T")

log = logging.getLogger("switchboard.bus")


class BusConnection:
    """The NATS connection, the streams, publishing, and core NATS request/reply."""

    def __init__(
        self,
        url: str,
        subjects: Subjects,
        *,
        name: str,
        metrics: Metrics | None = None,
        replicas: int = 1,
        limits: StreamLimits | None = None,
    ) -> None:
        self.url = url
        self.subjects = subjects
        self.name = name
        self.metrics = metrics
        self.replicas = replicas
        self.limits = limits or StreamLimits()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._pull_subs: list[JetStreamContext.PullSubscription] = []
        self._idle: set[asyncio.Task[Any]] = set()  # consumer loops waiting in fetch, no message
        # Holding consumers: unexpected failures per message (stream sequence), counted here
        # because JetStream's delivery count also counts an outage's redeliveries.
        self._failures: dict[tuple[str, str, int], int] = {}
        self._stopping = asyncio.Event()

    @classmethod
    def of(cls, settings: CommonSettings, name: str, metrics: Metrics | None = None) -> Self:
        """The bus a process opens from its settings: NATS_URL, namespace and partitions, stream
        replicas and limits (ensure_streams must not undo the configured limits)."""
        return cls(
            settings.nats_url,
            Subjects(settings.namespace, settings.partitions),
            name=name,
            metrics=metrics,
            replicas=settings.stream_replicas,
            limits=StreamLimits.of(settings),
        )

    # Life cycle -------------------------------------------------------------------------------

    async def connect(self, *, connect_timeout: float = 5.0) -> None:
        async def disconnected() -> None:
            log.warning("nats disconnected", extra={"service": self.name})

        async def reconnected() -> None:
            log.info("nats reconnected", extra={"service": self.name})

        async def error(exc: Exception) -> None:
            log.warning("nats error: %s", exc, extra={"service": self.name})

        self._nc = await nats.connect(
            # NATS_URL may list every cluster member: "nats://a:4222,nats://b:4222".
            [u.strip() for u in self.url.split(",") if u.strip()],
            name=self.name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        self._js = self._nc.jetstream()

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("bus not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("bus not connected")
        return self._js

    @property
    def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def stream_configs(self) -> list[StreamConfig]:
        return stream_configs(self.subjects, self.replicas, self.limits)

    async def ensure_streams(self) -> None:
        """Create or update the four streams. Safe to run from every service at every start."""
        await ensure_streams(self.js, self.stream_configs())

    async def close(self, grace: float = 30.0) -> None:
        """Stop consumers after their in-flight message, then drain the connection."""
        self._stopping.set()
        # Loops idle in fetch stop at once; a loop holding a message finishes and acks it first.
        for task in list(self._idle):
            task.cancel()
        if self._consumers:
            # A handler gets `grace` seconds to finish its message; past that it is cancelled
            # unacked, and JetStream redelivers the message to the next consumer.
            _, late = await asyncio.wait(self._consumers, timeout=grace)
            for task in late:
                log.warning(
                    "consumer did not finish in time; cancelling", extra={"task": task.get_name()}
                )
                task.cancel()
            await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers.clear()
        for sub in self._pull_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._pull_subs.clear()
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        self._nc = None
        self._js = None

    # Publishing -------------------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish durably; returns once JetStream has stored it. `msg_id` makes re-publishing a no-op."""
        # The trace of the message being handled (or received) rides along: W3C traceparent.
        all_headers = {"Nats-Msg-Id": msg_id, **tracing.headers()}
        if headers:
            all_headers.update(headers)
        try:
            return await self.js.publish(subject, payload, timeout=timeout, headers=all_headers)
        except NOT_STORED as exc:
            # Not stored, so not accepted: callers answer 503 / SMTP 451 and the sender retries.
            raise Unavailable(
                f"the message bus did not store the message ({type(exc).__name__})"
            ) from exc

    # Core NATS request/reply ------------------------------------------------------------------

    async def serve(
        self, subject: str, queue: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> None:
        async def traced_handler(msg: Msg) -> None:
            with tracing.traced(f"serve {msg.subject}", msg.headers or {}, "server"):
                await handler(msg)

        await self.nc.subscribe(subject, queue=queue, cb=traced_handler)

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        reply = await self.nc.request(
            subject, payload, timeout=timeout, headers=tracing.headers() or None
        )
        return reply.data

    @contextlib.asynccontextmanager
    async def listen(
        self, subject: str, accept: Callable[[Msg], T | None]
    ) -> AsyncIterator[asyncio.Queue[T]]:
        """Await replies: core NATS messages on `subject` while the block runs, each passed through
        `accept` (None drops it: someone else's reply), queued in arrival order. Enter it before
        publishing the request, on this connection, so the reply cannot overtake the subscription.
        """
        queue: asyncio.Queue[T] = asyncio.Queue()

        async def on_message(msg: Msg) -> None:
            if (item := accept(msg)) is not None:
                queue.put_nowait(item)

        sub = await self.nc.subscribe(subject, cb=on_message)
        try:
            yield queue
        finally:
            await sub.unsubscribe()

    async def publish_core(self, subject: str, payload: bytes) -> None:
        """Fire-and-forget core NATS publish: for replies and token streams, never for state."""
        await self.nc.publish(subject, payload, headers=tracing.headers() or None)
