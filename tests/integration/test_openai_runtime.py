"""The `openai` runtime: the official SDK against a local server speaking the chat-completions
wire format (streamed chunks, `tool_calls` in pieces), with tools under the revision's policies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.agent_fakes import FakeServers
from tests.conftest import Stack
from tests.integration.test_runtimes import (
    FAST,
    approve_pending,
    conversation_with,
    events_of,
    say,
    second_reply,
    stream_turn,
)

KEY_ENV = "SWITCHBOARD_TEST_MODEL_KEY"
pytestmark = [pytest.mark.core_settings(**FAST), pytest.mark.services("api")]


@pytest.fixture
def agents(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv(KEY_ENV, "sk-local-test-key")  # read at call time: no restart needed
    return stack


def model_revision(fakes: FakeServers, **extra: Any) -> dict[str, Any]:
    return {
        "runtime": "openai",
        "openai": {
            "base_url": fakes.model_url,
            "model": "fake-model",
            "api_key_env": KEY_ENV,
            "system_prompt": "You are Acme's support agent.",
            "temperature": 0.1,
            "max_history_turns": 10,
            "timeout_seconds": 2,
        },
        "fallback": "Sorry, our assistant is unavailable right now.",
        **extra,
    }


async def test_the_model_streams_tokens_to_sse_clients_and_sees_the_conversation(
    agents: Stack, fakes: FakeServers
) -> None:
    cid = await conversation_with(agents, model_revision(fakes), context_variables={"tier": "gold"})
    first = await say(agents, cid, "hello")
    assert first["text"] == "I know 0 earlier messages. You said: hello"

    frames = await stream_turn(agents, cid, "again")
    deltas = [data["text"] for event, data in frames if event == "delta"]
    assert deltas == ["I ", "know ", "2 ", "earlier ", "messages. ", "You ", "said: ", "again"]
    [complete] = [data for event, data in frames if event == "complete"]
    assert complete["text"] == "".join(deltas)

    request = fakes.fakes.seen("/v1/chat/completions")[-1]
    assert request.headers["authorization"] == "Bearer sk-local-test-key"
    body = request.json
    assert body["model"] == "fake-model"
    assert body["stream"] is True
    assert body["temperature"] == 0.1
    system = body["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("You are Acme's support agent.")
    assert '"tier": "gold"' in system["content"]
    assert [m["role"] for m in body["messages"][1:]] == ["user", "assistant", "user"]


async def test_a_refund_the_model_chooses_waits_for_approval_runs_once_and_the_reply_uses_it(
    agents: Stack, fakes: FakeServers
) -> None:
    revision = model_revision(
        fakes,
        tools=[
            {
                "name": "issue_refund",
                "description": "Refund an order.",
                "parameters": {"order_id": "string"},
                "url": fakes.tool_url("/refund"),
                "secret": "tool-secret-0123456789",
            }
        ],
        policies=[{"tool": "issue_refund", "decision": "require_approval"}],
    )
    cid = await conversation_with(agents, revision)
    held = await say(agents, cid, "please refund order 12345")
    assert held["session_status"] == "awaiting_approval"
    assert held["tool_calls"][0]["decision"] == "require_approval"
    assert fakes.fakes.tool_calls == {}  # nothing ran before a person decided
    offered = fakes.fakes.seen("/v1/chat/completions")[0].json["tools"]
    assert offered[0]["function"]["name"] == "issue_refund"
    assert offered[0]["function"]["parameters"]["required"] == ["order_id"]

    approval = await approve_pending(agents, cid)
    assert approval["payload"]["tool"] == "issue_refund"
    assert approval["payload"]["arguments"] == {"order_id": "12345"}
    replies = await second_reply(agents, cid, what="the model's reply after the approved refund")
    assert replies[1] == "Your refund is done, reference rf_12345_ok."
    assert list(fakes.fakes.tool_calls.values()) == [1]  # ran once
    [tool_request] = fakes.fakes.seen("/refund")
    assert tool_request.headers["x-switchboard-signature"].startswith("v1=")
    last = fakes.fakes.seen("/v1/chat/completions")[-1].json["messages"]
    assert last[-2]["tool_calls"][0]["id"] == "call_r1"
    assert last[-1] == {
        "role": "tool",
        "tool_call_id": "call_r1",
        "content": json.dumps({"refunded": True, "order_id": "12345", "refund_id": "rf_12345_ok"}),
    }
    conv = (await agents.api.get(f"/v1/conversations/{cid}")).json()
    assert conv["status"] == "active"


async def test_a_model_server_that_fails_once_is_retried_within_the_turn(
    agents: Stack, fakes: FakeServers
) -> None:
    fakes.fakes.failures_before_success["/v1/chat/completions"] = 1
    cid = await conversation_with(agents, model_revision(fakes))
    assert (await say(agents, cid, "hi"))["text"] == "I know 0 earlier messages. You said: hi"
    assert len(fakes.fakes.seen("/v1/chat/completions")) == 2


async def test_a_missing_api_key_gets_the_fallback_and_an_audit_event(
    agents: Stack, fakes: FakeServers
) -> None:
    revision = model_revision(fakes)
    revision["openai"]["api_key_env"] = "SWITCHBOARD_TEST_UNSET_KEY"
    cid = await conversation_with(agents, revision)
    assert (await say(agents, cid, "hi"))["text"] == revision["fallback"]
    [failed] = await events_of(agents, cid, "agent.failed")
    assert failed["data"]["reason"].startswith("api_key_missing")
    assert fakes.fakes.seen("/v1/chat/completions") == []
