"""A slow agent delays only its own conversation: through the whole stack, with an `http` bot
whose call for one conversation is held on an event the test controls."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.agent_fakes import FakeServers
from tests.conftest import Stack, eventually

pytestmark = pytest.mark.services("api")  # API, core and the servers: no channel, no egress


async def open_conversation(stack: Stack, agent_id: str) -> str:
    response = await stack.api.post("/v1/conversations", json={"agent_id": agent_id})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def turn(stack: Stack, cid: str, text: str) -> httpx.Response:
    return await stack.api.post(f"/v1/conversations/{cid}/turns", json={"user_message": text})


async def transcript(stack: Stack, cid: str) -> list[str]:
    return [t.content for t in await stack.core.store.turns_after(cid, 0, 100)]


async def test_a_held_agent_call_does_not_delay_another_conversation_on_its_partition(
    stack: Stack, fakes: FakeServers
) -> None:
    await stack.restart_core(agent_turn_budget_seconds=30)
    revision: dict[str, Any] = {
        "runtime": "http",
        "http": {"url": fakes.bot_url("/gate"), "secret": "s" * 20, "timeout_seconds": 30},
    }
    response = await stack.api.post("/v1/agents", json={"name": "Gate", "revision": revision})
    assert response.status_code == 201, response.text
    agent = response.json()["id"]
    subjects = stack.core.subjects
    a = await open_conversation(stack, agent)
    b = await open_conversation(stack, agent)
    while subjects.partition_of(b) != subjects.partition_of(a):
        b = await open_conversation(stack, agent)
    consumer = stack.core.owner.consumers[subjects.partition_of(a)]

    try:
        first = asyncio.create_task(turn(stack, a, "please wait"))
        await asyncio.wait_for(fakes.fakes.gated.wait(), 10)  # A's agent call is now held
        second = asyncio.create_task(turn(stack, a, "second"))

        async def a_second_queued_in_core() -> bool:
            return sum(1 for h in consumer.held.values() if h.key == a) == 2

        await eventually(a_second_queued_in_core, what="A's second message held behind its first")

        answered = await turn(stack, b, "hello from B")
        assert answered.status_code == 200, answered.text
        assert answered.json()["text"] == "echo: hello from B"
        # B was answered while A's first call is still held, and A's second still waits behind it.
        assert not first.done()
        assert not second.done()
        assert await transcript(stack, a) == ["please wait"]
        assert [r.json["message"]["text"] for r in fakes.fakes.seen("/gate")] == [
            "please wait",
            "hello from B",
        ]
    finally:
        fakes.fakes.gate.set()  # released here, or on a failure so nothing is left held
    assert (await first).json()["text"] == "echo: please wait"
    assert (await second).json()["text"] == "echo: second"
    assert await transcript(stack, a) == [
        "please wait",
        "echo: please wait",
        "second",
        "echo: second",
    ]
