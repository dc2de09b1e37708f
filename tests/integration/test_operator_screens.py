"""Core sends operators' live notices (`gw.ops.*`) only while an operators' stream is open
(services/core/audience.py, services/api/screens.py): with none open a turn costs no notice, an
opened stream hears of the very next turn, and re-reads once every core has heard of it."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as redis
from nats.aio.msg import Msg

from services.api import screens as screens_module
from services.api.screens import PRESENCE_SECONDS
from shared.store.keys import Keys
from tests.conftest import ADMIN_KEY, Stack, eventually
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
    names = [name for name, _ in frames]
    # The opening's resync comes about 2 s after `ready`: after the turn's frames, unless the
    # turn took longer than that.
    assert names[0] == "ready"
    assert sorted(names[1:]) == ["resync", "turn.created", "turn.created"]
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


async def test_a_stream_whose_client_left_before_its_first_frame_is_released(
    stack: Stack,
) -> None:
    """A console reloaded while its stream was opening: the response starts after the client
    left, the stream is cancelled before its first frame, and what opening it took (the count
    that keeps core sending notices, the subscription) is given back all the same."""
    gateway = stack.api_app.state.gateway
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/v1/events/stream",
        "raw_path": b"/v1/events/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"x-api-key", ADMIN_KEY.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    sent: list[dict[str, object]] = []

    async def gone() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    subscriptions = len(gateway.bus.nc._subs)
    for _ in range(3):
        await asyncio.wait_for(stack.api_app(scope, gone, send), 10)
    assert sent[0]["status"] == 200  # it did open
    assert gateway.screens.open_streams == 0
    assert len(gateway.bus.nc._subs) == subscriptions


def frames_of(response: httpx.Response) -> tuple[asyncio.Queue[str], asyncio.Task[None]]:
    """The event names of a stream's frames as they come, in a queue."""
    names: asyncio.Queue[str] = asyncio.Queue()

    async def read() -> None:
        event = "message"
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line == "" and event != "message":
                names.put_nowait(event)
                event = "message"

    return names, asyncio.create_task(read())


@pytest.mark.parametrize("writer", ["the renewal", "another stream opening"])
async def test_a_presence_that_lapsed_under_an_open_stream_is_written_again_and_re_read(
    stack: Stack, valkey: redis.Redis, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    """Valkey away for longer than the presence key lives (or restarted empty): a core that read
    it absent sent nothing meanwhile. Whoever writes the key again and finds it absent (this
    API's renewal, or a stream opening on any API) announces the lapse, and the open stream
    re-reads once every core has heard of it."""
    monkeypatch.setattr(screens_module, "RENEW_SECONDS", 3600.0)  # only the renewal we call
    gateway, screens = stack.api_app.state.gateway, stack.core.conversations.screens
    key = Keys(stack.namespace).operators_watching()
    async with stack.api.stream("GET", "/v1/events/stream") as response:
        assert response.status_code == 200
        names, reading = frames_of(response)
        assert [await asyncio.wait_for(names.get(), 10) for _ in range(2)] == ["ready", "resync"]
        await valkey.delete(key)
        await eventually(lambda: asyncio.sleep(0, not screens.present), what="core reading")
        if writer == "the renewal":
            await gateway.screens.renew()
        else:
            async with stack.api.stream("GET", "/v1/events/stream") as second:
                assert second.status_code == 200
        await eventually(lambda: asyncio.sleep(0, screens.present), what="the announcement")
        assert await valkey.exists(key)
        assert await asyncio.wait_for(names.get(), 10) == "resync"
        reading.cancel()
