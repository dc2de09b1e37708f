"""The one bus wrapper: NATS connection life cycle, JetStream streams, publish, ordered consume.

Delivery is at-least-once. A consumer's handler is called; when it returns the message is acked,
when it raises `Undeliverable` the message goes to the DEAD stream at once, and when it raises
anything else it is redelivered with backoff until `max_deliver`, then dead-lettered with the reason.

Two kinds of outage are not the message's fault and never spend its deliveries:
- NATS or Valkey down (`TRANSIENT`): the consumer keeps the message in hand and retries in place.
- A provider down (`ProviderUnavailable`: the SMTP relay, Twilio 5xx/429, a customer's endpoint):
  on a consumer with a `Hold`, the message is nak'd with a jittered exponential delay (the
  consumer's `max_deliver` is unlimited, so nothing is spent) until it is `Hold.horizon` seconds
  old, counted from when JetStream stored it (durable: no state of ours). Past the horizon it is
  dead-lettered like any other failure. `max_ack_pending=1` consumers keep their order: a nak'd
  message stays pending, so nothing behind it overtakes it. Other failures of a held message are
  counted by this process against `max_deliver` (JetStream's count includes the outage).

Before any dead letter, the consumer's `on_dead` hook runs (egress marks the delivery `failed`
and raises `delivery.failed`). Dead letters can be listed and replayed (`dead_letters`, `replay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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
    StreamConfig,
)
from nats.js.errors import (
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from redis import exceptions as redis_errors

from shared import tracing
from shared.envelopes import DeadLetter, DeadLetterReplay
from shared.errors import Unavailable
from shared.errors import Undeliverable as Undeliverable  # re-exported: consumers raise it
from shared.ids import new_id
from shared.models import utcnow
from shared.streams import StreamLimits, ensure_streams, stream_configs
from shared.subjects import Subjects
from shared.telemetry import Metrics

T = TypeVar("T")

log = logging.getLogger("switchboard.bus")

DAY = 24 * 3600.0
_dead_letter = msgspec.json.Decoder(DeadLetter)
_replay = msgspec.json.Decoder(DeadLetterReplay)


class ProviderUnavailable(Exception):
    """The provider behind a consumer (SMTP relay, Twilio, a customer's endpoint) cannot take the
    message now (unreachable, 5xx, 429, SMTP 4xx). Nothing is wrong with the message: a consumer
    with a `Hold` keeps it and tries again later, until the horizon."""

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


@dataclass(frozen=True)
class Delivery:
    """What a handler sees of one JetStream message."""

    subject: str
    data: bytes
    headers: dict[str, str]
    attempt: int
    stored_at: float = 0.0  # Unix seconds: when JetStream stored the message


Handler = Callable[[Delivery], Awaitable[None]]
Backoff = Callable[[int], float]
DeadHook = Callable[[Delivery, str], Awaitable[None]]


@dataclass(frozen=True)
class Hold:
    """How a consumer rides out a provider outage: delays from `base_delay` doubling per delivery,
    capped at `max_delay`, with jitter (×0.5–1, so held messages do not return in one burst),
    until the message is `horizon` seconds old."""

    horizon: float
    base_delay: float = 1.0
    max_delay: float = 300.0

    def delay(self, attempt: int, age: float) -> float:
        raw = min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 40))
        return max(0.0, min(raw * random.uniform(0.5, 1.0), self.horizon - age))


@dataclass(frozen=True)
class DeadLetterEntry:
    """A dead letter as the DEAD stream holds it, and its replay if it had one."""

    seq: int
    letter: DeadLetter
    replay: DeadLetterReplay | None


@dataclass(frozen=True)
class _Policy:
    max_deliver: int
    backoff: Backoff
    hold: Hold | None
    on_dead: DeadHook | None


def short_backoff(attempt: int) -> float:
    """Redelivery delay after `attempt` failures: 0.2 s doubling, capped at 10 s."""
    return float(min(0.2 * 2 ** (attempt - 1), 10.0))


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
            extra={
                "subject": source_subject,
                "reason": reason,
                "deliveries": deliveries,
                "dead_letter_id": letter.id,
                "console": f"dead letter {letter.id} from {source_subject}: {reason[:200]}",
            },
        )

    # Dead letters: list and replay ------------------------------------------------------------

    async def dead_letters(self, *, after_seq: int = 0, limit: int = 50) -> list[DeadLetterEntry]:
        """Dead letters in the order they died, from stream sequence `after_seq` + 1 on."""
        entries: list[DeadLetterEntry] = []
        seq = after_seq + 1
        while len(entries) < limit:
            try:
                raw = await self.js.get_msg(
                    self.subjects.dead_stream, seq, subject=self.subjects.dead("*"), next=True
                )
            except NotFoundError:
                break
            assert raw.seq is not None
            seq = raw.seq + 1
            try:
                letter = _dead_letter.decode(raw.data or b"")
            except msgspec.DecodeError:
                continue  # not ours: nothing to show or replay
            entries.append(DeadLetterEntry(raw.seq, letter, await self._replay_of(letter.id)))
        return entries

    async def dead_letter_by_id(self, letter_id: str) -> DeadLetterEntry | None:
        after = 0
        while page := await self.dead_letters(after_seq=after, limit=200):
            for entry in page:
                if entry.letter.id == letter_id:
                    return entry
            after = page[-1].seq
        return None

    async def replay(self, entry: DeadLetterEntry) -> DeadLetterReplay:
        """Put a dead letter back on the subject it died on; a second replay changes nothing.

        The republished message carries `Nats-Msg-Id` = `replay_<letter id>` (JetStream drops a
        repeat inside its duplicate window) and a durable marker on `gw.dead.replayed.<id>` says
        it was replayed (so a later replay is refused). Consumers dedupe on the envelope id
        inside (core's turn dedupe, egress's delivery record), so a replay of something that had
        in fact been applied never doubles a turn or a reply.
        """
        letter = entry.letter
        done = entry.replay or await self._replay_of(letter.id)
        if done is not None:
            return done
        await self.publish(
            letter.source_subject,
            letter.payload.encode(),
            msg_id=f"replay_{letter.id}",
            headers={"Switchboard-Replay-Of": letter.id},
        )
        replay = DeadLetterReplay(letter_id=letter.id, replayed_at=utcnow())
        ack = await self.publish(
            self._replay_subject(letter.id),
            msgspec.json.encode(replay),
            msg_id=f"replayed_{letter.id}",
        )
        if ack.duplicate:  # a concurrent replay got there first: its marker is the one
            return await self._replay_of(letter.id) or replay
        log.info(
            "dead letter replayed",
            extra={
                "dead_letter_id": letter.id,
                "subject": letter.source_subject,
                "console": f"dead letter {letter.id} replayed onto {letter.source_subject}",
            },
        )
        return replay

    async def replay_all(self) -> tuple[int, int]:
        """Replay every dead letter not yet replayed: (replayed now, replayed before)."""
        replayed = before = 0
        after = 0
        while page := await self.dead_letters(after_seq=after, limit=200):
            for entry in page:
                if entry.replay is not None:
                    before += 1
                else:
                    await self.replay(entry)
                    replayed += 1
            after = page[-1].seq
        return replayed, before

    def _replay_subject(self, letter_id: str) -> str:
        return self.subjects.dead(f"replayed.{letter_id}")

    async def _replay_of(self, letter_id: str) -> DeadLetterReplay | None:
        try:
            raw = await self.js.get_last_msg(
                self.subjects.dead_stream, self._replay_subject(letter_id)
            )
        except NotFoundError:
            return None
        return _replay.decode(raw.data or b"")

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
        hold: Hold | None = None,
        on_dead: DeadHook | None = None,
    ) -> None:
        """Run `handler` for every message of a durable pull consumer, in tasks this bus owns.

        `before_batch` runs once after each fetch, before its messages are handled: the place to
        read state every message of the batch needs (all of them were published before it runs).

        `max_ack_pending=1` makes the consumer strictly ordered across every replica bound to the
        same durable: the next message is handed out only after the previous one is acked.
        `workers` > 1 handles that many messages at once (for consumers that need no order).
        `hold` holds messages through provider outages (see the module docstring); `on_dead` runs
        before a message of this consumer is dead-lettered, with the reason.
        """
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            # The server's own cap sits above ours so the last attempt is always ours to dead-letter;
            # a holding consumer has none: an outage may take any number of deliveries.
            max_deliver=-1 if hold is not None else max_deliver + 1,
        )
        policy = _Policy(max_deliver, backoff, hold, on_dead)
        with contextlib.suppress(Exception):
            # Create, or update a durable made by an older version (pull_subscribe only creates).
            await self.js.add_consumer(stream, config)
        for worker in range(workers):
            # One pull subscription per worker: fetches on a shared one would mix their replies.
            sub = await self.js.pull_subscribe(
                filter_subject, durable=durable, stream=stream, config=config
            )
            self._pull_subs.append(sub)
            task = asyncio.create_task(
                self._pull_loop(sub, handler, batch, policy, before_batch),
                name=f"consume:{durable}:{worker}",
            )
            self._consumers.append(task)

    async def _pull_loop(
        self,
        sub: JetStreamContext.PullSubscription,
        handler: Handler,
        batch: int,
        policy: _Policy,
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
                    await asyncio.shield(self._handle(msg, handler, policy))
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

    async def _handle(self, msg: Msg, handler: Handler, policy: _Policy) -> None:
        with tracing.traced(f"consume {msg.subject}", msg.headers or {}):
            await self._handle_traced(msg, handler, policy)

    async def _handle_traced(self, msg: Msg, handler: Handler, policy: _Policy) -> None:
        attempt = msg.metadata.num_delivered or 1
        stamp = msg.metadata.timestamp
        delivery = Delivery(
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            attempt=attempt,
            stored_at=stamp.timestamp() if stamp else time.time(),
        )
        try:
            await self._run_through_outages(msg, handler, delivery)
        except Undeliverable as exc:
            await self._dead_letter_and_ack(msg, delivery, exc.reason, policy)
        except ProviderUnavailable as exc:
            if policy.hold is None:
                await self._failed(msg, delivery, exc, policy)
                return
            age = time.time() - delivery.stored_at
            if age >= policy.hold.horizon:
                reason = f"gave_up: {exc} (held {age:.0f}s over {attempt} deliveries)"
                await self._dead_letter_and_ack(msg, delivery, reason, policy)
                return
            delay = policy.hold.delay(attempt, age)
            log.debug(
                "provider unavailable, holding the message",
                extra={"subject": msg.subject, "attempt": attempt, "delay": round(delay, 2)},
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=delay)
        except Exception as exc:
            await self._failed(msg, delivery, exc, policy)
        else:
            self._failures.pop(_message_key(msg), None)
            with contextlib.suppress(Exception):  # a lost ack means a redelivery, which dedupes
                await msg.ack()

    async def _failed(self, msg: Msg, delivery: Delivery, exc: Exception, policy: _Policy) -> None:
        """A failure that may be the message's own: retried with backoff, up to `max_deliver`.

        On a holding consumer the failures are counted by this process (a restart or another
        replica starts again from zero: more tries, never fewer), so that the redeliveries of an
        earlier outage do not count against the message."""
        failures = delivery.attempt
        if policy.hold is not None:
            key = _message_key(msg)
            failures = self._failures[key] = self._failures.get(key, 0) + 1
        if failures >= policy.max_deliver:
            reason = f"max_deliver: {type(exc).__name__}: {exc}"
            await self._dead_letter_and_ack(msg, delivery, reason, policy)
            return
        log.warning(
            "handler failed, will redeliver",
            exc_info=True,
            extra={"subject": msg.subject, "attempt": delivery.attempt, "failures": failures},
        )
        with contextlib.suppress(Exception):
            await msg.nak(delay=policy.backoff(failures))

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

    async def _dead_letter_and_ack(
        self, msg: Msg, delivery: Delivery, reason: str, policy: _Policy
    ) -> None:
        if policy.on_dead is not None:
            await policy.on_dead(delivery, reason)
        await self.dead_letter(msg.subject, msg.data, reason, delivery.attempt)
        self._failures.pop(_message_key(msg), None)
        await msg.ack()

    # Core NATS request/reply ------------------------------------------------------------------

    async def serve(
        self, subject: str, queue: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> None:
        async def traced_handler(msg: Msg) -> None:
            with tracing.traced(f"serve {msg.subject}", msg.headers or {}):
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


def _message_key(msg: Msg) -> tuple[str, str, int]:
    meta = msg.metadata
    return (meta.stream, meta.consumer or "", meta.sequence.stream)


def decode_or_dead(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    """Decode a bus message; an undecodable one is `Undeliverable`, never retried."""
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise Undeliverable(f"undecodable: {exc}") from exc
