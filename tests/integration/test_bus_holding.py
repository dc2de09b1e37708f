"""The bus through a provider outage (held, not dead-lettered, until the horizon) and the DEAD
stream's list and replay, against a real nats-server."""

from __future__ import annotations

import asyncio

from shared.bus import Bus, Delivery, Hold, ProviderUnavailable
from shared.subjects import Subjects
from tests.bus_traffic import consume_inbound, consume_outbound, publish
from tests.conftest import Servers, eventually


async def test_a_provider_outage_outlasts_max_deliver_and_keeps_the_order(bus: Bus) -> None:
    handled: list[tuple[bytes, int]] = []
    refusals = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal refusals
        if delivery.data == b"first" and refusals < 8:  # far more than max_deliver allows
            refusals += 1
            raise ProviderUnavailable("relay", "connection refused")
        handled.append((delivery.data, delivery.attempt))

    subject = bus.subjects.outbound("sms", "+15550001234")
    await publish(bus, subject, b"first", b"second")
    await consume_outbound(
        bus,
        "held-provider",
        handler,
        filter_subject=subject,
        max_deliver=3,
        hold=Hold(horizon=60, base_delay=0.01, max_delay=0.05),
    )
    await eventually(lambda: asyncio.sleep(0, len(handled) == 2), what="both messages")
    # Held and nak'd 8 times (the server's delivery count went to 9, past max_deliver = 3), and
    # the second message, on the same ordered consumer, never overtook the first.
    assert handled == [(b"first", 9), (b"second", 1)]
    assert await bus.dead_letters() == []


async def test_a_message_held_past_its_horizon_is_marked_then_dead_lettered(bus: Bus) -> None:
    marked: list[tuple[bytes, str]] = []

    async def handler(delivery: Delivery) -> None:
        raise ProviderUnavailable("Twilio Messaging", "HTTP 503, error 20500")

    async def on_dead(delivery: Delivery, reason: str) -> None:
        marked.append((delivery.data, reason))

    await publish(bus, bus.subjects.outbound("email", "a@b.test"), b"reply")
    await consume_outbound(
        bus,
        "horizon",
        handler,
        hold=Hold(horizon=1.0, base_delay=0.05, max_delay=0.2),
        on_dead=on_dead,
    )
    entries = await eventually(bus.dead_letters, what="a dead letter", timeout=15)
    assert len(entries) == 1
    reason = entries[0].letter.reason
    assert reason.startswith("gave_up: Twilio Messaging: HTTP 503, error 20500 (held ")
    assert entries[0].letter.deliveries > 1
    assert marked == [(b"reply", reason)]


async def test_a_dead_letter_is_listed_and_replayed_once_onto_its_subject(bus: Bus) -> None:
    seen: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery.data)

    subject = bus.subjects.inbound("api", "conv_r")
    await bus.dead_letter(subject, b'{"id": "env_1"}', "max_deliver: RuntimeError: boom", 5)
    await bus.dead_letter(subject, b'{"id": "env_2"}', "undecodable: nope", 1)
    listed = await bus.dead_letters()
    assert [(e.letter.source_subject, e.letter.payload, e.replay) for e in listed] == [
        (subject, '{"id": "env_1"}', None),
        (subject, '{"id": "env_2"}', None),
    ]
    assert [e.letter.id for e in await bus.dead_letters(after_seq=listed[0].seq)] == [
        listed[1].letter.id
    ]

    entry = await bus.dead_letter_by_id(listed[0].letter.id)
    assert entry is not None
    first = await bus.replay(entry)
    again = await bus.replay(entry)  # a stale entry: the durable marker is found
    reread = await bus.dead_letter_by_id(listed[0].letter.id)
    assert reread is not None
    assert reread.replay == first
    assert await bus.replay(reread) == first == again  # and durably: nothing republished

    await consume_inbound(bus, "replayed", handler)
    await eventually(lambda: asyncio.sleep(0, seen == [b'{"id": "env_1"}']), what="the replay")
    assert seen == [b'{"id": "env_1"}']
    info = await bus.js.stream_info(bus.subjects.inbound_stream)
    assert info.state.last_seq == 1  # stored once (a work queue: consumed, so deleted since)
    # The listing still shows both letters, the first one marked replayed.
    assert [e.replay is not None for e in await bus.dead_letters()] == [True, False]


async def test_a_durable_made_before_holding_existed_is_updated_to_unlimited_deliveries(
    servers: Servers, namespace: str
) -> None:
    async def handler(delivery: Delivery) -> None:
        return None

    subjects = Subjects(namespace, partitions=2)
    for hold in (None, Hold(horizon=60)):  # an older egress, then this one, on one durable
        bus = Bus(servers.nats_url, subjects, name="test")
        await bus.connect()
        await bus.ensure_streams()
        await bus.consume(
            stream=subjects.outbound_stream,
            durable="egress-upgraded",
            filter_subject=subjects.outbound("email") + ".*",
            handler=handler,
            max_deliver=6,
            hold=hold,
        )
        info = await bus.js.consumer_info(subjects.outbound_stream, "egress-upgraded")
        await bus.close()
        # The server must not stop redelivering a held message after 7 deliveries.
        assert info.config.max_deliver == (7 if hold is None else -1)


async def test_an_outage_before_a_real_failure_does_not_use_up_its_attempts(bus: Bus) -> None:
    failures: list[int] = []

    async def handler(delivery: Delivery) -> None:
        if delivery.attempt <= 5:  # a long outage first: five refusals
            raise ProviderUnavailable("relay", "connection refused")
        failures.append(delivery.attempt)
        raise RuntimeError("a bug")  # then a failure of the message itself, every time

    await publish(bus, bus.subjects.outbound("email", "x@y.test"), b"mail")
    await consume_outbound(
        bus,
        "outage-then-bug",
        handler,
        max_deliver=3,
        backoff=lambda attempt: 0.01,
        hold=Hold(horizon=60, base_delay=0.01, max_delay=0.05),
    )
    entries = await eventually(bus.dead_letters, what="the dead letter")
    assert failures == [6, 7, 8]  # three tries of its own, as max_deliver says, not zero
    assert entries[0].letter.reason == "max_deliver: RuntimeError: a bug"
