"""Event consumers running an older build than the producer: an event type, or a field, that this
build does not know is passed on as it was written, never a crash and never trimmed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.conftest import Stack, eventually
from tests.integration.test_streaming_webhooks_sessions import Receiver, read_sse, verify

pytestmark = pytest.mark.services("api", "egress")


def newer_event(event_id: str, event_type: str) -> bytes:
    """An event as a newer producer writes it: a type this build has no payload class for, a
    payload of its own, and a top-level field added after this build."""
    return json.dumps(
        {
            "id": event_id,
            "v": 1,
            "type": event_type,
            "occurred_at": "2026-11-29T12:00:00Z",
            "conversation_id": "conv_newer",
            "session_type": "live",
            "actor": "system",
            "data": {"level": 2, "queue": ["a", "b"]},
            "added_later": {"x": 1},
        },
        separators=(",", ":"),
    ).encode()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver().serving() as rec:
        yield rec


async def test_a_webhook_for_every_event_gets_an_unknown_type_byte_for_byte(
    stack: Stack, receiver: Receiver
) -> None:
    created = await stack.api.post("/v1/webhooks", json={"url": receiver.url, "events": ["*"]})
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    raw = newer_event("evt_queue.escalated_1", "queue.escalated")
    bus = stack.core.bus
    await bus.publish(bus.subjects.event("queue.escalated"), raw, msg_id="evt_queue.escalated_1")
    await eventually(lambda: receiver.accepted, what="the webhook POST")
    headers, body = receiver.accepted[0]
    assert body == raw
    assert headers["x-switchboard-event-type"] == "queue.escalated"
    assert headers["x-switchboard-event-id"] == "evt_queue.escalated_1"
    assert verify(secret, headers, body)


async def test_the_operators_feed_passes_on_an_unknown_event_type_as_core_wrote_it(
    stack: Stack,
) -> None:
    bus = stack.core.bus
    newer = newer_event("evt_queue.escalated_2", "queue.escalated")
    known = (
        b'{"id":"evt_handoff.unclaimed_h1","v":1,"type":"handoff.unclaimed",'
        b'"occurred_at":"2026-11-29T12:00:01Z","conversation_id":"conv_newer",'
        b'"session_type":"live","actor":"system",'
        b'"data":{"handoff_id":"h1","requested_at":"2026-11-29T11:50:00"}}'
    )
    async with stack.api.stream("GET", "/v1/events/stream") as response:
        assert response.status_code == 200
        reading = asyncio.create_task(read_sse(response, 3))
        # The first frame (`ready`) is sent once the API listens to the feed.
        await eventually(lambda: response.num_bytes_downloaded > 0, what="the ready frame")
        await bus.publish_core(bus.subjects.operator_event("queue.escalated"), newer)
        await bus.publish_core(bus.subjects.operator_event("garbage"), b"not an event")
        await bus.publish_core(bus.subjects.operator_event("garbage"), b'{"id":"\xff"}')
        await bus.publish_core(bus.subjects.operator_event("handoff.unclaimed"), known)
        frames = await asyncio.wait_for(reading, 10)
    assert frames == [
        ("ready", "{}"),
        ("queue.escalated", newer.decode()),
        ("handoff.unclaimed", known.decode()),
    ]
