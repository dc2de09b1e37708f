"""Bring your own agent: the `http` runtime against real local bots, customers' HTTP tools under
the revision's policies, and what the agent sees of a turn."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from shared.envelopes import InboundMessage
from shared.identity import make_identifier
from shared.models import utcnow
from shared.signing import verify
from tests.agent_fakes import FakeServers
from tests.conftest import Stack, eventually

SECRET = "bot-secret-0123456789"
# Small budgets so failures reach the fallback quickly.
FAST = {"agent_turn_budget_seconds": 1.5, "agent_retry_backoff_seconds": 0.05}


pytestmark = pytest.mark.core_settings(**FAST)


@pytest.fixture
def agents(stack: Stack) -> Stack:
    return stack


async def make_agent(stack: Stack, revision: dict[str, Any], name: str = "Bot") -> dict[str, Any]:
    response = await stack.api.post("/v1/agents", json={"name": name, "revision": revision})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def open_conversation(stack: Stack, agent_id: str, **fields: Any) -> str:
    response = await stack.api.post("/v1/conversations", json={"agent_id": agent_id, **fields})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def conversation_with(stack: Stack, revision: dict[str, Any], **fields: Any) -> str:
    """A new agent on this revision, and a conversation with it: the conversation's id."""
    agent = await make_agent(stack, revision)
    return await open_conversation(stack, agent["id"], **fields)


async def say(stack: Stack, cid: str, text: str) -> dict[str, Any]:
    response = await stack.api.post(f"/v1/conversations/{cid}/turns", json={"user_message": text})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def stream_turn(stack: Stack, cid: str, text: str) -> list[tuple[str, Any]]:
    """A turn over server-sent events: its (event, data) frames in order."""
    frames: list[tuple[str, Any]] = []
    async with stack.api.stream(
        "POST", f"/v1/conversations/{cid}/turns/stream", json={"user_message": text}
    ) as response:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                frames.append((event, json.loads(line.split(":", 1)[1])))
    return frames


async def assistant_turns(stack: Stack, cid: str) -> list[str]:
    turns = await stack.core.store.turns_after(cid, 0, 100)
    return [t.content for t in turns if t.role == "assistant"]


async def approve_pending(stack: Stack, cid: str) -> dict[str, Any]:
    """Approve the conversation's one pending approval; returns the approval as it was listed."""
    pending = (await stack.api.get("/v1/approvals", params={"status": "pending"})).json()
    [approval] = [a for a in pending["items"] if a["conversation_id"] == cid]
    response = await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve",
        json={"decision": "approve"},
    )
    assert response.status_code == 200, response.text
    return dict(approval)


async def second_reply(stack: Stack, cid: str, what: str) -> list[str]:
    """Wait for the conversation's second assistant turn; returns both."""

    async def replied() -> list[str]:
        turns = await assistant_turns(stack, cid)
        return turns if len(turns) == 2 else []

    return await eventually(replied, what=what)


async def events_of(stack: Stack, cid: str, event_type: str) -> list[dict[str, Any]]:
    response = await stack.api.get(f"/v1/conversations/{cid}/events", params={"limit": 100})
    return [e for e in response.json()["items"] if e["type"] == event_type]


def http_revision(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "runtime": "http",
        "http": {"url": url, "secret": SECRET, "timeout_seconds": 0.5},
        "fallback": "Sorry, our assistant is unavailable right now.",
        **extra,
    }


async def test_a_bot_gets_the_signed_context_and_its_text_is_the_reply(
    agents: Stack, fakes: FakeServers
) -> None:
    agent = await make_agent(agents, http_revision(fakes.bot_url("/echo")))
    cid = await open_conversation(agents, agent["id"], context_variables={"plan": "gold"})
    body = await say(agents, cid, "hello bot")
    assert body["text"] == "echo: hello bot"
    assert await assistant_turns(agents, cid) == ["echo: hello bot"]

    [request] = fakes.fakes.seen("/echo")
    headers = request.headers
    assert verify(
        SECRET, headers["x-switchboard-timestamp"], headers["x-switchboard-signature"], request.body
    )
    context = request.json
    assert context["conversation"]["id"] == cid
    assert context["conversation"]["channel"] == "api"
    assert context["conversation"]["revision_id"] == agent["active_revision_id"]
    assert context["message"]["text"] == "hello bot"
    assert context["context_variables"] == {"plan": "gold"}
    assert context["end_user"]["id"]


