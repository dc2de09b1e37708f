"""The one bus wrapper: NATS connection life cycle, JetStream streams, publish, ordered consume.

Delivery is at-least-once. A consumer's handler is called; when it returns the message is acked,
when it raises `Undeliverable` the message goes to the DEAD stream at once, and when it raises
anything else it is redelivered with backoff until `max_deliver`, then dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NoStreamResponseError, ServiceUnavailableError
from redis import exceptions as redis_errors

from shared.envelopes import DeadLetter
from shared.errors import Unavailable
from shared.ids import new_id
from shared.models import utcnow
from shared.subjects import Subjects
from shared.telemetry import Metrics

log = logging.getLogger("switchboard.bus")

DAY = 24 * 3600.0


class Undeliverable(Exception):
    """A message that no retry will fix (undecodable, unknown schema version): dead-letter it now."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Delivery:
    """What a handler sees of one JetStream message."""

    subject: str
    data: bytes
    headers: dict[str, str]
    attempt: int


Handler = Callable[[Delivery], Awaitable[None]]
Backoff = Callable[[int], float]


def short_backoff(attempt: int) -> float:
    """Redelivery delay after `attempt` failures: 0.2 s doubling, capped at 10 s."""
    return float(min(0.2 * 2 ** (attempt - 1), 10.0))


def stream_configs(subjects: Subjects, replicas: int) -> list[StreamConfig]:
    # The duplicate window is how long JetStream itself drops a re-published Nats-Msg-Id; longer
    # provider retry windows are covered by the store's envelope-id dedupe.
    def config(name: str, subject: str, max_age: float) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[subject],
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=max_age,
            duplicate_window=30 * 60.0,
        )

    return [
        config(subjects.inbound_stream, subjects.inbound_all, 7 * DAY),
        config(subjects.outbound_stream, subjects.outbound_all, 7 * DAY),
        config(subjects.events_stream, subjects.events_all, 30 * DAY),
        config(subjects.dead_stream, subjects.dead_all, 30 * DAY),
    ]


# A JetStream publish that failed this way stored nothing.
NOT_STORED = (
    NatsTimeout,
    NoRespondersError,
    NoStreamResponseError,
    ServiceUnavailableError,
    ConnectionClosedError,
)
# Failures of a dependency, not of the message: retried in place, never dead-lettered.
TRANSIENT: tuple[type[BaseException], ...] = (
    Unavailable,
    *NOT_STORED,
    redis_errors.ConnectionError,  # also BusyLoadingError: Valkey replaying its AOF
    redis_errors.TimeoutError,
)


