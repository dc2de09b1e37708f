"""The bus against a real nats-server: dedupe, ordering, redelivery, dead letters."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from redis import exceptions as redis_errors

from shared.bus import Bus, Delivery, Later, Undeliverable
from shared.envelopes import DeadLetter
from shared.errors import Unavailable
from tests.bus_traffic import consume_inbound, publish
from tests.conftest import eventually


async def dead_letters(bus: Bus) -> list[DeadLetter]:
    info = await bus.js.stream_info(bus.subjects.dead_stream)
    letters = []
    for seq in range(1, info.state.last_seq + 1):
        msg = await bus.js.get_msg(bus.subjects.dead_stream, seq)
        letters.append(msgspec.json.decode(msg.data or b"", type=DeadLetter))
    return letters


async def test_streams_are_created_idempotently(bus: Bus) -> None:
    await bus.ensure_streams()
    info = await bus.js.stream_info(bus.subjects.inbound_stream)
    assert info.config.subjects == [bus.subjects.inbound_all]


async def test_a_republished_msg_id_is_stored_once(bus: Bus) -> None:
    subject = bus.subjects.inbound("sms", "k")
    first = await bus.publish(subject, b"one", msg_id="SM123")
    second = await bus.publish(subject, b"one", msg_id="SM123")
    assert not first.duplicate
    assert second.duplicate
    info = await bus.js.stream_info(bus.subjects.inbound_stream)
    assert info.state.messages == 1


async def test_one_partition_is_consumed_in_order(bus: Bus) -> None:
    seen: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.data)

    await publish(bus, bus.subjects.inbound("api", "conv_a"), *(str(i).encode() for i in range(30)))
    partition = bus.subjects.partition_of("conv_a")
    await bus.consume(
        stream=bus.subjects.inbound_stream,
        durable="p",
        filter_subject=bus.subjects.inbound_partition(partition),
        handler=handler,
    )
    await eventually(lambda: asyncio.sleep(0, len(seen) == 30), what="30 messages")
    assert seen == [str(i).encode() for i in range(30)]


async def test_a_failing_handler_is_retried_then_dead_lettered(bus: Bus) -> None:
    attempts: list[int] = []

    async def handler(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise RuntimeError("store down")

    await publish(bus, bus.subjects.inbound("api", "k"), b"payload")
    await consume_inbound(bus, "fail", handler, max_deliver=3)
    letters = await eventually(lambda: dead_letters(bus), what="a dead letter")
    assert attempts == [1, 2, 3]
    assert letters[0].reason.startswith("max_deliver: RuntimeError: store down")
    assert letters[0].payload == "payload"
    assert letters[0].deliveries == 3


async def test_undeliverable_goes_to_dead_at_once_and_later_messages_still_flow(bus: Bus) -> None:
    handled: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        if delivery.data == b"poison":
            raise Undeliverable("unknown_version: v=9")
        handled.append(delivery.data)

    await publish(bus, bus.subjects.inbound("api", "k"), b"poison", b"fine")
    await consume_inbound(bus, "poison", handler)
    await eventually(lambda: asyncio.sleep(0, handled == [b"fine"]), what="the next message")
    letters = await dead_letters(bus)
    assert [(d.reason, d.deliveries) for d in letters] == [("unknown_version: v=9", 1)]


async def test_a_dependency_outage_holds_the_message_instead_of_dead_lettering_it(
    bus: Bus,
) -> None:
    calls: list[int] = []

    async def handler(delivery: Delivery) -> None:
        calls.append(delivery.attempt)
        if len(calls) <= 3:  # more failures than max_deliver allows deliveries
            raise redis_errors.ConnectionError("Connection refused")

    await publish(bus, bus.subjects.inbound("api", "k"), b"payload")
    await consume_inbound(bus, "held", handler, max_deliver=2)
    await eventually(lambda: asyncio.sleep(0, len(calls) == 4), what="the fourth try")
    assert calls == [1, 1, 1, 1]  # retried in place: the delivery count was never spent
    assert await dead_letters(bus) == []


async def test_a_failed_dead_letter_leaves_the_message_for_redelivery_and_the_consumer_lives(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    handled: list[bytes] = []
    real_dead_letter = bus.dead_letter
    failures = [Unavailable("the message bus did not store the message")]

    async def flaky_dead_letter(*args: object, **kwargs: object) -> None:
        if failures:
            raise failures.pop()
        await real_dead_letter(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bus, "dead_letter", flaky_dead_letter)

    async def handler(delivery: Delivery) -> None:
        if delivery.data == b"poison":
            raise Undeliverable("unknown_version: v=9")
        handled.append(delivery.data)

    await publish(bus, bus.subjects.inbound("api", "k"), b"poison", b"fine")
    await consume_inbound(bus, "flaky-dead", handler, ack_wait=1.0)
    await eventually(lambda: asyncio.sleep(0, handled == [b"fine"]), what="the next message")
    letters = await dead_letters(bus)
    assert [(d.reason, d.deliveries) for d in letters] == [("unknown_version: v=9", 2)]


async def test_a_handler_answering_later_is_redelivered_after_that_delay_without_a_failure(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[tuple[int, float]] = []

    async def handler(delivery: Delivery) -> Later | None:
        attempts.append((delivery.attempt, asyncio.get_running_loop().time()))
        return Later(0.5) if len(attempts) == 1 else None

    await publish(bus, bus.subjects.inbound("api", "k"), b"payload")
    # A failure would wait 30 s before its redelivery: Later is not one.
    await consume_inbound(bus, "later", handler, max_deliver=2, backoff=lambda attempt: 30.0)
    await eventually(lambda: len(attempts) == 2, what="the second delivery")
    (first, at_first), (second, at_second) = attempts
    assert (first, second) == (1, 2)
    assert at_second - at_first >= 0.4  # the handler's delay, not the failure backoff
    assert not [r for r in caplog.records if r.name == "switchboard.bus" and r.levelno >= 30]
    assert await dead_letters(bus) == []