async def test_the_bot_secret_is_write_only(agents: Stack, fakes: FakeServers) -> None:
    tool = {"name": "refund", "url": fakes.tool_url("/refund"), "secret": "tool-secret-abcdef0123"}
    agent = await make_agent(agents, http_revision(fakes.bot_url("/echo"), tools=[tool]))
    for path in (f"/v1/agents/{agent['id']}", f"/v1/agents/{agent['id']}/revisions", "/v1/agents"):
        text = (await agents.api.get(path)).text
        assert SECRET not in text, path
        assert "tool-secret" not in text, path
    revision = (await agents.api.get(f"/v1/agents/{agent['id']}/revisions")).json()["items"][0]
    assert revision["runtime"] == "http"
    assert revision["http"]["url"] == fakes.bot_url("/echo")


async def test_an_http_runtime_without_its_settings_is_a_precise_422(agents: Stack) -> None:
    response = await agents.api.post(
        "/v1/agents", json={"name": "Bot", "revision": {"runtime": "http"}}
    )
    assert response.status_code == 422
    assert response.json()["error"]["details"]["reason"] == "missing_runtime_settings"
    response = await agents.api.post(
        "/v1/agents",
        json={"name": "Bot", "revision": {"runtime": "http", "http": {"url": "ftp://x"}}},
    )
    assert response.status_code == 422


async def test_a_slow_bot_within_its_timeout_is_answered(agents: Stack, fakes: FakeServers) -> None:
    revision = http_revision(fakes.bot_url("/slow"))
    revision["http"]["timeout_seconds"] = 1.2
    cid = await conversation_with(agents, revision)
    assert (await say(agents, cid, "take your time"))["text"] == "slowly: take your time"
    assert len(fakes.fakes.seen("/slow")) == 1


async def test_a_bot_that_fails_twice_is_retried_within_the_turn(
    agents: Stack, fakes: FakeServers
) -> None:
    fakes.fakes.failures_before_success["/echo"] = 2
    cid = await conversation_with(agents, http_revision(fakes.bot_url("/echo")))
    assert (await say(agents, cid, "again"))["text"] == "echo: again"
    assert len(fakes.fakes.seen("/echo")) == 3
    assert await events_of(agents, cid, "agent.failed") == []


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/hang", "timeout"), ("/error", "http_500"), ("/garbage", "invalid_answer")],
)
async def test_a_bot_that_never_answers_well_gets_the_fallback_once_and_an_audit_event(
    agents: Stack, fakes: FakeServers, path: str, reason: str
) -> None:
    cid = await conversation_with(agents, http_revision(fakes.bot_url(path)))
    body = await say(agents, cid, "anyone there?")
    assert body["text"] == "Sorry, our assistant is unavailable right now."
    assert await assistant_turns(agents, cid) == [body["text"]]  # never silence, never twice
    [failed] = await events_of(agents, cid, "agent.failed")
    assert failed["data"]["runtime"] == "http"
    assert failed["data"]["reason"].startswith(reason)
    assert failed["data"]["attempts"] >= 2  # retried within the budget first
    assert len(fakes.fakes.seen(path)) == failed["data"]["attempts"]


async def test_an_unreachable_bot_gets_the_fallback(agents: Stack) -> None:
    from services.supervisor.embedded import free_port

    cid = await conversation_with(agents, http_revision(f"http://127.0.0.1:{free_port()}/bot"))
    body = await say(agents, cid, "hello?")
    assert body["text"] == "Sorry, our assistant is unavailable right now."
    [failed] = await events_of(agents, cid, "agent.failed")
    assert failed["data"]["reason"] == "ConnectError"


