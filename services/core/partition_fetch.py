"""The fetch loop of core's partition consumer: what it takes from JetStream, and in what order.

Its share of the delivery contract (the whole contract is in `partitions`):

- **One owner, inside the lease.** It pulls from the durable consumer `core-p<p>` only while
  this replica holds the partition's lease: every pull request expires at least `FETCH_MARGIN`
  before the lease could run out, and nothing delivered is handed on once fewer than that remain. Up to `in_flight` messages are in our
  hands at once (the consumer's `max_ack_pending`); when they are, it waits for room.
- **Take-over waits for everything pending.** Before anything is applied, every message still
  pending on the consumer (the previous owner's unacked messages, redelivered when their ack
  wait runs out or at once if it nak'd them) is fetched into our hands; then what we hold is
  queued in stream order. So a conversation's message 2 is never applied before a message 1
  that a crashed owner held but had not finished.
- **A lost delivery holds the partition.** A delivery lost in flight (the connection or a NATS
  node went away between the server sending it and us reading it) shows as a gap in the
  consumer's delivery sequence: the loop goes back to take-over waiting until it is back (after
  its ack wait), then queues everything pending in stream order.
- **Redelivery of a message we hold is not a second message.** It is recognised by its stream
  sequence; we keep one and answer on the newest delivery.
- **One pull request open at a time.** A request asks for up to the room we have and expires
  inside the lease; it keeps delivering as messages arrive, and the next is sent once it has
  expired or delivered its batch. A steady flow of turns costs about one request per partition
  per `fetch_timeout`, not one or two per fetch (a no-wait probe and a long poll each time, as
  the client library's `fetch` does) — every request is work for core and for nats-server.
  What it still delivers once we stop fetching (a hand-back, the lease running out) is nak'd
  when we let go, so the next owner gets it at once instead of after its ack wait.

What happens to a message once it is in our hands (the queue per conversation, acking, retries,
dead letters, winding down) is the subclass's: `PartitionConsumer` in `partitions`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared.bus import Bus, Undeliverable, decode_or_dead
from shared.envelopes import SCHEMA_VERSION, InboundEnvelope

log = logging.getLogger("switchboard.core.partitions")

_inbound = msgspec.json.Decoder(InboundEnvelope)

# A fetch ends at least this long before the lease could: time for its messages to arrive.
FETCH_MARGIN = 0.25
# JetStream's pull request subject (the default API prefix, which the bus's context uses).
_NEXT = "$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
# A status that is not the end of a pull request (100: an idle heartbeat or flow control).
_HEARTBEAT = "100"
# The statuses that end a pull request in the ordinary way: nothing to deliver, or it expired.
_ENDED = ("404", "408")
# How long stopping waits for the server to confirm our inbox is closed.
INBOX_CLOSE = 2.0


@dataclass(eq=False)
class Held:
    """One message in our hands, from delivery until it is acked, nak'd or dead-lettered."""

    msg: Msg
    seq: int  # stream sequence: the order JetStream stored it in
    key: str
    env: InboundEnvelope | None
    problem: str | None  # why it cannot be applied (undecodable, unknown version)
    attempt: int
    touched: float  # monotonic: delivery or last in_progress
    started: bool = False


def _read(msg: Msg) -> tuple[InboundEnvelope | None, str | None]:
    try:
        env: InboundEnvelope = decode_or_dead(_inbound, msg.data)
    except Undeliverable as exc:
        return None, exc.reason
    if env.v > SCHEMA_VERSION:
        return None, f"unknown_version: v={env.v}"
    return env, None


