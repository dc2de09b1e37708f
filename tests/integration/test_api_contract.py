"""The API as its clients see it: the OpenAPI document, Idempotency-Key, and consistent input checks.

The generated-request check of every operation against the document is in test_hostile_input.py.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.conftest import Stack

pytestmark = pytest.mark.services("api")  # API, core and the servers: no channel, no egress

IDEMPOTENT = {
    ("post", "/v1/conversations"),
    ("post", "/v1/conversations/{conversation_id}/turns"),
    ("post", "/v1/conversations/{conversation_id}/turns/stream"),
}


async def test_every_operation_needs_the_api_key_scheme_and_documents_the_error_body(
    stack: Stack,
) -> None:
    doc = (await stack.api.get("/schema/openapi.json")).json()
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    error = doc["components"]["schemas"]["Error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "details"]
    operations = [
        (method, path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert len(operations) >= 25
    for method, path, op in operations:
        assert op["security"] == [{"apiKey": []}], (method, path)
        for status in ("401", "429", "503"):
            assert status in op["responses"], (method, path, status)
        assert "400" not in op["responses"], (method, path)  # we answer 422, never 400
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
        headers = {p["name"] for p in op.get("parameters", []) if p["in"] == "header"}
        assert ("Idempotency-Key" in headers) == ((method, path) in IDEMPOTENT), (method, path)
    turns = doc["paths"]["/v1/conversations/{conversation_id}/turns"]["post"]["responses"]
    assert {"200", "202", "404", "409", "413", "422", "504"} <= set(turns)
    assert "Retry-After" in turns["429"]["headers"]


async def test_a_documented_request_with_the_key_from_the_scheme_works(stack: Stack) -> None:
    """What Swagger's "Try it out" and generated clients do: the key in the header the scheme names."""
    doc = (await stack.api.get("/schema/openapi.json")).json()
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    async with stack.client(None) as anonymous:
        refused = await anonymous.post("/v1/conversations", json={})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthenticated"
        admin = stack.api.headers["x-api-key"]
        accepted = await anonymous.post(
            "/v1/conversations", json={}, headers={scheme["name"]: admin}
        )
    assert accepted.status_code == 201


async def test_a_method_a_path_does_not_declare_is_405_with_allow(stack: Stack) -> None:
    doc = (await stack.api.get("/schema/openapi.json")).json()
    for path, item in doc["paths"].items():
        declared = {m.upper() for m in item if m in ("get", "post", "put", "patch", "delete")}
        url = re.sub(r"\{[^}]+\}", "x", path)
        # One undeclared method per path: the answer depends on the path, not on the method.
        method = next(m for m in ("PATCH", "PUT", "DELETE", "POST", "GET") if m not in declared)
        response = await stack.api.request(method, url)
        assert response.status_code == 405, (method, path, response.text)
        assert response.json()["error"]["code"] == "method_not_allowed"
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        assert declared <= allowed <= declared | {"OPTIONS", "HEAD"}, (method, path, allowed)


async def test_swagger_ui_is_served_from_the_package_not_a_cdn(stack: Stack) -> None:
    async with stack.client(None) as anonymous:
        page = await anonymous.get("/schema/swagger")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text)
        assert urls, page.text[:500]
        assert all(u.startswith("/schema/assets/") for u in urls), urls
        assert "cdn." not in page.text
        for url in urls:
            asset = await anonymous.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 500, url
    assert "SwaggerUIBundle" in (await stack.api.get("/schema/assets/swagger-ui-bundle.js")).text


