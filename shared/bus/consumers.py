"""Durable pull consumers: the loop, acking, retries with backoff, holding through outages, and
the dead letter at the end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
)

from shared import tracing
from shared.bus.dead_letters import DeadLetters
from shared.bus.types import (
    TRANSIENT,
    Backoff,
    DeadHook,
    Delivery,
    Handler,
    Hold,
    Later,
    ProviderUnavailable,
    _message_key,
    _Policy,
    short_backoff,
)
from shared.errors import Undeliverable

log = logging.getLogger("switchboard.bus")


class Consumers(DeadLetters):
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
            later = await self._run_through_outages(msg, handler, delivery)
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
                await (msg.nak(delay=later.seconds) if later is not None else msg.ack())

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

    async def _run_through_outages(
        self, msg: Msg, handler: Handler, delivery: Delivery
    ) -> Later | None:
        """Run the handler; while a dependency is down, hold the message and try again.

        An outage of NATS or Valkey says nothing about the message, so it must not use up the
        message's deliveries and send it to DEAD: the consumer keeps it (telling the server it is
        still in progress) and retries until the dependency is back or the service stops. Handlers
        are idempotent, so a retry after a half-done attempt is safe.
        """
        pause = 0.1
        while True:
            try:
                return await handler(delivery)
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
