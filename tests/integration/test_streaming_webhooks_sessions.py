"""SSE and polling, signed webhooks with retries, and session types in usage and simulations."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from litestar import Litestar, Request, Response, post

from shared.http import HttpServer
from tests.conftest import Stack, eventually


async def open_conversation(stack: Stack, **body: Any) -> str:
    response = await stack.api.post("/v1/conversations", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]  # type: ignore[no-any-return]


# SSE and polling ------------------------------------------------------------------------------


async def read_sse(response: httpx.Response, count: int | None = None) -> list[tuple[str, str]]:
    """The (event, data) frames of a server-sent event stream: until it ends, or the first
    `count` (a stream that does not end by itself)."""
    frames: list[tuple[str, str]] = []
    event, data = "message", []
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "" and data:
            frames.append((event, "\n".join(data)))
            if len(frames) == count:
                break
            event, data = "message", []
    return frames


async def test_a_streamed_turn_sends_deltas_then_the_complete_reply(stack: Stack) -> None:
    cid = await open_conversation(stack)
    async with stack.api.stream(
        "POST",
        f"/v1/conversations/{cid}/turns/stream",
        json={"user_message": "how long does express shipping take?"},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = await read_sse(response)
    kinds = [kind for kind, _ in frames]
    assert kinds[-1] == "complete"
    assert kinds.count("delta") > 3
    assert set(kinds[:-1]) == {"delta"}
    complete = json.loads(frames[-1][1])
    streamed = "".join(json.loads(d)["text"] for k, d in frames if k == "delta")
    assert streamed == complete["text"]
    assert "1-2 business days" in complete["text"]
    assert complete["evidence"][0]["chunk_id"] == "shipping#0"
    assert complete["message_seqs"] == [1, 2]


async def test_a_streamed_turn_on_a_handed_off_conversation_completes_as_queued(
    stack: Stack,
) -> None:
    cid = await open_conversation(stack)
    await stack.api.post(f"/v1/conversations/{cid}/handoff")
    async with stack.api.stream(
        "POST", f"/v1/conversations/{cid}/turns/stream", json={"user_message": "hello?"}
    ) as response:
        frames = await read_sse(response)
    assert [k for k, _ in frames] == ["complete"]
    assert json.loads(frames[0][1])["queued"] is True


async def test_polling_returns_the_tail_and_never_rewinds(stack: Stack) -> None:
    cid = await open_conversation(stack)
    url = f"/v1/conversations/{cid}/messages"
    empty = (await stack.api.get(url, params={"since_seq": 0})).json()
    assert empty == {
        "conversation_id": cid,
        "session_status": "active",
        "messages": [],
        "next_seq": 0,
    }
    await stack.api.post(f"/v1/conversations/{cid}/turns", json={"user_message": "hello"})
    first = (await stack.api.get(url, params={"since_seq": 0})).json()
    assert [m["seq"] for m in first["messages"]] == [1, 2]
    assert first["next_seq"] == 2
    tail = (await stack.api.get(url, params={"since_seq": first["next_seq"]})).json()
    assert tail["messages"] == []
    assert tail["next_seq"] == 2  # an empty tail keeps the cursor where it was
    await stack.api.post(f"/v1/conversations/{cid}/turns", json={"user_message": "get me a human"})
    later = (await stack.api.get(url, params={"since_seq": 2})).json()
    assert [m["seq"] for m in later["messages"]] == [3, 4, 5]
    assert later["session_status"] == "waiting_for_human"
    assert (await stack.api.get(url, params={"since_seq": -1})).status_code == 422


# Webhooks -------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A customer's webhook endpoint: records every request; fails the first `fail_first`."""

    fail_first: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    accepted: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    def app(self) -> Litestar:
        @post("/hook", status_code=200)
        async def hook(request: Request[Any, Any, Any]) -> Response[str]:
            self.received.append((dict(request.headers), await request.body()))
            if len(self.received) <= self.fail_first:
                return Response("try later", status_code=503)
            self.accepted.append(self.received[-1])
            return Response("ok")

        return Litestar([hook], openapi_config=None, logging_config=None)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        """Listening on a free local port (`url` says where) until the block ends."""
        server = HttpServer(self.app(), "127.0.0.1", 0)
        await server.start()
        self.url = f"http://127.0.0.1:{server.port}/hook"
        try:
            yield self
        finally:
            await server.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver(fail_first=2).serving() as rec:
        yield rec


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """What a customer does: recompute HMAC-SHA256 over "<timestamp>." + body."""
    timestamp = headers["x-switchboard-timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(headers["x-switchboard-signature"], f"v1={expected.hexdigest()}")


async def test_webhooks_are_signed_retried_and_logged_for_live_sessions_only(
    stack: Stack, receiver: Receiver
) -> None:
    created = await stack.api.post(
        "/v1/webhooks",
        json={"url": receiver.url, "events": ["conversation.created", "handoff.started"]},
    )
    assert created.status_code == 201, created.text
    hook = created.json()
    secret = hook["secret"]
    listed = (await stack.api.get("/v1/webhooks")).json()["items"]
    assert listed[0]["id"] == hook["id"]
    assert "secret" not in listed[0]  # never shown again
    assert "secret" not in (await stack.api.get(f"/v1/webhooks/{hook['id']}")).json()

    test_cid = await open_conversation(stack, session_type="test")
    live_cid = await open_conversation(stack)
    await stack.api.post(
        f"/v1/conversations/{live_cid}/turns", json={"user_message": "I need a person"}
    )

    def delivered() -> list[dict[str, Any]]:
        return [
            json.loads(body) for headers, body in receiver.accepted if verify(secret, headers, body)
        ]

    async def both() -> list[dict[str, Any]] | None:
        events = delivered()
        return (
            events
            if {e["type"] for e in events} == {"conversation.created", "handoff.started"}
            else None
        )

    await eventually(both, timeout=15, what="both events delivered")
    assert all(verify(secret, h, b) for h, b in receiver.received)
    assert not verify("wrong-secret", *receiver.received[0])
    events = delivered()
    assert {e["conversation_id"] for e in events} == {live_cid}  # the test session fired nothing
    assert test_cid not in json.dumps(events)
    ids = [h["x-switchboard-event-id"] for h, _ in receiver.received]
    assert len(set(ids)) == 2
    assert len(ids) >= 4
    attempts = sorted(int(h["x-switchboard-delivery-attempt"]) for h, _ in receiver.received)
    assert max(attempts) >= 2

    async def logged() -> list[dict[str, Any]] | None:
        log = (await stack.api.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["items"]
        return log if sum(d["ok"] for d in log) == 2 else None

    log = await eventually(logged, what="both successful attempts in the delivery log")
    assert [d["status_code"] for d in log if not d["ok"]] == [503, 503]
    assert sum(d["ok"] for d in log) == 2
    assert abs(int(receiver.received[0][0]["x-switchboard-timestamp"]) - time.time()) < 60


async def test_a_webhook_url_must_be_http(stack: Stack) -> None:
    response = await stack.api.post("/v1/webhooks", json={"url": "file:///etc/passwd"})
    assert response.status_code == 422


# Session types ------------------------------------------------------------------------------


async def test_usage_counts_live_sessions_only(stack: Stack) -> None:
    before = (await stack.api.get("/v1/usage")).json()
    live = await open_conversation(stack)
    test = await open_conversation(stack, session_type="test")
    for cid in (live, test):
        reply = await stack.api.post(
            f"/v1/conversations/{cid}/turns", json={"user_message": "what are your hours?"}
        )
        assert reply.status_code == 200
    sim = await stack.api.post("/v1/simulations", json={"user_turns": ["hello", "hours?"]})
    assert sim.status_code == 201
    usage = (await stack.api.get("/v1/usage")).json()
    assert usage["conversations"].get("api", 0) - before["conversations"].get("api", 0) == 1
    assert usage["turns"].get("api", 0) - before["turns"].get("api", 0) == 2


async def test_a_simulation_replays_turns_read_only(stack: Stack) -> None:
    response = await stack.api.post(
        "/v1/simulations",
        json={
            "agent_id": "agent_acme_support",
            "user_turns": [
                "how long do refunds take?",
                "please refund order 12345",
                "status of order 67890",
            ],
        },
    )
    assert response.status_code == 201, response.text
    sim = response.json()
    assert sim["session_type"] == "simulation"
    turns = [(t["role"], t["content"]) for t in sim["transcript"]]
    assert turns[0] == ("user", "how long do refunds take?")
    assert "14 days" in turns[1][1]
    refund = sim["transcript"][3]
    assert refund["tool_calls"][0]["decision"] == "require_approval"
    assert refund["tool_calls"][0]["result"] is None  # never run
    assert turns[4] == ("user", "status of order 67890")  # queued behind the approval
    assert (await stack.api.get(f"/v1/conversations/{sim['conversation_id']}")).json()[
        "status"
    ] == "closed"
    pending = (await stack.api.get("/v1/approvals", params={"status": "pending"})).json()["items"]
    assert all(a["conversation_id"] != sim["conversation_id"] for a in pending)
    js = stack.core.bus.js
    info = await js.stream_info(stack.core.subjects.outbound_stream)
    assert info.state.last_seq == 0  # nothing ever left for a real channel


async def test_a_simulation_can_target_an_inactive_revision(stack: Stack) -> None:
    agent = (
        await stack.api.post(
            "/v1/agents", json={"name": "G", "revision": {"greeting": "old greeting"}}
        )
    ).json()
    old_revision = agent["active_revision_id"]
    await stack.api.post(f"/v1/agents/{agent['id']}/revisions", json={"greeting": "new greeting"})
    sim = (
        await stack.api.post(
            "/v1/simulations", json={"revision_id": old_revision, "user_turns": ["hi"]}
        )
    ).json()
    assert sim["revision_id"] == old_revision
    assert sim["transcript"][1]["content"] == "old greeting"
    missing = await stack.api.post(
        "/v1/simulations", json={"revision_id": "rev_nope", "user_turns": ["hi"]}
    )
    assert missing.status_code == 404


async def test_a_simulation_that_reaches_an_approval_says_so(stack: Stack) -> None:
    sim = await stack.api.post(
        "/v1/simulations",
        json={"user_turns": ["hi", "refund order 12345", "what are your hours?"]},
    )
    assert sim.status_code == 201, sim.text
    body = sim.json()
    assert body["outcome"] == "awaiting_approval"
    assert body["stopped"]["after_user_turn"] == 1
    assert body["stopped"]["tool"] == "issue_refund"
    assert body["stopped"]["arguments"] == {"order_id": "12345"}
    assert body["stopped"]["unanswered"] == ["what are your hours?"]
    completed = await stack.api.post("/v1/simulations", json={"user_turns": ["hours?"]})
    assert (completed.json()["outcome"], completed.json()["stopped"]) == ("completed", None)


async def test_simulations_need_turns(stack: Stack) -> None:
    assert (await stack.api.post("/v1/simulations", json={"user_turns": []})).status_code == 422
