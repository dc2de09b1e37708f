"""Core's inbound consumer: strict order within a conversation, none across conversations.

The delivery contract, per inbound partition (`gw.in.*.<p>`, durable consumer `core-p<p>`):

- **One owner.** Exactly one core replica consumes a partition at a time: the holder of its lease
  (`ownership`). Up to `in_flight_per_partition` messages of the partition are in its hands at
  once (the consumer's `max_ack_pending`).
- **Order per conversation, not per partition.** Messages are serialised by routing key (the
  conversation, or sender → our address for channel traffic): each key has a queue in the order
  JetStream delivered, one message of a key is applied at a time, and each is acked on its own
  right after its effect is durable. A slow agent call holds its own conversation and nothing else.
- **Failures hold the key.** A message whose apply fails is retried in place, so nothing of its
  conversation overtakes it: while NATS or Valkey is down it is held without counting (the outage
  says nothing about the message); any other error counts as a delivery, retried with backoff,
  and after `max_deliver` deliveries it goes to DEAD with the reason and its conversation moves on.
  An undecodable message or an unknown schema version goes to DEAD at once. A message that goes
  back to JetStream unapplied (nak'd as the lease runs out, or an ack/nak that failed so we cannot
  tell) takes the rest of its conversation's queue back with it, so no later message of that
  conversation is applied before it returns. A delivery lost in flight (the connection or a NATS
  node went away between the server sending it and us reading it) shows as a gap in the
  consumer's delivery sequence: nothing more is applied until it is back (after its ack wait),
  and then everything pending is queued in stream order, as in a take-over.
- **Long calls are not redelivered.** Every message held longer than `ack_wait / 3` (running, or
  queued behind its conversation's running one) is sent `in_progress` every `ack_wait / 3`, in
  stream order, so JetStream keeps it with us however long the agent takes.
- **Redelivery cannot reorder a conversation.** A message redelivered while we still hold it (a
  lost `in_progress`) is recognised by its stream sequence and not applied twice; one applied
  whose ack was lost comes back later and is deduplicated by envelope id in the store. When a
  replica takes a partition over, it applies nothing until every message still pending on the
  consumer (the previous owner's unacked messages, redelivered when their ack wait runs out or at
  once if it nak'd them) is in its own hands; then it queues what it holds per key in stream
  order. So a conversation's message 2 is never applied before a message 1 that a crashed owner
  held but had not finished.
- **Stopping or handing a partition back.** No new fetch; messages not started are nak'd at once
  (the next owner gets them without waiting); messages being applied finish and are acked within
  the grace; then the lease is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from shared import tracing
from shared.bus import TRANSIENT, Bus, Undeliverable, short_backoff
from shared.envelopes import SCHEMA_VERSION, InboundEnvelope

log = logging.getLogger("switchboard.core.partitions")

_inbound = msgspec.json.Decoder(InboundEnvelope)

Apply = Callable[[InboundEnvelope], Awaitable[None]]
# A fetch ends at least this long before the lease could: time for its messages to arrive.
FETCH_MARGIN = 0.25


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
        env = _inbound.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return None, f"undecodable: {exc}"
    if env.v > SCHEMA_VERSION:
        return None, f"unknown_version: v={env.v}"
    return env, None


class PartitionConsumer:
    def __init__(
        self,
        bus: Bus,
        partition: int,
        apply: Apply,
        *,
        in_flight: int,
        max_deliver: int,
        ack_wait: float,
        lease_remaining: Callable[[], float],
        fetch_timeout: float = 1.0,
    ) -> None:
        self.bus = bus
        self.partition = partition
        self.apply = apply
        self.in_flight = in_flight
        self.max_deliver = max_deliver
        self.ack_wait = ack_wait
        self.lease_remaining = lease_remaining
        self.fetch_timeout = fetch_timeout
        self.stream = bus.subjects.inbound_stream
        self.durable = f"core-p{partition}"
        self.held: dict[int, Held] = {}
        self.queues: dict[str, deque[Held]] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.stopping = asyncio.Event()
        self._room = asyncio.Event()
        self._sub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._fetching: asyncio.Future[list[Msg]] | None = None
        self._last_delivery: int | None = None  # the consumer's delivery sequence we last saw

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
        self._sub = await self.bus.js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
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

    # The fetch loop -----------------------------------------------------------------------------

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
                    if held is not None:
                        self._dispatch(held)
        finally:
            if not self.stopping.is_set():
                log.warning(
                    "partition lease ran out; letting go", extra={"partition": self.partition}
                )
            await self._wind_down()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()

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
        assert self._sub is not None
        try:
            budget = self._fetch_budget()
            if budget <= 0:  # too close to the lease's end to fetch: wait for the renewal
                await asyncio.sleep(0.05)
                return []
            return await self._sub.fetch(room, timeout=min(timeout or budget, budget))
        except NatsTimeout:
            return []
        except Exception as exc:  # connection loss: the client reconnects by itself
            log.warning("fetch failed: %s", exc, extra={"partition": self.partition})
            await asyncio.sleep(0.5)
            return []

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

    def _dispatch(self, held: Held) -> None:
        queue = self.queues.setdefault(held.key, deque())
        queue.append(held)
        if held.key not in self.workers:
            self.workers[held.key] = asyncio.create_task(self._work(held.key))

    async def _heartbeat(self) -> None:
        every = self.ack_wait / 3
        while True:
            await asyncio.sleep(every / 2)
            now = time.monotonic()
            for held in sorted(self.held.values(), key=lambda h: h.seq):
                if now - held.touched >= every:
                    held.touched = now
                    with contextlib.suppress(Exception):
                        await held.msg.in_progress()

    # One conversation at a time -----------------------------------------------------------------

    async def _work(self, key: str) -> None:
        queue = self.queues[key]
        try:
            while queue:
                held = queue[0]
                held.started = True  # from here on it is finished, never nak'd by a wind-down
                # Shielded: stopping waits for the message in hand to be finished and acked.
                settled = await asyncio.shield(self._apply_one(held))
                queue.popleft()
                self.held.pop(held.seq, None)
                self._room.set()
                if not settled:
                    # It went back to JetStream unapplied (or we cannot tell): nothing of its
                    # conversation may overtake it, so the rest of the queue goes back too.
                    await self._release(queue)
        finally:
            if not queue:
                self.queues.pop(key, None)
            self.workers.pop(key, None)

    async def _release(self, queue: deque[Held]) -> None:
        """Give back, in stream order, messages of a conversation whose earlier message went back
        unapplied. They come back after it: to a take-over (which waits for every pending
        message and sorts them) or, nak'd at once, behind its own redelivery's dedupe."""
        while queue:
            held = queue.popleft()
            self.held.pop(held.seq, None)
            with contextlib.suppress(Exception):
                await held.msg.nak()
        self._room.set()

    async def _apply_one(self, held: Held) -> bool:
        """True when the message is settled here (applied and acked, or dead-lettered)."""
        # The message's trace (from its headers) is current while it is applied and answered.
        with tracing.traced(f"apply {held.msg.subject}", held.msg.headers or {}):
            return await self._apply_one_traced(held)

    async def _apply_one_traced(self, held: Held) -> bool:
        try:
            return await self._apply_until_settled(held)
        except Exception as exc:
            # Acking, nak-ing or dead-lettering failed (NATS went away mid-step): not acked, so
            # it comes back; the store dedupes it by envelope id.
            log.warning(
                "message left for redelivery: %s: %s",
                type(exc).__name__,
                exc,
                extra={"partition": self.partition, "stream_seq": held.seq},
            )
            return False

    async def _apply_until_settled(self, held: Held) -> bool:
        if held.env is None:
            await self._dead_letter(held, held.problem or "undeliverable")
            return True
        pause = 0.1
        while True:
            try:
                await self.apply(held.env)
            except Undeliverable as exc:
                await self._dead_letter(held, exc.reason)
                return True
            except TRANSIENT as exc:
                if self._leaving():
                    await held.msg.nak()  # the next owner takes it, in order
                    return False
                log.warning(
                    "dependency unavailable, holding the message: %s: %s",
                    type(exc).__name__,
                    exc,
                    extra={"partition": self.partition, "envelope_id": held.env.id},
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            except Exception as exc:
                if held.attempt >= self.max_deliver:
                    await self._dead_letter(held, f"max_deliver: {type(exc).__name__}: {exc}")
                    return True
                log.warning(
                    "apply failed, retrying in place",
                    exc_info=True,
                    extra={"envelope_id": held.env.id, "attempt": held.attempt},
                )
                if self._leaving():
                    await held.msg.nak()
                    return False
                await asyncio.sleep(short_backoff(held.attempt))
                held.attempt += 1
                continue
            await held.msg.ack()  # a lost ack means a redelivery, which the store dedupes
            return True

    async def _dead_letter(self, held: Held, reason: str) -> None:
        await self.bus.dead_letter(held.msg.subject, held.msg.data, reason, held.attempt)
        await held.msg.ack()

    async def _wind_down(self) -> None:
        """Nak every message not started (in stream order), then wait for the ones running."""
        for held in sorted(self.held.values(), key=lambda h: h.seq):
            if held.started:
                continue
            queue = self.queues.get(held.key)
            if queue is not None:
                with contextlib.suppress(ValueError):
                    queue.remove(held)
            self.held.pop(held.seq, None)
            with contextlib.suppress(Exception):
                await held.msg.nak()
        if self.workers:
            await asyncio.gather(*list(self.workers.values()), return_exceptions=True)