class Bus:
    def __init__(
        self,
        url: str,
        subjects: Subjects,
        *,
        name: str,
        metrics: Metrics | None = None,
        replicas: int = 1,
    ) -> None:
        self.url = url
        self.subjects = subjects
        self.name = name
        self.metrics = metrics
        self.replicas = replicas
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._pull_subs: list[JetStreamContext.PullSubscription] = []
        self._idle: set[asyncio.Task[Any]] = set()  # consumer loops waiting in fetch, no message
        self._stopping = asyncio.Event()

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

    async def ensure_streams(self) -> None:
        """Create or update the four streams. Safe to run from every service at every start."""
        for config in stream_configs(self.subjects, self.replicas):
            try:
                await self.js.add_stream(config)
            except BadRequestError:
                await self.js.update_stream(config)

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
        all_headers = {"Nats-Msg-Id": msg_id}
        if headers:
            all_headers.update(headers)
        try:
            return await self.js.publish(subject, payload, timeout=timeout, headers=all_headers)
        except NOT_STORED as exc:
            # Not stored, so not accepted: callers answer 503 / SMTP 451 and the sender retries.
            raise Unavailable(
                f"the message bus did not store the message ({type(exc).__name__})"
            ) from exc

    async def dead_letter(
        self, source_subject: str, data: bytes, reason: str, deliveries: int
    ) -> None:
        letter = DeadLetter(
            id=new_id("dead"),
            source_subject=source_subject,
            reason=reason,
            deliveries=deliveries,
            failed_at=utcnow(),
            payload=data.decode("utf-8", "replace"),
        )
        source = source_subject.split(".")[-3] if source_subject.count(".") >= 2 else "unknown"
        await self.publish(
            self.subjects.dead(source), msgspec.json.encode(letter), msg_id=letter.id
        )
        if self.metrics:
            self.metrics.dead_letters.labels(reason=reason.split(":")[0]).inc()
        log.error(
            "dead-lettered",
            extra={"subject": source_subject, "reason": reason, "deliveries": deliveries},
        )

    # Consuming --------------------------------------------------------------------------------

    async def consume(
        self,
        *,
        stream: str,
        durable: str,
        filter_subject: str,
        handler: Handler,
        max_ack_pending: int = 1,
        max_deliver: int = 5,
        ack_wait: float = 30.0,
        batch: int = 1,
        workers: int = 1,
        backoff: Backoff = short_backoff,
        before_batch: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run `handler` for every message of a durable pull consumer, in tasks this bus owns.

        `before_batch` runs once after each fetch, before its messages are handled: the place to
        read state every message of the batch needs (all of them were published before it runs).

        `max_ack_pending=1` makes the consumer strictly ordered across every replica bound to the
        same durable: the next message is handed out only after the previous one is acked.
        `workers` > 1 handles that many messages at once (for consumers that need no order).
        """
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            # The server's own cap sits above ours so the last attempt is always ours to dead-letter.
            max_deliver=max_deliver + 1,
        )
        for worker in range(workers):
            # One pull subscription per worker: fetches on a shared one would mix their replies.
            sub = await self.js.pull_subscribe(
                filter_subject, durable=durable, stream=stream, config=config
            )
            self._pull_subs.append(sub)
            task = asyncio.create_task(
                self._pull_loop(sub, handler, batch, max_deliver, backoff, before_batch),
                name=f"consume:{durable}:{worker}",
            )
            self._consumers.append(task)

    async def _pull_loop(
        self,
        sub: JetStreamContext.PullSubscription,
        handler: Handler,
        batch: int,
        max_deliver: int,
        backoff: Backoff,
        before_batch: Callable[[], Awaitable[None]] | None,
    ) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping.is_set():
            self._idle.add(me)
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except NatsTimeout:
                continue
            except asyncio.CancelledError:
                return
            except Exception as exc:  # connection loss: the client reconnects by itself
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            finally:
                self._idle.discard(me)
            if before_batch is not None and msgs and not await self._until_done(before_batch):
                return  # stopping: the batch is redelivered to whoever runs next
            for msg in msgs:
                # Shielded: a shutdown waits for the message in hand to be finished and acked.
                try:
                    await asyncio.shield(self._handle(msg, handler, max_deliver, backoff))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Dead-lettering or acking failed (NATS went away mid-step). The message is
                    # not acked, so it comes back after ack_wait; this consumer carries on.
                    log.warning(
                        "message left for redelivery: %s: %s",
                        type(exc).__name__,
                        exc,
                        extra={"subject": msg.subject},
                    )

    async def _until_done(self, step: Callable[[], Awaitable[None]]) -> bool:
        """Run `step` until it succeeds (a dependency may be down); False if we are stopping."""
        pause = 0.1
        while not self._stopping.is_set():
            try:
                await step()
                return True
            except Exception as exc:
                log.warning("before a batch: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
        return False

    async def _handle(self, msg: Msg, handler: Handler, max_deliver: int, backoff: Backoff) -> None:
        attempt = msg.metadata.num_delivered or 1
        delivery = Delivery(
            subject=msg.subject, data=msg.data, headers=dict(msg.headers or {}), attempt=attempt
        )
        try:
            await self._run_through_outages(msg, handler, delivery)
        except Undeliverable as exc:
            await self._dead_letter_and_ack(msg, exc.reason, attempt)
        except Exception as exc:
            if attempt >= max_deliver:
                await self._dead_letter_and_ack(
                    msg, f"max_deliver: {type(exc).__name__}: {exc}", attempt
                )
            else:
                log.warning(
                    "handler failed, will redeliver",
                    exc_info=True,
                    extra={"subject": msg.subject, "attempt": attempt},
                )
                with contextlib.suppress(Exception):
                    await msg.nak(delay=backoff(attempt))
        else:
            with contextlib.suppress(Exception):  # a lost ack means a redelivery, which dedupes
                await msg.ack()

    async def _run_through_outages(self, msg: Msg, handler: Handler, delivery: Delivery) -> None:
        """Run the handler; while a dependency is down, hold the message and try again.

        An outage of NATS or Valkey says nothing about the message, so it must not use up the
        message's deliveries and send it to DEAD: the consumer keeps it (telling the server it is
        still in progress) and retries until the dependency is back or the service stops. Handlers
        are idempotent, so a retry after a half-done attempt is safe.
        """
        pause = 0.1
        while True:
            try:
                await handler(delivery)
                return
            except TRANSIENT as exc:
                if self._stopping.is_set():
                    raise  # not acked: redelivered to whoever runs next
                log.warning(
                    "dependency unavailable, holding the message: %s: %s",
                    type(exc).__name__,
                    exc,
                    extra={"subject": msg.subject},
                )
                with contextlib.suppress(Exception):
                    await msg.in_progress()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def _dead_letter_and_ack(self, msg: Msg, reason: str, attempt: int) -> None:
        await self.dead_letter(msg.subject, msg.data, reason, attempt)
        await msg.ack()

    # Core NATS request/reply ------------------------------------------------------------------

    async def serve(
        self, subject: str, queue: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> None:
        await self.nc.subscribe(subject, queue=queue, cb=handler)

    async def request(self, subject: str, payload: bytes, timeout: float) -> bytes:
        reply = await self.nc.request(subject, payload, timeout=timeout)
        return reply.data

    async def publish_core(self, subject: str, payload: bytes) -> None:
        """Fire-and-forget core NATS publish: for replies and token streams, never for state."""
        await self.nc.publish(subject, payload)


def decode_or_dead(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    """Decode a bus message; an undecodable one is `Undeliverable`, never retried."""
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Undeliverable(f"undecodable: {exc}") from exc
