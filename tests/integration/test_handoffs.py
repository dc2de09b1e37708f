"""Handoff records, claims, identity from the key, and what happens while a person is on the way."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.conftest import Stack, eventually
from tests.integration.test_human_in_the_loop import (
    demo_like_agent,
    open_conversation,
    request_refund,
    say,
    status,
    transcript,
)

pytestmark = pytest.mark.services("api")  # API, core and the servers: no channel, no egress


async def operator_key(stack: Stack, display_name: str, scope: str = "operator") -> str:
    created = await stack.api.post(
        "/v1/api-keys",
        json={"name": display_name.lower(), "scopes": [scope], "display_name": display_name},
    )
    assert created.status_code == 201, created.text
    assert created.json()["display_name"] == display_name
    return str(created.json()["key"])


async def handed_off(stack: Stack, **conversation: Any) -> tuple[str, dict[str, Any]]:
    """A conversation whose user asked for a person, and its handoff record."""
    cid = (await open_conversation(stack, **conversation))["id"]
    reply = await say(stack, cid, "I want to talk to a human")
    assert reply.json()["session_status"] == "waiting_for_human", reply.text
    conv = (await stack.api.get(f"/v1/conversations/{cid}")).json()
    assert conv["handoff_id"], conv
    handoff = (await stack.api.get(f"/v1/handoffs/{conv['handoff_id']}")).json()
    return cid, handoff


async def ids(client: httpx.AsyncClient, status: str) -> list[str]:
    page = (await client.get("/v1/handoffs", params={"status": status})).json()
    return [h["id"] for h in page["items"]]


async def test_a_handoff_is_a_record_listed_by_status_from_its_index(stack: Stack) -> None:
    first_cid, first = await handed_off(stack)
    second_cid, second = await handed_off(stack)
    assert first["status"] == "requested"
    assert first["conversation_id"] == first_cid
    assert first["reason"] == "transfer_call"
    assert first["channel"] == "api"
    assert first["requested_by"] == "agent"
    assert first["assignee"] is None
    # Newest first.
    assert await ids(stack.api, "requested") == [second["id"], first["id"]]
    assert await ids(stack.api, "assigned") == []
    ana = await operator_key(stack, "Ana")
    async with stack.client(ana) as client:
        claimed = await client.post(f"/v1/handoffs/{first['id']}/claim")
        assert claimed.status_code == 200, claimed.text
        assert claimed.json()["status"] == "assigned"
        assert claimed.json()["assignee_name"] == "Ana"
        assert await ids(client, "requested") == [second["id"]]
        assert await ids(client, "assigned") == [first["id"]]
        # While Ana has it, the conversation's assigned agent is Ana's key.
        conv = (await client.get(f"/v1/conversations/{first_cid}")).json()
        assert conv["assigned_agent_id"] == claimed.json()["assignee"]
        back = await client.post(
            f"/v1/conversations/{first_cid}/human-turns", json={"content": "Hi!", "hand_back": True}
        )
        assert back.status_code == 200, back.text
    resolved = (await stack.api.get(f"/v1/handoffs/{first['id']}")).json()
    assert (resolved["status"], resolved["outcome"]) == ("resolved", "handed_back")
    assert await ids(stack.api, "resolved") == [first["id"]]
    conv = (await stack.api.get(f"/v1/conversations/{first_cid}")).json()
    assert conv["assigned_agent_id"] == "agent_acme_support"
    assert conv["handoff_id"] is None
    closed = await stack.api.post(f"/v1/conversations/{second_cid}/close", json={})
    assert closed.status_code == 200
    second = (await stack.api.get(f"/v1/handoffs/{second['id']}")).json()
    assert (second["status"], second["outcome"]) == ("resolved", "closed")


async def test_concurrent_claims_exactly_one_wins_and_the_losers_learn_who(
    stack: Stack,
) -> None:
    _, handoff = await handed_off(stack)
    names = ["Ana", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal"]
    keys = [await operator_key(stack, name) for name in names]
    clients = [stack.client(key) for key in keys]
    try:
        results = await asyncio.gather(
            *(c.post(f"/v1/handoffs/{handoff['id']}/claim") for c in clients)
        )
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [409] * 7, [r.text for r in results]
    winner = next(r for r in results if r.status_code == 200).json()
    for loser in (r.json()["error"] for r in results if r.status_code == 409):
        assert loser["code"] == "conflict"
        assert loser["details"]["assignee"] == winner["assignee"]
        assert winner["assignee_name"] in loser["message"]
    record = (await stack.api.get(f"/v1/handoffs/{handoff['id']}")).json()
    assert (record["assignee"], record["assignee_name"]) == (
        winner["assignee"],
        winner["assignee_name"],
    )
    conv = (await stack.api.get(f"/v1/conversations/{handoff['conversation_id']}")).json()
    assert conv["assigned_agent_id"] == winner["assignee"]
    events = (await stack.api.get(f"/v1/conversations/{handoff['conversation_id']}/events")).json()
    assert [e["type"] for e in events["items"]].count("handoff.assigned") == 1


async def test_only_the_assignee_may_write_and_an_admin_may_reassign(stack: Stack) -> None:
    cid, handoff = await handed_off(stack)
    ana, bo = await operator_key(stack, "Ana"), await operator_key(stack, "Bo")
    async with stack.client(ana) as a, stack.client(bo) as b:
        # The first operator to answer an unclaimed handoff claims it.
        first = await a.post(f"/v1/conversations/{cid}/human-turns", json={"content": "Ana here"})
        assert first.status_code == 200, first.text
        refused = await b.post(f"/v1/conversations/{cid}/human-turns", json={"content": "Bo here"})
        assert refused.status_code == 403
        assert refused.json()["error"]["details"]["reason"] == "not_assignee"
        assert refused.json()["error"]["details"]["assignee_name"] == "Ana"
        not_admin = await b.post(f"/v1/handoffs/{handoff['id']}/claim", json={"reassign": True})
        assert not_admin.status_code == 403
        taken = await stack.api.post(f"/v1/handoffs/{handoff['id']}/claim", json={"reassign": True})
        assert taken.status_code == 200
        assert taken.json()["assignee"] == "key_bootstrap"
        assert (
            await a.post(f"/v1/conversations/{cid}/human-turns", json={"content": "still me?"})
        ).status_code == 403
    turns = (await stack.api.get(f"/v1/conversations/{cid}/turns")).json()["items"]
    mine = [t for t in turns if t["author"]["kind"] == "operator"]
    assert [(t["content"], t["author"]["name"]) for t in mine] == [("Ana here", "Ana")]


async def test_the_reviewer_of_an_approval_is_the_calling_key(stack: Stack) -> None:
    cid, approval = await request_refund(stack)
    cy = await operator_key(stack, "Cy")
    async with stack.client(cy) as client:
        resolved = await client.post(
            f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve",
            json={"decision": "approve", "reviewer": "someone-else"},
        )
        me = (await client.get("/v1/whoami")).json()
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["reviewer"] == me["id"]
    assert resolved.json()["reviewer_name"] == "Cy"


async def test_closing_a_conversation_cancels_its_pending_approval(stack: Stack) -> None:
    cid, approval = await request_refund(stack)
    closed = await stack.api.post(f"/v1/conversations/{cid}/close", json={})
    assert closed.status_code == 200
    after = (await stack.api.get(f"/v1/approvals/{approval['id']}")).json()
    assert after["status"] == "cancelled"
    pending = (await stack.api.get("/v1/approvals", params={"status": "pending"})).json()
    assert approval["id"] not in [a["id"] for a in pending["items"]]
    late = await stack.api.post(
        f"/v1/conversations/{cid}/approvals/{approval['id']}/resolve", json={"decision": "approve"}
    )
    assert late.status_code == 409
    events = (await stack.api.get(f"/v1/conversations/{cid}/events")).json()["items"]
    assert "approval.cancelled" in [e["type"] for e in events]


async def test_a_user_waiting_for_a_person_hears_the_holding_line_once_and_one_ack(
    stack: Stack,
) -> None:
    cid, _ = await handed_off(stack)
    for text in ("hello?", "anyone there?", "still here"):
        assert (await say(stack, cid, text)).status_code == 202
    to_user = [
        (author, text) for role, author, text in await transcript(stack, cid) if role != "user"
    ]
    assert to_user == [
        ("agent", "Let me connect you with a member of our team."),
        ("system", "Conversation handed to a human (transfer_call)."),
        (
            "system",
            "Thanks, your message is with our team. A person will reply here as soon as they can.",
        ),
    ]


async def test_an_unclaimed_handoff_raises_an_event_and_returns_to_the_agent_if_asked(
    stack: Stack,
) -> None:
    await stack.restart_core(handoff_unclaimed_seconds=0.5)
    impatient = await demo_like_agent(stack, "Impatient", on_unclaimed="return_to_agent")
    waiting_cid, waiting = await handed_off(stack)  # the demo revision: `wait`
    cid, handoff = await handed_off(stack, agent_id=impatient)
    assert (await say(stack, cid, "what are your hours?")).status_code == 202

    async def back_with_the_agent() -> bool:
        return await status(stack, cid) == "active"

    await eventually(back_with_the_agent, what="the unclaimed handoff returned to the agent")
    turns = await eventually(
        lambda: _answered(stack, cid, "Monday to Friday"), what="the queued question answered"
    )
    assert "nobody from our team is free" in turns[-2]
    resolved = (await stack.api.get(f"/v1/handoffs/{handoff['id']}")).json()
    assert (resolved["status"], resolved["outcome"]) == ("resolved", "returned_to_agent")
    assert resolved["unclaimed_at"] is not None

    async def flagged() -> dict[str, Any] | None:
        record = (await stack.api.get(f"/v1/handoffs/{waiting['id']}")).json()
        return record if record["unclaimed_at"] else None

    still = await eventually(flagged, what="the demo handoff flagged unclaimed")
    assert still["status"] == "requested"
    assert await status(stack, waiting_cid) == "waiting_for_human"
    events = (await stack.api.get(f"/v1/conversations/{waiting_cid}/events")).json()["items"]
    assert [e["type"] for e in events].count("handoff.unclaimed") == 1


async def _answered(stack: Stack, cid: str, needle: str) -> list[str] | None:
    texts = [c for _, _, c in await transcript(stack, cid)]
    return texts if needle in texts[-1] else None


async def test_handoff_routes_need_the_operator_scope_and_unknown_ids_are_404(
    stack: Stack,
) -> None:
    _, handoff = await handed_off(stack)
    created = await stack.api.post("/v1/api-keys", json={"name": "c", "scopes": ["client"]})
    async with stack.client(created.json()["key"]) as client:
        assert (await client.get("/v1/handoffs")).status_code == 403
        assert (await client.post(f"/v1/handoffs/{handoff['id']}/claim")).status_code == 403
        assert (await client.get("/v1/inbox")).status_code == 403
    assert (await stack.api.get("/v1/handoffs/hof_nope")).status_code == 404
    assert (await stack.api.post("/v1/handoffs/hof_X_conv_nope/claim")).status_code == 404


async def test_erasing_the_end_user_erases_their_handoff_records(stack: Stack) -> None:
    cid, handoff = await handed_off(stack)
    _, other = await handed_off(stack)
    end_user = (await stack.api.get(f"/v1/conversations/{cid}")).json()["end_user_id"]
    erased = await stack.api.delete(f"/v1/end-users/{end_user}")
    assert erased.status_code == 200, erased.text
    assert (await stack.api.get(f"/v1/handoffs/{handoff['id']}")).status_code == 404
    assert await ids(stack.api, "requested") == [other["id"]]
    leftovers = [
        key async for key in stack.core.store.connection.redis.scan_iter(match=f"*{{{cid}}}*")
    ]
    assert leftovers == []


async def test_a_handoff_record_lost_to_a_crash_is_written_by_the_next_message(
    stack: Stack,
) -> None:
    """Core changes the status before it writes the record; a crash between the two is healed
    by whatever touches the conversation next (a user message, an operator's takeover)."""
    store = stack.core.store
    by_user = (await open_conversation(stack))["id"]
    by_operator = (await open_conversation(stack))["id"]
    for cid in (by_user, by_operator):  # the crash: the transition happened, the record did not
        await store.transition(cid, "waiting_for_human", ["active"], "transfer_call")
    assert await ids(stack.api, "requested") == []

    assert (await say(stack, by_user, "hello?")).status_code == 202
    healed = (await stack.api.get(f"/v1/conversations/{by_user}")).json()["handoff_id"]
    record = (await stack.api.get(f"/v1/handoffs/{healed}")).json()
    assert (record["status"], record["reason"]) == ("requested", "recovered")
    ana = await operator_key(stack, "Ana")
    async with stack.client(ana) as client:
        took = await client.post(f"/v1/conversations/{by_operator}/handoff")
        assert took.status_code == 200, took.text
        again = await client.post(f"/v1/conversations/{by_operator}/handoff")
        assert again.status_code == 409  # with its record, a second takeover is illegal again
    taken = (await stack.api.get(f"/v1/handoffs/{took.json()['handoff_id']}")).json()
    assert (taken["status"], taken["assignee_name"]) == ("assigned", "Ana")
    assert sorted(await ids(stack.api, "requested")) == [healed]
