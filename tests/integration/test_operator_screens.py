"""Core sends operators' live notices (`gw.ops.*`) only while an operators' stream is open
(services/core/audience.py, services/api/screens.py): with none open a turn costs no notice, an
opened stream hears of the very next turn, and re-reads once every core has heard of it."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from nats.aio.msg import Msg

from services.api.screens import PRESENCE_SECONDS
from shared.store.keys import Keys
from tests.conftest import Stack, eventually
from tests.integration.test_streaming_webhooks_sessions import read_sse

pytestmark = pytest.mark.services("api")


async def _turn(stack: Stack, cid: str, text: str = "what are your hours?") -> None:
    answered = await stack.api.post(f"/v1/conversations/{cid}/turns", json={"user_message": text})
    assert answered.status_code == 200, answered.text


async def test_no_screen_open_no_notice_and_an_opened_stream_hears_the_next_turn(
    stack: Stack, valkey: redis.Redis
) -> None:
    bus, screens = stack.core.bus, stack.core.conversations.screens
    heard: list[str] = []

    async def on_notice(msg: Msg) -> None:
        heard.append(msg.subject)

    # Listening on NATS directly is not an open screen: nothing announces it.
    tap = await bus.nc.subscribe(bus.subjects.operator_events_all, cb=on_notice)
    cid = (await stack.api.post("/v1/conversations", json={})).json()["id"]
    await eventually(lambda: asyncio.sleep(0, not screens.present), what="core's first read")
    await _turn(stack, cid)
    await bus.nc.flush()
    assert heard == []  # the turn and its answer were applied and answered: no notice

    async with stack.api.stream("GET", "/v1/events/stream") as response:
        assert response.status_code == 200
        reading = asyncio.create_task(read_sse(response, 4))
        await eventually(lambda: response.num_bytes_downloaded > 0, what="the ready frame")
        # Announced before the stream answered, on the connection the turn is published on:
        # core has heard of the screen before it applies the turn.
        await _turn(stack, cid)
        frames = await asyncio.wait_for(reading, 10)
        ttl = await valkey.pttl(Keys(stack.namespace).operators_watching())
    await tap.unsubscribe()
    assert [name for name, _ in frames] == ["ready", "turn.created", "turn.created", "resync"]
    assert 0 < ttl <= PRESENCE_SECONDS * 1000  # what a core that missed the announcement reads
    assert heard == [bus.subjects.operator_event("turn.created")] * 2


async def test_core_reads_the_presence_back_when_it_missed_the_announcement(
    stack: Stack, valkey: redis.Redis
) -> None:
    screens = stack.core.conversations.screens
    await eventually(lambda: asyncio.sleep(0, not screens.present), what="core's first read")
    key = Keys(stack.namespace).operators_watching()
    await valkey.set(key, b"1", px=60_000)  # an API told Valkey; its announcement was lost
    await eventually(lambda: asyncio.sleep(0, screens.present), what="core re-reading")
    await valkey.delete(key)  # the last screen closed long ago: its presence ran out
    await eventually(lambda: asyncio.sleep(0, not screens.present), what="core re-reading")
