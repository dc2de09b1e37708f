"""API keys can be listed (never their secrets), revoked at once on every replica, and expire; the
bootstrap key is replaced when its secret changes; client keys see only what they created unless
made with `visibility: all`."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.api import auth
from services.api.app import create_app
from shared.http import HttpServer
from shared.settings import ApiSettings
from tests.conftest import ADMIN_KEY, EMAIL_DOMAINS, Stack, eventually, settings_env


@pytest.fixture
async def replica(stack: Stack) -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """Another API replica on the same servers (its own key cache)."""
    servers: list[HttpServer] = []

    async def start(bootstrap: str = ADMIN_KEY) -> str:
        env = {**settings_env(stack.servers, stack.namespace), "email_domains": EMAIL_DOMAINS}
        settings = ApiSettings(**env, api_port=0, bootstrap_api_key=bootstrap)
        server = HttpServer(create_app(settings), "127.0.0.1", 0)
        await server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.stop()


async def new_key(stack: Stack, **body: Any) -> dict[str, Any]:
    created = await stack.api.post("/v1/api-keys", json={"name": "k", "scopes": ["client"], **body})
    assert created.status_code == 201, created.text
    return created.json()  # type: ignore[no-any-return]


async def whoami(base_url: str, secret: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, headers={"x-api-key": secret}) as client:
        return await client.get("/v1/whoami")


async def test_keys_are_listed_with_their_last_use_and_never_their_secret(stack: Stack) -> None:
    key = await new_key(stack, name="widget")
    assert (await whoami(stack.base_url, key["key"])).status_code == 200
    listed = await stack.api.get("/v1/api-keys")
    assert listed.status_code == 200, listed.text
    items = {k["id"]: k for k in listed.json()["items"]}
    assert set(items) == {"key_bootstrap", key["id"]}
    mine = items[key["id"]]
    assert mine["name"] == "widget"
    assert mine["scopes"] == ["client"]
    assert mine["visibility"] == "own"
    assert mine["expires_at"] is None
    assert mine["created_at"] == key["created_at"]
    assert mine["last_used_at"] is not None
    digest = hashlib.sha256(key["key"].encode()).hexdigest()
    assert key["key"] not in listed.text
    assert key["key"][3:10] not in listed.text
    assert digest not in listed.text


async def test_a_revoked_key_is_refused_at_once_on_every_replica(
    stack: Stack, replica: Callable[..., Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Caches that would keep a key for an hour: only the revocation broadcast can empty them.
    monkeypatch.setattr(auth, "CACHE_SECONDS", 3600.0)
    other = await replica()
    key = await new_key(stack)
    assert (await whoami(stack.base_url, key["key"])).status_code == 200
    assert (await whoami(other, key["key"])).status_code == 200  # cached on both replicas now
    assert (await stack.api.delete(f"/v1/api-keys/{key['id']}")).status_code == 204
    here = await whoami(stack.base_url, key["key"])
    assert (here.status_code, here.json()["error"]["code"]) == (401, "key_revoked")

    async def refused_there() -> bool:
        answer = await whoami(other, key["key"])
        return answer.status_code == 401 and answer.json()["error"]["code"] == "key_revoked"

    await eventually(refused_there, what="the other replica refusing the revoked key")
    listed = (await stack.api.get("/v1/api-keys")).json()["items"]
    assert key["id"] not in {k["id"] for k in listed}
    again = await stack.api.delete(f"/v1/api-keys/{key['id']}")
    assert (again.status_code, again.json()["error"]["code"]) == (404, "not_found")


async def test_a_key_past_its_expiry_is_refused_with_key_expired(stack: Stack) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    key = await new_key(stack, expires_at=soon.isoformat())
    assert datetime.fromisoformat(key["expires_at"]) == soon
    assert (await whoami(stack.base_url, key["key"])).status_code == 200

    async def expired() -> dict[str, Any] | None:
        answer = await whoami(stack.base_url, key["key"])
        return answer.json()["error"] if answer.status_code == 401 else None

    error = await eventually(expired, what="the key to expire")
    assert error["code"] == "key_expired"
    assert error["details"]["key_id"] == key["id"]
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    naive = datetime.now().replace(tzinfo=None).isoformat()
    for bad in (past, naive):
        refused = await stack.api.post(
            "/v1/api-keys", json={"name": "k", "scopes": ["client"], "expires_at": bad}
        )
        assert refused.status_code == 422, (bad, refused.text)


async def test_changing_the_bootstrap_key_revokes_the_previous_one(
    stack: Stack, replica: Callable[..., Awaitable[str]]
) -> None:
    assert (await whoami(stack.base_url, ADMIN_KEY)).status_code == 200
    restarted = await replica(bootstrap="sk_test_admin_rotated")
    old = await whoami(restarted, ADMIN_KEY)
    assert (old.status_code, old.json()["error"]["code"]) == (401, "key_revoked")
    assert (await whoami(restarted, "sk_test_admin_rotated")).json()["id"] == "key_bootstrap"

    async def refused_on_the_running_replica() -> bool:
        return (await whoami(stack.base_url, ADMIN_KEY)).status_code == 401

    await eventually(refused_on_the_running_replica, what="the old bootstrap key refused")
    listed = await whoami(restarted, "sk_test_admin_rotated")
    assert listed.status_code == 200
    # Starting again with the same secret changes nothing.
    await replica(bootstrap="sk_test_admin_rotated")
    assert (await whoami(restarted, "sk_test_admin_rotated")).status_code == 200


async def test_a_client_key_sees_only_the_conversations_it_created(stack: Stack) -> None:
    alice, bob = await new_key(stack), await new_key(stack)
    everything = await new_key(stack, visibility="all")
    async with stack.client(alice["key"]) as a, stack.client(bob["key"]) as b:
        opened = (await a.post("/v1/conversations", json={})).json()
        mine, user = opened["id"], opened["end_user_id"]
        theirs = (await b.post("/v1/conversations", json={})).json()["id"]
        assert (await a.get(f"/v1/end-users/{user}")).status_code == 200
        assert (await b.get(f"/v1/end-users/{user}")).status_code == 404
        assert (
            await a.post(f"/v1/conversations/{mine}/turns", json={"user_message": "hi"})
        ).status_code == 200
        for method, path, body in [
            ("GET", "", None),
            ("GET", "/turns", None),
            ("GET", "/messages", None),
            ("GET", "/events", None),
            ("GET", "/deliveries", None),
            ("POST", "/turns", {"user_message": "hello"}),
            ("POST", "/turns/stream", {"user_message": "hello"}),
            ("POST", "/close", {}),
        ]:
            answer = await b.request(method, f"/v1/conversations/{mine}{path}", json=body)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
        assert (await b.get(f"/v1/conversations/{theirs}")).status_code == 200
        listed = (await b.get("/v1/conversations")).json()["items"]
        assert [c["id"] for c in listed] == [theirs]
    async with stack.client(everything["key"]) as c:
        seen = {c["id"] for c in (await c.get("/v1/conversations")).json()["items"]}
        assert {mine, theirs} <= seen
    seen = {c["id"] for c in (await stack.api.get("/v1/conversations")).json()["items"]}
    assert {mine, theirs} <= seen
    # Still open: bob's close did nothing.
    assert (await stack.api.get(f"/v1/conversations/{mine}")).json()["status"] == "active"


async def test_visibility_own_is_for_client_keys_only(stack: Stack) -> None:
    refused = await stack.api.post(
        "/v1/api-keys", json={"name": "k", "scopes": ["operator"], "visibility": "own"}
    )
    assert refused.status_code == 422
    operator = await stack.api.post("/v1/api-keys", json={"name": "k", "scopes": ["operator"]})
    assert operator.json()["visibility"] == "all"
