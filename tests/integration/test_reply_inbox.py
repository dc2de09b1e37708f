"""Core's replies come back through one inbox per API process (shared/bus/replies.py): each
request gets the reply to its own envelope, deltas before the reply, a late reply is dropped with
nothing kept, and a client's retry is answered even when the first request waits in another
process. On the real nats-server; the API tests go through HTTP, core and a bot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from services.api.app import create_app
from services.api.gateway import Gateway
from shared.bus import Bus, ReplyInbox
from shared.envelopes import StreamDelta, TurnReply
from shared.http import HttpServer
from shared.settings import ApiSettings
from tests.agent_fakes import FakeServers
from tests.conftest import ADMIN_KEY, EMAIL_DOMAINS, Stack, eventually, settings_env

_enc = msgspec.json.Encoder()


def reply(envelope_id: str, conversation_id: str = "conv_a") -> bytes:
    return _enc.encode(
        TurnReply(
            envelope_id=envelope_id,
            conversation_id=conversation_id,
            outcome="answered",
            session_status="active",
        )
    )


@pytest.fixture
async def inbox(bus: Bus) -> AsyncIterator[ReplyInbox]:
    opened = ReplyInbox(bus)
    await opened.open()
    yield opened
    await opened.close()


async def test_each_waiter_gets_the_reply_to_its_own_envelope(bus: Bus, inbox: ReplyInbox) -> None:
    subject = bus.subjects.reply("conv_a", inbox.token)
    with inbox.expect("env_1") as first, inbox.expect("env_2") as second:
        await bus.publish_core(subject, reply("env_2"))
        await bus.publish_core(subject, reply("env_1"))
        one = await asyncio.wait_for(first.get(), 5)
        two = await asyncio.wait_for(second.get(), 5)
    assert (one.envelope_id, two.envelope_id) == ("env_1", "env_2")
    assert first.empty()
    assert second.empty()
    assert inbox.waiting == 0


async def test_undecodable_replies_are_dropped_with_a_warning_and_the_next_one_arrives(
    bus: Bus, inbox: ReplyInbox, caplog: pytest.LogCaptureFixture
) -> None:
    subject = bus.subjects.reply("conv_a", inbox.token)
    with inbox.expect("env_1") as replies:
        await bus.publish_core(subject, b"not json")
        await bus.publish_core(subject, b'{"envelope_id": "env_\xff"}')  # not UTF-8 inside
        await bus.publish_core(subject, reply("env_1"))
        got = await asyncio.wait_for(replies.get(), 5)
    assert got.envelope_id == "env_1"
    dropped = [r for r in caplog.records if r.getMessage().startswith("undecodable reply dropped")]
    assert len(dropped) == 2


async def test_deltas_arrive_in_order_and_before_their_reply(bus: Bus, inbox: ReplyInbox) -> None:
    words = [f"word{i} " for i in range(30)]
    with inbox.expect("env_s") as feed:
        for word in words:
            delta = StreamDelta(envelope_id="env_s", text=word)
            await bus.publish_core(bus.subjects.stream("conv_a", inbox.token), _enc.encode(delta))
        await bus.publish_core(bus.subjects.reply("conv_a", inbox.token), reply("env_s"))
        got = [await asyncio.wait_for(feed.get(), 5) for _ in range(len(words) + 1)]
    assert [g.text for g in got[:-1] if isinstance(g, StreamDelta)] == words
    assert isinstance(got[-1], TurnReply)


async def test_a_reply_after_its_request_gave_up_is_dropped_and_nothing_is_kept(
    bus: Bus, inbox: ReplyInbox
) -> None:
    with inbox.expect("env_late") as gave_up:
        pass  # the request timed out before core answered
    assert inbox.waiting == 0
    subject = bus.subjects.reply("conv_a", inbox.token)
    await bus.publish_core(subject, reply("env_late"))
    await bus.publish_core(subject, b"not json")  # dropped too, with a warning
    # Published after the late reply on the same subject: once it is here, so was the late one.
    with inbox.expect("env_next") as following:
        await bus.publish_core(subject, reply("env_next"))
        assert (await asyncio.wait_for(following.get(), 5)).envelope_id == "env_next"
    assert gave_up.empty()
    assert inbox.waiting == 0


async def test_another_inbox_and_the_conversation_subject_do_not_reach_the_inbox(
    bus: Bus, inbox: ReplyInbox
) -> None:
    with inbox.expect("env_x") as feed:
        await bus.publish_core(bus.subjects.reply("conv_a", "inbox_other"), reply("env_x"))
        await bus.publish_core(bus.subjects.reply("conv_a"), reply("env_x"))
        await bus.publish_core(bus.subjects.reply("conv_b", inbox.token), reply("env_x", "conv_b"))
        got = await asyncio.wait_for(feed.get(), 5)
        assert got.conversation_id == "conv_b"  # the first two went elsewhere
        assert feed.empty()


# Through HTTP, core and a bot ------------------------------------------------------------------

api_only = pytest.mark.services("api")  # API, core and the servers: no channel, no egress


async def gate_agent(stack: Stack, fakes: FakeServers) -> str:
    """An `http` bot that holds a message saying "wait" until the test opens its gate."""
    revision: dict[str, Any] = {
        "runtime": "http",
        "http": {"url": fakes.bot_url("/gate"), "secret": "s" * 20, "timeout_seconds": 30},
    }
    response = await stack.api.post("/v1/agents", json={"name": "Gate", "revision": revision})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture
async def api_process(stack: Stack) -> AsyncIterator[Any]:
    """Start an API process of our own on the stack's servers; returns (its gateway, a client)."""
    started: list[tuple[HttpServer, httpx.AsyncClient]] = []

    async def start(**settings: Any) -> tuple[Gateway, httpx.AsyncClient]:
        env = {**settings_env(stack.servers, stack.namespace), "email_domains": EMAIL_DOMAINS}
        app = create_app(ApiSettings(**{**env, "api_port": 0, **settings}))
        server = HttpServer(app, "127.0.0.1", 0)
        await server.start()
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}",
            headers={"x-api-key": ADMIN_KEY},
            timeout=20,
        )
        started.append((server, client))
        return app.state.gateway, client

    yield start
    for server, client in started:
        await client.aclose()
        await server.stop()


