"""What webhook receivers get (turn text and channel, SMS delivery status, email bounces), delivery
records through the API, and conversations where we write first on SMS or email."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import Stack, eventually
from tests.integration.test_email import bounce, mail, send
from tests.integration.test_sms import ALICE, OUR_NUMBER, post_signed, sent_messages, sms_form
from tests.integration.test_streaming_webhooks_sessions import Receiver, verify


@pytest.fixture
async def hook() -> AsyncIterator[Receiver]:
    async with Receiver().serving() as rec:
        yield rec


async def subscribe(stack: Stack, receiver: Receiver, events: list[str]) -> str:
    created = await stack.api.post("/v1/webhooks", json={"url": receiver.url, "events": events})
    assert created.status_code == 201, created.text
    return str(created.json()["secret"])


def received(receiver: Receiver, secret: str, event_type: str) -> list[dict[str, Any]]:
    return [
        json.loads(body)
        for headers, body in receiver.accepted
        if verify(secret, headers, body) and json.loads(body)["type"] == event_type
    ]


async def test_turn_created_webhooks_carry_the_text_and_the_channel(
    stack: Stack, hook: Receiver
) -> None:
    secret = await subscribe(stack, hook, ["turn.created"])
    cid = (await stack.api.post("/v1/conversations", json={})).json()["id"]
    answer = await stack.api.post(
        f"/v1/conversations/{cid}/turns", json={"user_message": "what are your hours?"}
    )
    assert answer.status_code == 200, answer.text

    async def both() -> list[dict[str, Any]] | None:
        events = received(hook, secret, "turn.created")
        return events if len(events) == 2 else None

    events = sorted(await eventually(both, what="two turn.created webhooks"), key=_seq)
    assert [(e["data"]["role"], e["data"]["channel"]) for e in events] == [
        ("user", "api"),
        ("assistant", "api"),
    ]
    assert events[0]["data"]["text"] == "what are your hours?"
    assert events[1]["data"]["text"] == answer.json()["text"]
    # The audit trail shows the same event, text and channel included.
    trail = (await stack.api.get(f"/v1/conversations/{cid}/events")).json()["items"]
    assert next(e for e in trail if e["type"] == "turn.created")["data"] == events[0]["data"]


def _seq(event: dict[str, Any]) -> int:
    return int(event["data"]["seq"])


async def test_sms_delivery_status_reaches_webhooks_and_deliveries_are_readable(
    stack: Stack, hook: Receiver
) -> None:
    secret = await subscribe(stack, hook, ["message.status"])
    assert (await post_signed(stack, "/twilio/sms", sms_form("hours?"))).status_code == 200
    await eventually(lambda: _ready(sent_messages(stack)), what="the reply SMS")
    convs = (await stack.api.get("/v1/conversations", params={"channel": "sms"})).json()["items"]

    async def deliveries() -> list[dict[str, Any]] | None:
        url = f"/v1/conversations/{convs[0]['id']}/deliveries"
        items: list[dict[str, Any]] = (await stack.api.get(url)).json()["items"]
        return items if items and items[0]["provider_ids"] else None

    delivery = (await eventually(deliveries, what="the delivery through the API"))[0]
    assert (delivery["channel"], delivery["status"]) == ("sms", "queued")
    sid = delivery["provider_ids"][0]
    status = {**sms_form(""), "MessageSid": sid, "MessageStatus": "delivered"}
    path = f"/twilio/sms/status?turn={delivery['turn_id']}&part=0"
    assert (await post_signed(stack, path, status)).status_code == 200

    async def status_event() -> list[dict[str, Any]]:
        return received(hook, secret, "message.status")

    event = (await eventually(status_event, what="the message.status webhook"))[0]
    assert event["conversation_id"] == convs[0]["id"]
    assert event["data"]["status"] == "delivered"
    assert event["data"]["turn_id"] == delivery["turn_id"]
    delivered = await deliveries()
    assert delivered is not None
    assert delivered[0]["status"] == "delivered"


async def test_an_email_bounce_reaches_webhooks(stack: Stack, hook: Receiver) -> None:
    secret = await subscribe(stack, hook, ["email.bounced"])
    await send(stack, mail("what are your hours?"))
    await eventually(lambda: _ready(stack.relay.messages), what="the mail reply")
    answer = stack.relay.messages[0]
    dsn = bounce(answer["Message-ID"], dsn_id="<dsn2@example.com>")
    assert (await send(stack, dsn, sender=""))[0] == 250

    async def bounced() -> list[dict[str, Any]]:
        return received(hook, secret, "email.bounced")

    event = (await eventually(bounced, what="the email.bounced webhook"))[0]
    conv = (await stack.api.get("/v1/conversations", params={"channel": "email"})).json()
    assert event["conversation_id"] == conv["items"][0]["id"]
    assert event["data"]["failed_turns"]


async def test_an_sms_conversation_opened_through_the_api_delivers_the_first_message(
    stack: Stack,
) -> None:
    await stack.restart_core(sms_from_number=OUR_NUMBER)
    body = {"channel": "sms", "identity": {"channel": "sms", "identifier": ALICE}}
    created = await stack.api.post("/v1/conversations", json=body)
    assert created.status_code == 201, created.text
    conv = created.json()
    assert (conv["user_address"], conv["our_address"]) == (ALICE, OUR_NUMBER)
    first = await stack.api.post(
        f"/v1/conversations/{conv['id']}/human-turns",
        json={"content": "Hi, this is Sam from Acme about your order."},
    )
    assert first.status_code == 200, first.text
    sent = await eventually(lambda: _ready(sent_messages(stack)), what="the first SMS")
    assert sent[0]["From"] == OUR_NUMBER
    assert "Sam from Acme" in sent[0]["Body"]
    # Their answer continues the same conversation.
    assert (await post_signed(stack, "/twilio/sms", sms_form("thanks, hours?"))).status_code == 200

    async def answered() -> list[str] | None:
        turns = (await stack.api.get(f"/v1/conversations/{conv['id']}/turns")).json()["items"]
        texts = [t["content"] for t in turns]
        return texts if "thanks, hours?" in texts else None

    await eventually(answered, what="the reply in the API-opened conversation")
    listed = (await stack.api.get("/v1/conversations", params={"channel": "sms"})).json()
    assert [c["id"] for c in listed["items"]] == [conv["id"]]
    # One open SMS conversation per thread (their number, our number).
    again = await stack.api.post("/v1/conversations", json=body)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "conversation_exists"
    assert again.json()["error"]["details"]["conversation_id"] == conv["id"]


async def test_an_email_conversation_opened_through_the_api_delivers_the_first_message(
    stack: Stack,
) -> None:
    body = {"channel": "email", "identity": {"channel": "email", "identifier": "Pat@Example.com"}}
    created = await stack.api.post("/v1/conversations", json=body)
    assert created.status_code == 201, created.text
    conv = created.json()
    assert conv["user_address"] == "pat@example.com"
    first = await stack.api.post(
        f"/v1/conversations/{conv['id']}/human-turns",
        json={"content": "Hello Pat, following up on your refund."},
    )
    assert first.status_code == 200, first.text
    await eventually(lambda: _ready(stack.relay.messages), what="the first mail")
    sent = stack.relay.messages[0]
    assert str(sent["To"]) == "pat@example.com"
    assert not str(sent["Subject"]).startswith("Re:")
    reply_to = str(sent["Reply-To"])
    assert reply_to.startswith("reply+")
    answer = mail("what are your hours?", subject="Re: x", sender="pat@example.com", to=reply_to)
    assert (await send(stack, answer, sender="pat@example.com", recipients=[reply_to]))[0] == 250

    async def answered() -> list[str] | None:
        turns = (await stack.api.get(f"/v1/conversations/{conv['id']}/turns")).json()["items"]
        texts = [t["content"] for t in turns]
        return texts if "what are your hours?" in texts else None

    await eventually(answered, what="the reply in the API-opened conversation")


async def test_an_sms_or_email_conversation_needs_an_address(stack: Stack) -> None:
    for body in (
        {"channel": "sms"},
        {"channel": "email"},
        {"channel": "sms", "identity": {"channel": "email", "identifier": "a@example.com"}},
    ):
        refused = await stack.api.post("/v1/conversations", json=body)
        assert refused.status_code == 422, (body, refused.text)
        assert refused.json()["error"]["code"] == "address_required"
    # Without an SMS number configured, the reason names the setting.
    body = {"channel": "sms", "identity": {"channel": "sms", "identifier": ALICE}}
    unconfigured = await stack.api.post("/v1/conversations", json=body)
    assert unconfigured.status_code == 422
    assert "SWITCHBOARD_SMS_FROM_NUMBER" in unconfigured.json()["error"]["message"]


async def _ready(items: list[Any]) -> list[Any] | None:
    return items or None
