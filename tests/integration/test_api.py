"""The HTTP API over a real socket, with core, JetStream and Valkey behind it."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as redis

from tests.conftest import Stack, make_key

pytestmark = pytest.mark.services("api")  # API, core and the servers: no channel, no egress


async def open_conversation(api: httpx.AsyncClient, **body: object) -> dict[str, object]:
    response = await api.post("/v1/conversations", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_a_conversation_with_the_demo_agent_end_to_end(stack: Stack) -> None:
    conv = await open_conversation(stack.api)
    assert conv["status"] == "active"
    assert conv["assigned_agent_id"] == "agent_acme_support"
    assert conv["pinned_revision_id"]

    reply = await stack.api.post(
        f"/v1/conversations/{conv['id']}/turns",
        json={"user_message": "how long do refunds take?", "include_evidence": True},
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert "14 days" in body["text"]
    assert body["conversation_id"] == conv["id"]
    assert body["session_status"] == "active"
    assert body["message_seqs"] == [1, 2]
    assert body["evidence"][0]["kb_id"] == "acme-help"
    assert body["evidence"][0]["chunk_id"] == "refunds#0"
    assert body["turn_id"]

    order = (
        await stack.api.post(
            f"/v1/conversations/{conv['id']}/turns", json={"user_message": "status of order 12345"}
        )
    ).json()
    assert order["text"] == "Order 12345 is shipped."
    assert order["tool_calls"][0]["name"] == "lookup_order"
    assert order["message_seqs"] == [3, 4]

    transcript = (await stack.api.get(f"/v1/conversations/{conv['id']}/turns")).json()
    assert [(t["seq"], t["role"]) for t in transcript["items"]] == [
        (1, "user"),
        (2, "assistant"),
        (3, "user"),
        (4, "assistant"),
    ]
    assert transcript["next_cursor"] is None
    assert transcript["items"][1]["evidence"][0]["text"].startswith("Refunds are issued")


async def test_evidence_can_be_left_out_of_the_reply(stack: Stack) -> None:
    conv = await open_conversation(stack.api)
    body = (
        await stack.api.post(
            f"/v1/conversations/{conv['id']}/turns",
            json={"user_message": "what are your hours?", "include_evidence": False},
        )
    ).json()
    assert "Monday to Friday" in body["text"]
    assert body["evidence"] == []


async def test_asking_for_a_human_hands_off_and_later_messages_queue(stack: Stack) -> None:
    conv = await open_conversation(stack.api)
    handoff = (
        await stack.api.post(
            f"/v1/conversations/{conv['id']}/turns",
            json={"user_message": "I want to talk to a human"},
        )
    ).json()
    assert handoff["tool_calls"][0]["name"] == "transfer_call"
    assert handoff["session_status"] == "waiting_for_human"
    queued = await stack.api.post(
        f"/v1/conversations/{conv['id']}/turns", json={"user_message": "hello?"}
    )
    assert queued.status_code == 202
    assert queued.json()["queued"] is True
    assert queued.json()["session_status"] == "waiting_for_human"
    roles = [
        t["role"]
        for t in (await stack.api.get(f"/v1/conversations/{conv['id']}/turns")).json()["items"]
    ]
    # The AI did not answer "hello?"; the last turn is the one waiting line of this handoff.
    assert roles == ["user", "assistant", "system", "user", "system"]


async def test_a_retried_request_with_one_idempotency_key_is_one_turn(stack: Stack) -> None:
    conv = await open_conversation(stack.api)
    url = f"/v1/conversations/{conv['id']}/turns"
    headers = {"idempotency-key": "client-retry-1"}
    first, second = await asyncio.gather(
        stack.api.post(url, json={"user_message": "status of order 67890"}, headers=headers),
        stack.api.post(url, json={"user_message": "status of order 67890"}, headers=headers),
    )
    third = await stack.api.post(
        url, json={"user_message": "status of order 67890"}, headers=headers
    )
    assert first.json()["turn_id"] == second.json()["turn_id"] == third.json()["turn_id"]
    turns = (await stack.api.get(url)).json()["items"]
    assert len(turns) == 2


async def test_closed_conversations_refuse_turns_with_409(stack: Stack) -> None:
    conv = await open_conversation(stack.api)
    closed = await stack.api.post(f"/v1/conversations/{conv['id']}/close", json={"reason": "done"})
    assert closed.status_code == 200
    assert closed.json()["status"] == "closed"
    refused = await stack.api.post(
        f"/v1/conversations/{conv['id']}/turns", json={"user_message": "hi"}
    )
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "conversation_closed"
    again = await stack.api.post(f"/v1/conversations/{conv['id']}/close")
    assert again.status_code == 409
    assert again.json()["error"]["details"]["status"] == "closed"


async def test_conversations_are_listed_and_filtered_with_cursor_paging(stack: Stack) -> None:
    ids = [(await open_conversation(stack.api, session_type="test"))["id"] for _ in range(3)]
    await stack.api.post(f"/v1/conversations/{ids[0]}/close")
    page = (await stack.api.get("/v1/conversations", params={"limit": 2})).json()
    assert [c["id"] for c in page["items"]] == [ids[2], ids[1]]
    rest = (
        await stack.api.get("/v1/conversations", params={"limit": 2, "cursor": page["next_cursor"]})
    ).json()
    assert [c["id"] for c in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None
    closed = (await stack.api.get("/v1/conversations", params={"status": "closed"})).json()
    assert [c["id"] for c in closed["items"]] == [ids[0]]


async def test_transcript_pages_by_seq(stack: Stack) -> None:
    conv = await open_conversation(stack.api)
    for text in ("hello", "what are your hours?", "status of order 12345"):
        await stack.api.post(f"/v1/conversations/{conv['id']}/turns", json={"user_message": text})
    url = f"/v1/conversations/{conv['id']}/turns"
    first = (await stack.api.get(url, params={"limit": 4})).json()
    assert [t["seq"] for t in first["items"]] == [1, 2, 3, 4]
    second = (await stack.api.get(url, params={"limit": 4, "cursor": first["next_cursor"]})).json()
    assert [t["seq"] for t in second["items"]] == [5, 6]
    assert second["next_cursor"] is None


async def test_identity_resolution_finds_the_same_person_across_phone_channels(
    stack: Stack,
) -> None:
    sms = (
        await stack.api.post(
            "/v1/identity/resolve", json={"channel": "sms", "identifier": "(415) 555-0109"}
        )
    ).json()
    voice = (
        await stack.api.post(
            "/v1/identity/resolve", json={"channel": "voice", "identifier": "+1 415 555 0109"}
        )
    ).json()
    assert sms["created"] is True
    assert voice == {"end_user_id": sms["end_user_id"], "created": False}
    user = (await stack.api.get(f"/v1/end-users/{sms['end_user_id']}")).json()
    assert user["identities"] == [{"kind": "phone", "value": "+14155550109"}]
    email = (
        await stack.api.post(
            "/v1/identity/resolve", json={"channel": "email", "identifier": "Jane@Example.com"}
        )
    ).json()
    assert email["end_user_id"] != sms["end_user_id"]  # never merged implicitly
    bad = await stack.api.post("/v1/identity/resolve", json={"channel": "sms", "identifier": "abc"})
    assert bad.status_code == 422


async def test_a_conversation_can_be_opened_for_an_identity_or_an_end_user(stack: Stack) -> None:
    by_identity = await open_conversation(
        stack.api, identity={"channel": "sms", "identifier": "+14155550123"}
    )
    by_user = await open_conversation(stack.api, end_user_id=by_identity["end_user_id"])
    assert by_user["end_user_id"] == by_identity["end_user_id"]
    missing = await stack.api.post("/v1/conversations", json={"end_user_id": "usr_nope"})
    assert missing.status_code == 404


async def test_activating_a_new_revision_never_changes_a_running_conversation(stack: Stack) -> None:
    created = await stack.api.post(
        "/v1/agents", json={"name": "Greeter", "revision": {"greeting": "Hello from revision one"}}
    )
    assert created.status_code == 201, created.text
    agent = created.json()
    old = await open_conversation(stack.api, agent_id=agent["id"])
    revision = await stack.api.post(
        f"/v1/agents/{agent['id']}/revisions", json={"greeting": "Hello from revision two"}
    )
    assert revision.status_code == 201
    assert revision.json()["number"] == 2
    new = await open_conversation(stack.api, agent_id=agent["id"])
    assert old["pinned_revision_id"] != new["pinned_revision_id"]
    assert new["pinned_revision_id"] == revision.json()["id"]
    said_old = (
        await stack.api.post(f"/v1/conversations/{old['id']}/turns", json={"user_message": "hello"})
    ).json()["text"]
    said_new = (
        await stack.api.post(f"/v1/conversations/{new['id']}/turns", json={"user_message": "hello"})
    ).json()["text"]
    assert (said_old, said_new) == ("Hello from revision one", "Hello from revision two")
    revisions = (await stack.api.get(f"/v1/agents/{agent['id']}/revisions")).json()["items"]
    assert [r["number"] for r in revisions] == [1, 2]
    back = await stack.api.post(
        f"/v1/agents/{agent['id']}/revisions/{old['pinned_revision_id']}/activate"
    )
    assert back.json()["active_revision_id"] == old["pinned_revision_id"]


# Errors and auth ------------------------------------------------------------------------------


async def test_every_error_has_one_shape(stack: Stack) -> None:
    response = await stack.api.get("/v1/conversations/conv_missing")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "code": "not_found",
            "message": "conversation conv_missing not found",
            "details": {"conversation_id": "conv_missing"},
        }
    }


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"user_message": ""}',
        b'{"user_message": 5}',
        b"{}",
        b"[]",
        b'{"user_message": "hi", "unknown_field": 1}',
        b'{"user_message": "' + b"x" * 16001 + b'"}',
    ],
)
async def test_malformed_turn_bodies_are_422(stack: Stack, body: bytes) -> None:
    conv = await open_conversation(stack.api)
    response = await stack.api.post(
        f"/v1/conversations/{conv['id']}/turns",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert (await stack.api.get(f"/v1/conversations/{conv['id']}/turns")).json()["items"] == []


async def test_a_turn_on_an_unknown_conversation_is_404(stack: Stack) -> None:
    response = await stack.api.post(
        "/v1/conversations/conv_nope/turns", json={"user_message": "hi"}
    )
    assert response.status_code == 404


async def test_missing_and_wrong_keys_are_401(stack: Stack) -> None:
    async with stack.client(None) as anonymous:
        missing = await anonymous.get("/v1/conversations")
    async with stack.client("sk_wrong") as wrong:
        bad = await wrong.get("/v1/conversations")
    assert (missing.status_code, missing.json()["error"]["code"]) == (401, "unauthenticated")
    assert (bad.status_code, bad.json()["error"]["message"]) == (401, "unknown API key")


async def test_scopes_nest_client_under_operator_under_admin(stack: Stack) -> None:
    client_key = await make_key(stack, "client")
    async with stack.client(client_key) as client:
        assert (await client.get("/v1/whoami")).json()["scopes"] == ["client"]
        assert (await client.post("/v1/conversations", json={})).status_code == 201
        forbidden = await client.post("/v1/api-keys", json={"name": "x", "scopes": ["admin"]})
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["details"]["needed"] == "admin"
        assert (await client.post("/v1/agents", json={"name": "x"})).status_code == 403


async def test_keys_are_stored_only_as_hashes(stack: Stack, valkey: redis.Redis) -> None:
    secret = await make_key(stack, "operator")
    values = [await valkey.get(k) for k in await valkey.keys(f"{stack.namespace}:apikey:*")]
    assert values
    assert all(secret.encode() not in (v or b"") for v in values)
    keys = [k.decode() for k in await valkey.keys(f"{stack.namespace}:*")]
    assert all(secret not in k for k in keys)


async def test_openapi_document_and_probes_are_public(stack: Stack) -> None:
    async with stack.client(None) as anonymous:
        schema = (await anonymous.get("/schema/openapi.json")).json()
        assert "/v1/conversations/{conversation_id}/turns" in schema["paths"]
        assert (await anonymous.get("/healthz")).status_code == 200
        ready = await anonymous.get("/readyz")
        assert ready.json() == {"ready": True, "checks": {"nats": True, "redis": True}}
        assert (await anonymous.get("/metrics")).status_code == 200
