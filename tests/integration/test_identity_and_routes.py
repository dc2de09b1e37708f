"""Identity linking (one person on several channels, never merged silently) and the routing table
(which agent answers on which of our numbers and addresses)."""

from __future__ import annotations

from tests.conftest import Stack, eventually, make_key
from tests.integration.test_events_and_first_contact import hook, received, subscribe
from tests.integration.test_streaming_webhooks_sessions import Receiver

__all__ = ["hook"]  # the webhook receiver fixture

ALICE_PHONE = "+14155550123"


async def resolve(stack: Stack, channel: str, identifier: str) -> str:
    response = await stack.api.post(
        "/v1/identity/resolve", json={"channel": channel, "identifier": identifier}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["end_user_id"])


async def test_linking_an_email_to_an_sms_user_makes_one_person_with_an_audit_event(
    stack: Stack, hook: Receiver
) -> None:
    secret = await subscribe(stack, hook, ["end_user.identity_linked"])
    alice = await resolve(stack, "sms", "(415) 555-0123")
    operator = await make_key(stack, "operator")
    async with stack.client(operator) as api:
        linked = await api.post(
            "/v1/identity/link",
            json={"end_user_id": alice, "channel": "email", "identifier": "Alice@Example.COM"},
        )
        assert linked.status_code == 200, linked.text
        again = await api.post(
            "/v1/identity/link",
            json={"end_user_id": alice, "channel": "email", "identifier": "alice@example.com"},
        )
        assert again.status_code == 200
    identities = [(i["kind"], i["value"]) for i in linked.json()["identities"]]
    assert identities == [("phone", ALICE_PHONE), ("email", "alice@example.com")]
    assert again.json()["identities"] == linked.json()["identities"]  # twice is once
    shown = (await stack.api.get(f"/v1/end-users/{alice}")).json()
    assert [(i["kind"], i["value"]) for i in shown["identities"]] == identities
    assert await resolve(stack, "email", "alice@example.com") == alice

    async def audited() -> list[dict[str, object]] | None:
        return received(hook, secret, "end_user.identity_linked") or None

    events = await eventually(audited, what="the end_user.identity_linked webhook")
    assert len(events) == 1
    assert events[0]["data"] == {
        "end_user_id": alice,
        "identity": {"kind": "email", "value": "alice@example.com"},
    }


async def test_linking_an_identifier_of_another_end_user_is_409_naming_both(stack: Stack) -> None:
    alice = await resolve(stack, "sms", ALICE_PHONE)
    bob = await resolve(stack, "email", "bob@example.com")
    conflict = await stack.api.post(
        "/v1/identity/link",
        json={"end_user_id": alice, "channel": "email", "identifier": "bob@example.com"},
    )
    assert conflict.status_code == 409, conflict.text
    error = conflict.json()["error"]
    assert error["code"] == "identity_conflict"
    assert error["details"]["end_user_id"] == alice
    assert error["details"]["linked_to_end_user_id"] == bob
    # Nothing changed on either side.
    assert await resolve(stack, "email", "bob@example.com") == bob
    shown = (await stack.api.get(f"/v1/end-users/{alice}")).json()
    assert [i["value"] for i in shown["identities"]] == [ALICE_PHONE]


async def test_linking_needs_the_operator_scope_and_an_existing_end_user(stack: Stack) -> None:
    alice = await resolve(stack, "sms", ALICE_PHONE)
    body = {"end_user_id": alice, "channel": "email", "identifier": "alice@example.com"}
    client = await make_key(stack, "client")
    async with stack.client(client) as api:
        refused = await api.post("/v1/identity/link", json=body)
    assert refused.status_code == 403
    unknown = await stack.api.post("/v1/identity/link", json={**body, "end_user_id": "usr_nope"})
    assert unknown.status_code == 404
    not_a_phone = await stack.api.post(
        "/v1/identity/link", json={**body, "channel": "sms", "identifier": "call me"}
    )
    assert not_a_phone.status_code == 422
    assert (await stack.api.get(f"/v1/end-users/{alice}")).json()["identities"] == [
        {"kind": "phone", "value": ALICE_PHONE}
    ]
