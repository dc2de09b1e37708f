"""API keys can be listed (never their secrets), revoked at once on every replica, and expire; the
bootstrap key is replaced when its secret changes; client keys see only what they created unless
made with `visibility: all`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from services.api import auth
from tests.conftest import ADMIN_KEY, Stack, eventually

pytestmark = pytest.mark.services("api")  # API, core and the servers: no channel, no egress


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
    stack: Stack, api_replica: Callable[..., Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Caches that would keep a key for an hour: only the revocation broadcast can empty them.
    monkeypatch.setattr(auth, "CACHE_SECONDS", 3600.0)
    other = await api_replica()
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
    stack: Stack, api_replica: Callable[..., Awaitable[str]]
) -> None:
    assert (await whoami(stack.base_url, ADMIN_KEY)).status_code == 200
    restarted = await api_replica(bootstrap_api_key="sk_test_admin_rotated")
    old = await whoami(restarted, ADMIN_KEY)
    assert (old.status_code, old.json()["error"]["code"]) == (401, "key_revoked")
    assert (await whoami(restarted, "sk_test_admin_rotated")).json()["id"] == "key_bootstrap"

    async def refused_on_the_running_replica() -> bool:
        return (await whoami(stack.base_url, ADMIN_KEY)).status_code == 401

    await eventually(refused_on_the_running_replica, what="the old bootstrap key refused")
    listed = await whoami(restarted, "sk_test_admin_rotated")
    assert listed.status_code == 200
    # Starting again with the same secret changes nothing.
    await api_replica(bootstrap_api_key="sk_test_admin_rotated")
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


async def test_keys_stored_before_the_id_index_are_listed_revoked_and_replaced(
    stack: Stack, api_replica: Callable[..., Awaitable[str]]
) -> None:
    """Records as the previous version wrote them: only `apikey:<hash>` and the id set."""
    store, r = stack.core.store, stack.core.store.connection.redis
    ns = stack.namespace
    legacy = {"old_client": "sk_legacy_client", "key_bootstrap": "sk_legacy_bootstrap"}
    for key_id, secret in legacy.items():
        record = {
            "id": key_id,
            "name": key_id,
            "scopes": ["admin"],
            "created_at": "2026-01-01T00:00:00Z",
            "prefix": secret[:7],
        }
        await r.set(
            f"{ns}:apikey:{hashlib.sha256(secret.encode()).hexdigest()}", json.dumps(record)
        )
        await r.zadd(f"{ns}:apikeys", {key_id: 0})
    await r.hdel(f"{ns}:apikey-ids", "key_bootstrap")  # as if the current one were legacy too
    assert (await whoami(stack.base_url, "sk_legacy_client")).status_code == 200
    # A bootstrap key set after the upgrade revokes every older bootstrap secret.
    upgraded = await api_replica(bootstrap_api_key="sk_after_upgrade")
    for old in ("sk_legacy_bootstrap", ADMIN_KEY):
        refused = await whoami(upgraded, old)
        assert (refused.status_code, refused.json()["error"]["code"]) == (401, "key_revoked"), old
    async with httpx.AsyncClient(
        base_url=upgraded, headers={"x-api-key": "sk_after_upgrade"}
    ) as admin:
        listed = {k["id"] for k in (await admin.get("/v1/api-keys")).json()["items"]}
        assert "old_client" in listed
        assert (await admin.delete("/v1/api-keys/old_client")).status_code == 204
    refused = await whoami(upgraded, "sk_legacy_client")
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "key_revoked")
    assert await store.api_key_by_hash(hashlib.sha256(b"sk_after_upgrade").hexdigest())


async def test_a_refused_request_is_answered_inside_its_trace(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The key check (a middleware, `auth.authenticate`) answers its refusals itself, so the
    request's trace is still current when they are logged: a key lookup that finds Valkey away
    is a 503 whose warning carries the caller's trace id."""
    import redis.exceptions

    async def valkey_away(secret: str) -> None:
        raise redis.exceptions.ConnectionError("Valkey is away")

    monkeypatch.setattr(stack.api_app.state.keyring, "lookup", valkey_away)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with caplog.at_level("WARNING", logger="switchboard.api"):
        answer = await stack.api.get(
            "/v1/conversations",
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "unavailable"
    warned = [r for r in caplog.records if r.getMessage().startswith("dependency unavailable")]
    assert [getattr(r, "trace_id", None) for r in warned] == [trace_id]