async def test_a_streaming_bot_streams_its_pieces_to_sse_clients(
    agents: Stack, fakes: FakeServers
) -> None:
    cid = await conversation_with(agents, http_revision(fakes.bot_url("/stream")))
    frames = await stream_turn(agents, cid, "go")
    deltas = [data["text"] for event, data in frames if event == "delta"]
    assert deltas == ["Streaming ", "reply ", "to: ", "go"]
    [complete] = [data for event, data in frames if event == "complete"]
    assert complete["text"] == "Streaming reply to: go"
    assert await assistant_turns(agents, cid) == ["Streaming reply to: go"]


async def test_a_bot_can_hand_off_to_a_person(agents: Stack, fakes: FakeServers) -> None:
    cid = await conversation_with(agents, http_revision(fakes.bot_url("/handoff")))
    body = await say(agents, cid, "I need help")
    assert body["text"] == "A colleague will take it from here."
    assert body["session_status"] == "waiting_for_human"


def tool_revision(fakes: FakeServers, decision: str) -> dict[str, Any]:
    return http_revision(
        fakes.bot_url("/tools"),
        tools=[
            {
                "name": "lookup_plan",
                "description": "The customer's plan for an order.",
                "parameters": {"order_id": "string"},
                "url": fakes.tool_url("/plan"),
            }
        ],
        policies=[{"tool": "lookup_plan", "decision": decision}],
    )


async def ask_for_the_plan(stack: Stack, fakes: FakeServers, decision: str) -> dict[str, Any]:
    """A bot whose `lookup_plan` tool is under `decision`, asked to use it: the turn's body."""
    cid = await conversation_with(stack, tool_revision(fakes, decision))
    return await say(stack, cid, "use lookup_plan 12345")


async def test_an_allowed_tool_runs_once_and_its_result_goes_back_to_the_bot(
    agents: Stack, fakes: FakeServers
) -> None:
    body = await ask_for_the_plan(agents, fakes, "allow")
    assert body["text"] == 'lookup_plan allow: {"plan": "gold", "order_id": "12345"}'
    assert body["tool_calls"][0]["name"] == "lookup_plan"
    assert body["tool_calls"][0]["result"] == {"plan": "gold", "order_id": "12345"}
    [key] = list(fakes.fakes.tool_calls)
    assert fakes.fakes.tool_calls[key] == 1
    assert key
    bot_steps = fakes.fakes.seen("/tools")
    assert [len(r.json["tool_results"]) for r in bot_steps] == [0, 1]
    assert bot_steps[0].json["tools"][0]["parameters"] == {
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
    }


async def test_a_denied_tool_never_runs_and_the_bot_is_told(
    agents: Stack, fakes: FakeServers
) -> None:
    body = await ask_for_the_plan(agents, fakes, "deny")
    assert body["text"] == 'lookup_plan deny: {"error": "denied by policy"}'
    assert fakes.fakes.tool_calls == {}


