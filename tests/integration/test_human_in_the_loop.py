"""Handoff, hand-back, queued messages and approvals, through API, JetStream, core and Valkey."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import Stack, eventually, make_key

pytestmark = pytest.mark.services("api")  # API, core and the servers: no channel, no egress


async def open_conversation(stack: Stack, **body: Any) -> dict[str, Any]:
    response = await stack.api.post("/v1/conversations", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def say(stack: Stack, cid: str, text: str) -> httpx.Response:
    return await stack.api.post(f"/v1/conversations/{cid}/turns", json={"user_message": text})


async def transcript(stack: Stack, cid: str) -> list[tuple[str, str, str]]:
    items = (await stack.api.get(f"/v1/conversations/{cid}/turns", params={"limit": 100})).json()
    return [(t["role"], t["author"]["kind"], t["content"]) for t in items["items"]]


async def status(stack: Stack, cid: str) -> str:
    return (await stack.api.get(f"/v1/conversations/{cid}")).json()["status"]  # type: ignore[no-any-return]


async def demo_like_agent(stack: Stack, name: str, **revision: Any) -> str:
    """A new agent with the demo one's knowledge base and tools, plus the test's revision fields."""
    demo = (await stack.api.get("/v1/agents/agent_acme_support/revisions")).json()["items"][0]
    created = await stack.api.post(
        "/v1/agents",
        json={
            "name": name,
            "revision": {
                "knowledge_base": demo["knowledge_base"],
                "tools": demo["tools"],
                **revision,
            },
        },
    )
    assert created.status_code == 201, created.text
    return created.json()["id"]  # type: ignore[no-any-return]


async def agent_with_refund_policy(stack: Stack, **policy: Any) -> str:
    """An agent like the demo one whose refund policy the test chooses."""
    return await demo_like_agent(
        stack,
        "Refunds",
        policies=[{"tool": "issue_refund", "decision": "require_approval", **policy}],
    )


# Handoff and hand-back -------------------------------------------------------------------------


async def test_operator_handoff_queues_messages_and_hand_back_answers_them_in_order(
    stack: Stack,
) -> None:
    conv = await open_conversation(stack)
    cid = conv["id"]
    took = await stack.api.post(f"/v1/conversations/{cid}/handoff", json={"reason": "vip"})
    assert took.status_code == 200
    assert took.json()["status"] == "waiting_for_human"

    first = await say(stack, cid, "how long do refunds take?")
    second = await say(stack, cid, "status of order 12345")
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["seq"] < second.json()["seq"]

    operator = await stack.api.post(
        f"/v1/conversations/{cid}/human-turns", json={"content": "Hi, Sam here. Looking into it."}
    )
    assert operator.status_code == 200
    assert operator.json()["status"] == "waiting_for_human"
    assert [r for r, _, _ in await transcript(stack, cid)].count("assistant") == 1  # Sam only

    back = await stack.api.post(
        f"/v1/conversations/{cid}/human-turns",
        json={"content": "Handing you back to our assistant.", "hand_back": True},
    )
    assert back.json()["status"] == "active"

    async def answered() -> list[tuple[str, str, str]] | None:
        turns = await transcript(stack, cid)
        return turns if len(turns) == 7 else None

    turns = await eventually(answered, what="both queued messages answered")
    assert turns[0][0] == "system"  # the handoff note
    assert turns[1:5] == [
        ("user", "end_user", "how long do refunds take?"),
        ("user", "end_user", "status of order 12345"),
        ("assistant", "operator", "Hi, Sam here. Looking into it."),
        ("assistant", "operator", "Handing you back to our assistant."),
    ]
    assert turns[5][1] == "agent"
    assert "14 days" in turns[5][2]
    assert turns[6] == ("assistant", "agent", "Order 12345 is shipped.")
    # An API client reads the operator's messages and the late answers from the transcript (above):
    # nothing delivers API messages, so nothing is queued for them on the broker.
    info = await stack.core.bus.js.stream_info(stack.core.subjects.outbound_stream)
    assert info.state.last_seq == 0

    after = await say(stack, cid, "thanks! what are your hours?")
    assert after.status_code == 200
    assert "Monday to Friday" in after.json()["text"]


async def test_illegal_transitions_are_409_with_the_current_status(stack: Stack) -> None:
    cid = (await open_conversation(stack))["id"]
    hand_back = await stack.api.post(
        f"/v1/conversations/{cid}/human-turns", json={"content": "x", "hand_back": True}
    )
    assert hand_back.status_code == 409
    assert hand_back.json()["error"]["details"]["status"] == "active"
    await stack.api.post(f"/v1/conversations/{cid}/handoff")
    again = await stack.api.post(f"/v1/conversations/{cid}/handoff")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "illegal_transition"
    assert again.json()["error"]["details"]["status"] == "waiting_for_human"


async def test_an_operator_may_close_the_conversation(stack: Stack) -> None:
    cid = (await open_conversation(stack))["id"]
    await stack.api.post(f"/v1/conversations/{cid}/handoff")
    closed = await stack.api.post(
        f"/v1/conversations/{cid}/human-turns", json={"content": "Bye!", "close": True}
    )
    assert closed.json()["status"] == "closed"
    assert (await say(stack, cid, "hello?")).status_code == 409


async def test_operator_routes_need_the_operator_scope(stack: Stack) -> None:
    cid = (await open_conversation(stack))["id"]
    async with stack.client(await make_key(stack, "client")) as client:
        refused = await client.post(f"/v1/conversations/{cid}/handoff")
        assert refused.status_code == 403
        assert (await client.get("/v1/approvals")).status_code == 403
    async with stack.client(await make_key(stack, "operator")) as operator:
        assert (await operator.post(f"/v1/conversations/{cid}/handoff")).status_code == 200


# Approvals -------------------------------------------------------------------------------------


async def request_refund(stack: Stack, agent_id: str | None = None) -> tuple[str, dict[str, Any]]:
    cid = (await open_conversation(stack, **({"agent_id": agent_id} if agent_id else {})))["id"]
    held = await say(stack, cid, "please refund order 12345")
    assert held.status_code == 200, held.text
    body = held.json()
    assert body["session_status"] == "awaiting_approval"
    assert body["tool_calls"][0]["decision"] == "require_approval"
    pending = (await stack.api.get("/v1/approvals", params={"status": "pending"})).json()["items"]
    approval = next(a for a in pending if a["conversation_id"] == cid)
    return cid, approval


async def test_approve_runs_the_tool_and_answers_what_queued_meanwhile(stack: Stack) -> None:
    cid, approval = await request_refund(stack)
    assert approval["subject_kind"] == "tool_call"
    assert approval["payload"]["tool"] == "issue_refund"
    assert approval["payload"]["arguments"] == {"order_id": "12345"}
    assert approval["approver_role"] == "operator"
    assert approval["status"] == "pending"
    assert approval["timeout_at"] > approval["created_at"]

    queued = [await say(stack, cid, "any news?"), await say(stack, cid, "what are your hours?")]
    assert [q.status_code for q in queued] == [202, 202]
    waiting_notices = [t for t in await transcript(stack, cid) if t[1] == "system"]
    assert len(waiting_notices) == 1  # "still waiting": once per wait, not per message

    resolved = await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve",
        json={"decision": "approve", "note": "fine", "reviewer": "alex"},
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["status"] == "approved"
    # The reviewer is the calling key; the deprecated body field is ignored.
    assert resolved.json()["reviewer"] == "key_bootstrap"

    async def done() -> list[tuple[str, str, str]] | None:
        turns = await transcript(stack, cid)
        return turns if "Monday to Friday" in turns[-1][2] else None

    turns = await eventually(done, what="the refund and the queued answers")
    texts = [t[2] for t in turns]
    refunded = texts.index("Done: the refund for order 12345 has been issued.")
    assert refunded < texts.index(turns[-1][2])
    assert await status(stack, cid) == "active"
    again = await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve", json={"decision": "reject"}
    )
    assert again.status_code == 409
    assert again.json()["error"]["details"]["status"] == "approved"
    assert (await stack.api.get(f"/v1/approvals/{approval['id']}")).json()["note"] == "fine"


async def test_reject_sends_a_safe_message_and_closes(stack: Stack) -> None:
    cid, approval = await request_refund(stack)
    resolved = await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve",
        json={"decision": "reject", "note": "outside the return window"},
    )
    assert resolved.json()["status"] == "rejected"
    await eventually(lambda: _equals(status(stack, cid), "closed"), what="the close")
    last = (await transcript(stack, cid))[-1]
    assert last[:2] == ("system", "system")  # a notice from the gateway, not the agent's words
    assert "couldn't get that approved" in last[2]
    assert "follow up" not in last[2]  # the conversation is closed: nobody will
    assert not any("refund for order" in t[2] for t in await transcript(stack, cid))
    assert (await stack.api.get(f"/v1/conversations/{cid}")).json()["closed_reason"] == (
        "approval_rejected"
    )


async def test_closed_reason_is_set_only_on_closed_conversations(stack: Stack) -> None:
    cid = (await open_conversation(stack))["id"]
    ask = await say(stack, cid, "can I talk to a human please")
    assert ask.json()["session_status"] == "waiting_for_human"
    assert (await stack.api.get(f"/v1/conversations/{cid}")).json()["closed_reason"] is None
    back = await stack.api.post(
        f"/v1/conversations/{cid}/human-turns", json={"content": "back", "hand_back": True}
    )
    assert back.json()["status"] == "active"
    assert back.json()["closed_reason"] is None
    closed = await stack.api.post(f"/v1/conversations/{cid}/close", json={"reason": "done"})
    assert closed.json()["closed_reason"] == "done"


async def test_the_still_waiting_notice_is_a_system_turn(stack: Stack) -> None:
    cid, _ = await request_refund(stack)
    await say(stack, cid, "any news?")
    notices = [t for t in await transcript(stack, cid) if t[1] == "system"]
    assert [t[0] for t in notices] == ["system"]


async def test_reject_with_on_reject_continue_keeps_the_conversation_going(stack: Stack) -> None:
    agent_id = await agent_with_refund_policy(stack, on_reject="continue")
    cid, approval = await request_refund(stack, agent_id)
    await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve",
        json={"decision": "reject", "note": "order already refunded"},
    )
    await eventually(lambda: _equals(status(stack, cid), "active"), what="active again")
    assert "order already refunded" in (await transcript(stack, cid))[-1][2]


async def test_an_undecided_approval_times_out_even_across_a_core_restart(stack: Stack) -> None:
    agent_id = await agent_with_refund_policy(
        stack, timeout_seconds=1.5, fallback_message="Timed out, sorry."
    )
    cid, approval = await request_refund(stack, agent_id)
    await stack.restart_core()  # the deadline lives in Valkey, not in the old process
    await eventually(
        lambda: _equals(status(stack, cid), "closed"),
        timeout=15,
        what="the timeout to close the conversation",
    )
    assert (await stack.api.get(f"/v1/approvals/{approval['id']}")).json()["status"] == "timed_out"
    assert (await transcript(stack, cid))[-1][2] == "Timed out, sorry."
    conv = (await stack.api.get(f"/v1/conversations/{cid}")).json()
    assert conv["closed_reason"] == "approval_timed_out"
    late = await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve", json={"decision": "approve"}
    )
    assert late.status_code == 409


async def test_an_approval_needs_its_approver_role(stack: Stack) -> None:
    agent_id = await agent_with_refund_policy(stack, approver_role="admin")
    cid, approval = await request_refund(stack, agent_id)
    async with stack.client(await make_key(stack, "operator")) as operator:
        refused = await operator.post(
            f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve",
            json={"decision": "approve"},
        )
    assert refused.status_code == 403
    assert (await stack.api.get(f"/v1/approvals/{approval['id']}")).json()["status"] == "pending"


async def test_an_approval_of_another_conversation_is_404(stack: Stack) -> None:
    _, approval = await request_refund(stack)
    other = (await open_conversation(stack))["id"]
    response = await stack.api.post(
        f"/v1/conversations/{other}/approvals/{approval['id']}/resolve",
        json={"decision": "approve"},
    )
    assert response.status_code == 404


# Audit -------------------------------------------------------------------------------------------


async def test_every_state_change_is_in_the_audit_trail(stack: Stack) -> None:
    cid, approval = await request_refund(stack)
    await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve", json={"decision": "reject"}
    )
    await eventually(lambda: _equals(status(stack, cid), "closed"), what="the close")
    events = (await stack.api.get(f"/v1/conversations/{cid}/events")).json()["items"]
    types = [e["type"] for e in events]
    assert types[0] == "conversation.created"
    assert "approval.requested" in types
    assert "approval.resolved" in types
    changes = [
        (e["data"]["from"], e["data"]["to"])
        for e in events
        if e["type"] == "conversation.status_changed"
    ]
    assert changes == [("active", "awaiting_approval"), ("awaiting_approval", "closed")]
    assert all(e["occurred_at"] and e["actor"] for e in events)


async def _equals(coro: Any, expected: Any) -> bool:
    return bool(await coro == expected)


async def _at_least(coro: Any, n: int) -> Any:
    items = await coro
    return items if len(items) >= n else None