@api_only
async def test_two_turns_in_flight_in_one_conversation_each_get_their_own_reply(
    stack: Stack, fakes: FakeServers, api_process: Any
) -> None:
    gateway, api = await api_process()
    agent = await gate_agent(stack, fakes)
    cid = (await api.post("/v1/conversations", json={"agent_id": agent})).json()["id"]
    url = f"/v1/conversations/{cid}/turns"
    try:
        first = asyncio.create_task(api.post(url, json={"user_message": "please wait"}))
        await asyncio.wait_for(fakes.fakes.gated.wait(), 10)  # the first is at the bot
        second = asyncio.create_task(api.post(url, json={"user_message": "and then this"}))
        await eventually(lambda: _waiting(gateway, 2), what="both turns waiting in the inbox")
    finally:
        fakes.fakes.gate.set()
    assert (await first).json()["text"] == "echo: please wait"
    assert (await second).json()["text"] == "echo: and then this"
    assert gateway.inbox.waiting == 0


@api_only
async def test_a_reply_after_the_turn_timed_out_is_dropped_and_nothing_is_kept(
    stack: Stack, fakes: FakeServers, api_process: Any
) -> None:
    gateway, api = await api_process(turn_timeout_seconds=0.5)
    agent = await gate_agent(stack, fakes)
    cid = (await api.post("/v1/conversations", json={"agent_id": agent})).json()["id"]
    try:
        timed_out = await api.post(
            f"/v1/conversations/{cid}/turns", json={"user_message": "please wait"}
        )
        assert timed_out.status_code == 504, timed_out.text
        assert gateway.inbox.waiting == 0
    finally:
        fakes.fakes.gate.set()  # core answers now, to an inbox nobody waits at for it

    async def answered() -> bool:
        turns = await stack.core.store.turns_after(cid, 0, 10)
        return [t.content for t in turns] == ["please wait", "echo: please wait"]

    await eventually(answered, what="core's late answer in the transcript")
    # The inbox still works, and holds nothing for the late reply.
    after = await api.post(f"/v1/conversations/{cid}/turns", json={"user_message": "hello"})
    assert after.json()["text"] == "echo: hello"
    assert gateway.inbox.waiting == 0


@api_only
async def test_a_retry_through_another_api_process_gets_the_reply_of_the_first_request(
    stack: Stack, fakes: FakeServers, api_process: Any
) -> None:
    _, first_api = await api_process()
    second, second_api = await api_process()
    agent = await gate_agent(stack, fakes)
    cid = (await first_api.post("/v1/conversations", json={"agent_id": agent})).json()["id"]
    url, body = f"/v1/conversations/{cid}/turns", {"user_message": "please wait"}
    headers = {"idempotency-key": "retry-elsewhere"}
    try:
        first = asyncio.create_task(first_api.post(url, json=body, headers=headers))
        await asyncio.wait_for(fakes.fakes.gated.wait(), 10)  # core holds the first
        retry = asyncio.create_task(second_api.post(url, json=body, headers=headers))
        # The retry found its envelope stored, unanswered, and waits for the first one's reply.
        await eventually(lambda: _waiting(second, 1), what="the retry waiting for the reply")
    finally:
        fakes.fakes.gate.set()
    one, two = await first, await retry
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    assert one.json()["turn_id"] == two.json()["turn_id"]
    assert one.json()["text"] == two.json()["text"] == "echo: please wait"
    assert second.inbox.waiting == 0


async def _waiting(gateway: Gateway, count: int) -> bool:
    return gateway.inbox.waiting == count