@pytest.mark.core_settings(agent_turn_budget_seconds=30)
async def test_a_crash_between_the_tool_call_and_the_reply_does_not_call_the_tool_twice(
    agents: Stack, fakes: FakeServers
) -> None:
    """Core runs the tool, records its result, asks the bot for the reply, and dies while the
    bot thinks. The redelivered message finishes the turn from the recorded result."""
    revision = tool_revision(fakes, "allow")
    revision["http"]["timeout_seconds"] = 30
    cid = await conversation_with(agents, revision)
    fakes.fakes.hold_tool_step = asyncio.Event()
    fakes.fakes.hold_tool_step.set()
    env = InboundMessage(
        id="env_tool_crash",
        channel="api",
        received_at=utcnow(),
        conversation_id=cid,
        text="use lookup_plan 12345",
    )
    bus = agents.core.bus
    subject = bus.subjects.inbound("api", cid)
    await bus.publish(subject, msgspec.json.encode(env), msg_id=env.id)
    await eventually(fakes.fakes.held.wait, what="the bot to be asked with the tool's result")
    assert sum(fakes.fakes.tool_calls.values()) == 1
    # kill -9: the handler is cancelled mid-turn, nothing acked; a fresh core takes over, and
    # JetStream redelivers the message once its (shortened) ack wait has passed.
    # Core finishes the message in hand on a graceful stop, so the kill cancels that work itself.
    applying = [
        task
        for task in asyncio.all_tasks()
        if task.get_coro().__qualname__.endswith("PartitionConsumer._apply_one")
    ]
    assert len(applying) == 1
    applying[0].cancel()
    fakes.fakes.hold_tool_step = None
    fakes.fakes.release.set()
    await agents.restart_core(**FAST, ack_wait_seconds=1.0)

    async def answered() -> list[str]:
        return await assistant_turns(agents, cid)

    replies = await eventually(answered, what="the redelivered turn to be answered")
    assert await events_of(agents, cid, "agent.failed") == []
    assert replies == ['lookup_plan allow: {"plan": "gold", "order_id": "12345"}']
    assert sum(fakes.fakes.tool_calls.values()) == 1  # the tool acted once


async def test_the_context_carries_the_end_users_turns_from_every_channel(
    agents: Stack, fakes: FakeServers
) -> None:
    phone = "+14155550177"
    sms = InboundMessage(
        id="env_sms_history",
        channel="sms",
        received_at=utcnow(),
        text="my order 12345 is late",
        sender=make_identifier("phone", phone),
        recipient="+15550001111",
    )
    bus = agents.core.bus
    await bus.publish(
        bus.subjects.inbound("sms", sms.routing_key), msgspec.json.encode(sms), msg_id=sms.id
    )

    async def sms_answered() -> bool:
        page = await agents.core.store.list_conversations(cursor=None, limit=10, filters={})
        convs = [c for c in page.items if c.channel == "sms"]
        return bool(convs) and len(await assistant_turns(agents, convs[0].id)) == 1

    await eventually(sms_answered, what="the SMS to be answered")
    agent = await make_agent(agents, http_revision(fakes.bot_url("/echo")))
    cid = await open_conversation(
        agents, agent["id"], identity={"channel": "sms", "identifier": phone}
    )
    await say(agents, cid, "any news?")
    context = fakes.fakes.seen("/echo")[-1].json
    assert [(t["channel"], t["role"]) for t in context["history"]] == [
        ("sms", "user"),
        ("sms", "assistant"),
    ]
    assert context["history"][0]["text"] == "my order 12345 is late"
    assert {"kind": "phone", "value": phone} in context["end_user"]["identities"]
    assert context["message"]["channel"] == "api"


async def test_a_bots_call_held_for_approval_runs_once_approved_and_the_bot_writes_the_reply(
    agents: Stack, fakes: FakeServers
) -> None:
    revision = http_revision(
        fakes.bot_url("/tools"),
        tools=[
            {
                "name": "issue_refund",
                "parameters": {"order_id": "string"},
                "url": fakes.tool_url("/refund"),
            }
        ],
        policies=[{"tool": "issue_refund", "decision": "require_approval"}],
    )
    cid = await conversation_with(agents, revision)
    held = await say(agents, cid, "use issue_refund 67890")
    assert held["session_status"] == "awaiting_approval"
    assert fakes.fakes.tool_calls == {}
    await approve_pending(agents, cid)
    replies = await second_reply(agents, cid, what="the bot's reply after the approval")
    result = {"refunded": True, "order_id": "67890", "refund_id": "rf_67890_ok"}
    assert replies[1] == f"issue_refund approved: {json.dumps(result)}"
    assert list(fakes.fakes.tool_calls.values()) == [1]
    last_step = fakes.fakes.seen("/tools")[-1].json
    assert last_step["message"]["text"] == "use issue_refund 67890"  # the turn it resumes