async def test_the_streaming_turn_is_documented_and_answered_as_server_sent_events(
    stack: Stack,
) -> None:
    doc = (await stack.api.get("/schema/openapi.json")).json()
    op = doc["paths"]["/v1/conversations/{conversation_id}/turns/stream"]["post"]
    assert list(op["responses"]["200"]["content"]) == ["text/event-stream"]
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    response = await stack.api.post(
        f"/v1/conversations/{conv['id']}/turns/stream", json={"user_message": "hours?"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "event: complete" in response.text


# Idempotency-Key -------------------------------------------------------------------------------


async def test_an_idempotency_key_reused_with_another_body_is_422_not_a_replay(
    stack: Stack,
) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    url = f"/v1/conversations/{conv['id']}/turns"
    headers = {"idempotency-key": "order-42"}
    first = await stack.api.post(
        url, json={"user_message": "where is order 12345"}, headers=headers
    )
    assert first.status_code == 200, first.text
    other = await stack.api.post(url, json={"user_message": "refund 67890"}, headers=headers)
    assert other.status_code == 422, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    again = await stack.api.post(
        url, json={"user_message": "where is order 12345"}, headers=headers
    )
    assert again.status_code == 200
    assert again.json()["turn_id"] == first.json()["turn_id"]
    turns = await stack.core.store.turns_after(conv["id"], 0, 100)
    assert [t.content for t in turns if t.role == "user"] == ["where is order 12345"]


async def test_creating_a_conversation_honours_the_idempotency_key(stack: Stack) -> None:
    body = {"channel": "api", "context_variables": {"plan": "gold"}}
    headers = {"idempotency-key": "open-1"}
    first, second = await asyncio.gather(
        stack.api.post("/v1/conversations", json=body, headers=headers),
        stack.api.post("/v1/conversations", json=body, headers=headers),
    )
    # Concurrent twins: one opens it, the other is told to retry (409) or gets the same one.
    statuses = sorted([first.status_code, second.status_code])
    assert statuses in ([201, 201], [201, 409]), (first.text, second.text)
    opened = first if first.status_code == 201 else second
    retry = await stack.api.post("/v1/conversations", json=body, headers=headers)
    assert retry.status_code == 201
    assert retry.json()["id"] == opened.json()["id"]
    changed = await stack.api.post(
        "/v1/conversations", json={**body, "session_type": "test"}, headers=headers
    )
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_key_reused"
    without_key = await stack.api.post("/v1/conversations", json=body)
    assert without_key.json()["id"] != opened.json()["id"]
    listed = (await stack.api.get("/v1/conversations", params={"limit": 100})).json()["items"]
    assert len(listed) == 2


async def test_an_idempotency_key_is_scoped_to_its_api_key(stack: Stack) -> None:
    from tests.conftest import make_key

    client_key = await make_key(stack, "client")
    headers = {"idempotency-key": "same-words"}
    mine = await stack.api.post("/v1/conversations", json={}, headers=headers)
    async with stack.client(client_key) as other:
        theirs = await other.post("/v1/conversations", json={}, headers=headers)
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


# Input checks -----------------------------------------------------------------------------------


async def test_an_unknown_status_filter_is_422_like_an_unknown_channel(stack: Stack) -> None:
    for params in ({"status": "bogus"}, {"channel": "fax"}, {"session_type": "prod"}):
        response = await stack.api.get("/v1/conversations", params=params)
        assert response.status_code == 422, (params, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert error["details"]["errors"][0]["key"] == next(iter(params)), error
    ok = await stack.api.get("/v1/conversations", params={"status": "active", "channel": "api"})
    assert ok.status_code == 200


async def test_a_whitespace_only_user_message_is_422_and_stores_nothing(stack: Stack) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    for text in (" ", "   \n\t ", "\u00a0"):
        response = await stack.api.post(
            f"/v1/conversations/{conv['id']}/turns", json={"user_message": text}
        )
        assert response.status_code == 422, (text, response.text)
        assert response.json()["error"]["details"]["errors"][0]["key"] == "user_message"
    simulated = await stack.api.post("/v1/simulations", json={"user_turns": ["hi", "  "]})
    assert simulated.status_code == 422
    assert await stack.core.store.turns_after(conv["id"], 0, 10) == []


async def test_a_missing_body_names_the_missing_field(stack: Stack) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    cases = {
        f"/v1/conversations/{conv['id']}/turns": ["user_message"],
        "/v1/identity/resolve": ["channel", "identifier"],
        "/v1/api-keys": ["name", "scopes"],
    }
    for url, fields in cases.items():
        response = await stack.api.post(url)
        assert response.status_code == 422, (url, response.text)
        error = response.json()["error"]
        assert error["details"]["missing"] == fields, (url, error)
        for field in fields:
            assert field in error["message"], (url, error)
    empty = await stack.api.post(f"/v1/conversations/{conv['id']}/turns", json={})
    assert "user_message" in empty.json()["error"]["message"]
