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

The fetch loop (fetching inside the lease, the delivery-sequence gap, take-over waiting, queuing
what is pending in stream order) is `partition_fetch.PartitionFetch`; this module is what happens
to a message once it is in our hands: its conversation's queue, applying, acking, retrying,
dead-lettering, `in_progress`, and giving back what was not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.core.partition_fetch import Held, PartitionFetch
from shared import tracing
from shared.bus import TRANSIENT, Undeliverable, short_backoff
from shared.envelopes import InboundEnvelope

log = logging.getLogger("switchboard.core.partitions")

Apply = Callable[[InboundEnvelope], Awaitable[None]]


@dataclass(eq=False, repr=False)
class PartitionConsumer(PartitionFetch):
    """One partition's messages, applied one at a time per conversation as `PartitionFetch`
    hands them over; conversations proceed independently of each other."""

    apply: Apply
    queues: dict[str, deque[Held]] = field(init=False, default_factory=dict)
    workers: dict[str, asyncio.Task[None]] = field(init=False, default_factory=dict)

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
        # Out of every queue before the first nak yields: a worker that starts meanwhile must not
        # find a later message of its conversation at the head of its queue.
        unstarted = sorted((h for h in self.held.values() if not h.started), key=lambda h: h.seq)
        for held in unstarted:
            queue = self.queues.get(held.key)
            if queue is not None:
                with contextlib.suppress(ValueError):
                    queue.remove(held)
            self.held.pop(held.seq, None)
        for held in unstarted:
            with contextlib.suppress(Exception):
                await held.msg.nak()
        if self.workers:
            await asyncio.gather(*list(self.workers.values()), return_exceptions=True)