@dataclass(eq=False, repr=False)
class PartitionFetch(abc.ABC):
    """Pulls one partition's messages into `held` and hands each to `_dispatch` in order."""

    bus: Bus
    partition: int
    _: KW_ONLY
    in_flight: int
    max_deliver: int
    ack_wait: float
    lease_remaining: Callable[[], float]
    fetch_timeout: float = 1.0
    held: dict[int, Held] = field(init=False, default_factory=dict)
    stopping: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _room: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _sub: Subscription | None = field(init=False, default=None)
    _task: asyncio.Task[None] | None = field(init=False, default=None)
    _fetching: asyncio.Future[list[Msg]] | None = field(init=False, default=None)
    # Delivered to our inbox, not yet taken by a fetch.
    _arrivals: list[Msg] = field(init=False, default_factory=list)
    _arrived: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    # The open pull request: until when (monotonic; 0: none open) and how many it may deliver.
    _pull_open_until: float = field(init=False, default=0.0)
    _pull_left: int = field(init=False, default=0)
    # Why the server refused or ended the last request (no responders: no consumer leader, a
    # deleted consumer; a bad request): the next fetch fails, and backs off, instead of asking
    # again at once, thousands of times a second.
    _refused: str | None = field(init=False, default=None)
    # The consumer's delivery sequence we last saw.
    _last_delivery: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.stream = self.bus.subjects.inbound_stream
        self.durable = f"core-p{self.partition}"
        self._next = _NEXT.format(stream=self.stream, durable=self.durable)

    @abc.abstractmethod
    def _dispatch(self, held: Held) -> None:
        """Queue a message now in our hands behind its conversation's earlier ones."""

    @abc.abstractmethod
    async def _heartbeat(self) -> None:
        """Runs as long as the fetch loop: keeps what we hold from being redelivered."""

    @abc.abstractmethod
    async def _wind_down(self) -> None:
        """The fetch loop has ended: give back what has not started, finish what runs."""

    async def start(self) -> None:
        config = ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.bus.subjects.inbound_partition(self.partition),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=self.in_flight,
            # The server's cap sits above ours so the last attempt is always ours to dead-letter.
            max_deliver=self.max_deliver + 1,
        )
        await self.bus.js.add_consumer(self.stream, config)  # creates, or updates the limits
        self._inbox = self.bus.nc.new_inbox()
        self._sub = await self.bus.nc.subscribe(self._inbox, cb=self._on_delivery)
        self._task = asyncio.create_task(self._run(), name=f"core-partition:{self.partition}")

    async def stop(self, grace: float) -> None:
        """Stop fetching, nak what has not started, let what runs finish (up to `grace`)."""
        self.stopping.set()
        self._room.set()
        if self._fetching is not None:
            # Waiting in a fetch holds nothing; a message it was about to get stays pending on
            # the consumer and comes back to the next owner after the ack wait.
            self._fetching.cancel()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                log.warning("partition %s did not finish in time; cancelling", self.partition)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def _run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"core-heartbeat:{self.partition}")
        try:
            await self._take_over()
            while self._may_fetch():
                room = self.in_flight - len(self.held)
                if room <= 0:
                    self._room.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._room.wait(), self.fetch_timeout)
                    continue
                self._fetching = asyncio.ensure_future(self._fetch(room))
                try:
                    msgs = await self._fetching
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if me is not None and me.cancelling():
                        raise
                    break  # stop() cut an idle fetch short
                finally:
                    self._fetching = None
                if self._lost_a_delivery(msgs):
                    # A delivery between the last one we saw and these never reached us (the
                    # connection or a NATS node went away with it); it comes back after its ack
                    # wait. Until it is in our hands nothing may be applied out of order.
                    log.warning(
                        "a delivery was lost in flight; waiting for it before applying more",
                        extra={"partition": self.partition},
                    )
                    await self._take_over(first=msgs)
                    continue
                for msg in msgs:
                    held = self._hold(msg)
                    if held is not None and not self._leaving():  # else the wind-down naks it
                        self._dispatch(held)
        finally:
            if not self.stopping.is_set():
                log.warning(
                    "partition lease ran out; letting go", extra={"partition": self.partition}
                )
            try:
                await self._wind_down()
            finally:  # also when stopping cut the wind-down short (its grace was up)
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heartbeat
                await self._give_back_arrivals()

    async def _give_back_arrivals(self) -> None:
        """Close our inbox and nak, in stream order, what it received that was never handed on.
        The open pull request may still deliver after we stop fetching (it expires inside the
        lease, not when we stop): left unanswered, such a message stays with us until its ack
        wait, and the next owner's take-over waits for it."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                if not self.bus.nc.is_connected:  # nothing more can reach us: just let go
                    await sub.unsubscribe()
                else:  # unsubscribe, then a round trip: everything sent before it is read
                    async with asyncio.timeout(INBOX_CLOSE):
                        await sub.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # lost with the connection: back after their ack wait
                log.warning(
                    "closing the inbox failed: %s", exc, extra={"partition": self.partition}
                )
        arrivals, self._arrivals = self._arrivals, []
        for msg in sorted(arrivals, key=lambda m: m.metadata.sequence.stream):
            with contextlib.suppress(Exception):
                await msg.nak()

    def _may_fetch(self) -> bool:
        """Still ours: not stopping, and the lease has not run out (a renewal may be late)."""
        return not self._leaving()

    def _fetch_budget(self) -> float:
        """How long the next fetch may wait: it must end (its messages in our hands) inside the
        lease, with a margin for the messages' flight."""
        budget = min(self.fetch_timeout, self.lease_remaining() - FETCH_MARGIN)
        return budget if budget >= 0.05 else 0.0

    def _leaving(self) -> bool:
        return self.stopping.is_set() or self.lease_remaining() <= 0

    async def _fetch(self, room: int, timeout: float | None = None) -> list[Msg]:
        try:
            budget = self._fetch_budget()
            if budget <= 0:  # too close to the lease's end to fetch: wait for the renewal
                await asyncio.sleep(0.05)
                return []
            return await self._pull(room, min(timeout or budget, budget), budget)
        except Exception as exc:  # connection loss: the client reconnects by itself
            log.warning("fetch failed: %s", exc, extra={"partition": self.partition})
            await asyncio.sleep(0.5)
            return []

    async def _pull(self, room: int, wait: float, budget: float) -> list[Msg]:
        """What has been delivered to us, waiting up to `wait` for the first; asks for up to
        `room` more, expiring within `budget`, when no request is open."""
        if not self._arrivals:
            self._arrived.clear()
            if time.monotonic() >= self._pull_open_until:
                expires = int((budget - 0.01) * 1e9)  # ends on the server before it does here
                request = b'{"batch":%d,"expires":%d}' % (room, expires)
                self._pull_open_until = time.monotonic() + budget
                self._pull_left = room
                await self.bus.nc.publish(self._next, request, reply=self._inbox)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._arrived.wait()
        msgs, self._arrivals = self._arrivals, []
        if not msgs and self._refused is not None:
            refused, self._refused = self._refused, None
            raise RuntimeError(f"pull request refused: {refused}")
        return msgs

    async def _on_delivery(self, msg: Msg) -> None:
        status = JetStreamContext.is_status_msg(msg)
        if status is None:
            self._arrivals.append(msg)
            self._pull_left -= 1
            if self._pull_left > 0:
                self._arrived.set()
                return
        elif status == _HEARTBEAT:
            return
        elif status not in _ENDED:
            self._refused = f"{status} {(msg.headers or {}).get('Description', '')}".strip()
        # The request delivered its batch, expired (408), found nothing (404) or was ended or
        # refused by the server (409: a leadership change, the consumer deleted; 503: no
        # responders): ask again, after a pause if it was refused.
        self._pull_open_until = 0.0
        self._arrived.set()

    def _lost_a_delivery(self, msgs: list[Msg]) -> bool:
        """True if the consumer delivered something between the last message we got and these
        that we never got: its delivery sequence counts every delivery, ours and lost ones."""
        lost = False
        for msg in msgs:
            delivered = msg.metadata.sequence.consumer
            if self._last_delivery is not None and delivered > self._last_delivery + 1:
                lost = True
            self._last_delivery = max(self._last_delivery or 0, delivered)
        return lost

    async def _take_over(self, first: list[Msg] | None = None) -> None:
        """Hold back until every message pending on the consumer is ours, then queue in order."""
        stash: list[Held] = []
        for msg in first or []:
            held = self._hold(msg)
            if held is not None:
                stash.append(held)
        while self._may_fetch():
            try:
                info = await self.bus.js.consumer_info(self.stream, self.durable)
            except Exception as exc:
                log.warning("consumer info failed: %s", exc, extra={"partition": self.partition})
                await asyncio.sleep(0.5)
                continue
            if (info.num_ack_pending or 0) <= len(self.held):
                # From here on, a gap in the delivery sequence is a delivery lost in flight.
                delivered = info.delivered.consumer_seq if info.delivered else None
                self._last_delivery = max(self._last_delivery or 0, delivered or 0)
                break
            room = self.in_flight - len(self.held)
            fetched = await self._fetch(max(room, 1), timeout=0.2)
            self._lost_a_delivery(fetched)  # keeps the delivery count current
            for msg in fetched:
                held = self._hold(msg)
                if held is not None:
                    stash.append(held)
        if self._leaving():  # the lease ran out meanwhile: the wind-down gives it all back
            return
        for held in sorted(stash, key=lambda h: h.seq):
            self._dispatch(held)
        if stash:
            log.info(
                "partition taken over with %d pending messages",
                len(stash),
                extra={"partition": self.partition},
            )

    def _hold(self, msg: Msg) -> Held | None:
        seq = msg.metadata.sequence.stream
        already = self.held.get(seq)
        if already is not None:  # redelivered while we hold it: keep one, answer on the newest
            already.msg = msg
            return None
        env, problem = _read(msg)
        held = Held(
            msg=msg,
            seq=seq,
            key=env.routing_key if env is not None else f"\0undeliverable:{seq}",
            env=env,
            problem=problem,
            attempt=msg.metadata.num_delivered or 1,
            touched=time.monotonic(),
        )
        self.held[seq] = held
        return held
