"""Bounded broker storage: a message leaves JetStream once its consumer acknowledged it, a full
stream refuses new work instead of dropping old work, and streams an earlier version created are
migrated only when nothing in them would be lost."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from email.message import EmailMessage

import aiosmtplib
import msgspec
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from shared.bus import Bus
from shared.envelopes import InboundMessage
from shared.identity import make_identifier
from shared.ids import new_id
from shared.models import utcnow
from shared.streams import MIB, NotDrained, StreamLimits, migrate_streams
from shared.subjects import Subjects
from tests.conftest import EMAIL_DOMAINS, Servers, Stack, eventually

OUR_NUMBER = "+15550001111"


async def stream_state(stack: Stack, stream: str) -> tuple[int, int]:
    """(messages held now, messages ever stored)."""
    info = await stack.core.bus.js.stream_info(stream)
    return int(info.state.messages), int(info.state.last_seq)


async def test_the_broker_keeps_nothing_its_consumers_have_acknowledged(stack: Stack) -> None:
    subjects = stack.core.subjects
    # A subscription, so that events go through the broker too (nothing here matches its filter).
    hook = await stack.api.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["handoff.started"]}
    )
    assert hook.status_code == 201, hook.text
    for n in range(3):
        conv = (await stack.api.post("/v1/conversations", json={})).json()
        for text in ("how long do refunds take?", "status of order 12345"):
            turn = await stack.api.post(
                f"/v1/conversations/{conv['id']}/turns", json={"user_message": text}
            )
            assert turn.status_code == 200, turn.text
        sender = f"+1415555{n:04d}"
        env = InboundMessage(
            id=new_id("env"),
            channel="sms",
            received_at=utcnow(),
            text="what are your hours?",
            sender=make_identifier("phone", sender),
            recipient=OUR_NUMBER,
        )
        await stack.core.bus.publish(
            subjects.inbound(env.channel, env.routing_key),
            msgspec.json.encode(env),
            msg_id=env.id,
        )

    async def three_texts_sent() -> bool:
        return sum(r.path.endswith("/Messages.json") for r in stack.twilio.requests) >= 3

    await eventually(three_texts_sent, what="the SMS replies at Twilio")

    async def drained() -> dict[str, tuple[int, int]] | None:
        states = {
            name: await stream_state(stack, name)
            for name in (subjects.inbound_stream, subjects.outbound_stream, subjects.events_stream)
        }
        return states if all(held == 0 for held, _ in states.values()) else None

    states = await eventually(drained, what="every stream emptied by its consumers")
    # Everything went through the broker (9 inbound envelopes; 3 SMS replies — the API's answers
    # went back in their responses and never to OUTBOUND; events for every turn) and left it.
    assert states[subjects.inbound_stream][1] == 9
    assert states[subjects.outbound_stream][1] == 3
    assert states[subjects.events_stream][1] >= 18


async def smtp_reply_code(stack: Stack) -> int:
    msg = EmailMessage()
    msg["From"] = "Jane Doe <jane@example.com>"
    msg["To"] = f"support@{EMAIL_DOMAINS.split(',')[0]}"
    msg["Subject"] = "Refund question"
    msg.set_content("how long do refunds take?")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=stack.smtp_port, timeout=10)
    await smtp.connect()
    try:
        await smtp.send_message(msg)
        return 250
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    finally:
        smtp.close()


async def test_a_full_inbound_stream_refuses_new_work_until_there_is_room(stack: Stack) -> None:
    js = stack.core.bus.js
    inbound = stack.core.subjects.inbound_stream
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    turns = f"/v1/conversations/{conv['id']}/turns"
    normal = (await js.stream_info(inbound)).config
    # Smaller than one envelope: the stream is "full" for the next publish.
    await js.update_stream(dataclasses.replace(normal, max_bytes=64))
    try:
        refused = await stack.api.post(turns, json={"user_message": "hello?"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "unavailable"
        assert await smtp_reply_code(stack) == 451  # the sending MTA keeps the mail and retries
    finally:
        await js.update_stream(normal)
    accepted = await stack.api.post(turns, json={"user_message": "hello?"})
    assert accepted.status_code == 200, accepted.text
    transcript = (await stack.api.get(turns)).json()["items"]
    assert [t["role"] for t in transcript] == ["user", "assistant"]  # the refused turn left nothing


@pytest.fixture
async def bus(servers: Servers, namespace: str) -> AsyncIterator[Bus]:
    limits = StreamLimits(inbound=4 * MIB, outbound=4 * MIB, events=4 * MIB, dead=MIB)
    bus = Bus(servers.nats_url, Subjects(namespace, partitions=2), name="test", limits=limits)
    await bus.connect()
    yield bus
    await bus.close()


async def test_a_stream_from_an_earlier_version_is_migrated_only_once_drained(bus: Bus) -> None:
    js, subjects = bus.js, bus.subjects
    old = StreamConfig(
        name=subjects.inbound_stream,
        subjects=[subjects.inbound_all],
        retention=RetentionPolicy.LIMITS,
    )
    await js.add_stream(old)
    sub = await js.pull_subscribe(
        subjects.inbound_partition(0), durable="core-p0", stream=subjects.inbound_stream
    )
    for n in range(2):
        await bus.publish(subjects.inbound_partition(0).replace("*", "api"), b"m", msg_id=f"m{n}")

    # Services start on it: it keeps its retention (JetStream refuses that change) but gets the
    # byte limit, and the other streams are created as work queues.
    await bus.ensure_streams()
    info = await js.stream_info(subjects.inbound_stream)
    assert info.config.retention == RetentionPolicy.LIMITS
    assert info.config.max_bytes == 4 * MIB
    assert (await js.stream_info(subjects.events_stream)).config.retention == (
        RetentionPolicy.WORK_QUEUE
    )

    (first,) = await sub.fetch(1, timeout=2)
    await first.ack_sync()
    with pytest.raises(NotDrained, match="core-p0: 1 not delivered"):
        await migrate_streams(js, bus.stream_configs())
    assert (await js.stream_info(subjects.inbound_stream)).state.messages == 2  # nothing lost

    (second,) = await sub.fetch(1, timeout=2)
    await second.ack_sync()
    assert await migrate_streams(js, bus.stream_configs()) == [subjects.inbound_stream]
    info = await js.stream_info(subjects.inbound_stream)
    assert info.config.retention == RetentionPolicy.WORK_QUEUE
    assert info.state.messages == 0
    # The consumer came back with the stream: the running subscription carries on.
    await bus.publish(subjects.inbound_partition(0).replace("*", "sms"), b"after", msg_id="m2")
    (after,) = await sub.fetch(1, timeout=5)
    assert after.data == b"after"
    await after.ack_sync()
    await eventually(
        lambda: _held(bus), what="the acknowledged message deleted from the work queue"
    )
    assert await migrate_streams(js, bus.stream_configs()) == []


async def _held(bus: Bus) -> bool:
    return (await bus.js.stream_info(bus.subjects.inbound_stream)).state.messages == 0


async def test_events_go_through_the_broker_only_while_a_webhook_subscription_exists(
    stack: Stack,
) -> None:
    events = stack.core.subjects.events_stream
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    turns = f"/v1/conversations/{conv['id']}/turns"

    async def turn_and_events_published() -> int:
        answered = await stack.api.post(turns, json={"user_message": "what are your hours?"})
        assert answered.status_code == 200, answered.text
        # Core publishes a turn's events before its reply: the count is final once we have it.
        return (await stream_state(stack, events))[1]

    assert await turn_and_events_published() == 0  # nobody would read them
    audit = (await stack.api.get(f"/v1/conversations/{conv['id']}/events")).json()["items"]
    assert [e["type"] for e in audit].count("turn.created") == 2  # the record is in Valkey

    hook = await stack.api.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["handoff.started"]}
    )
    assert hook.status_code == 201, hook.text
    assert await turn_and_events_published() == 2  # the turn right after: both turn.created

    assert (await stack.api.delete(f"/v1/webhooks/{hook.json()['id']}")).status_code == 204
    audience = stack.core.conversations.audience
    await eventually(lambda: asyncio.sleep(0, not audience.present), what="core re-reading")
    assert await turn_and_events_published() == 2
