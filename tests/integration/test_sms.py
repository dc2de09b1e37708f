"""The SMS channel end to end: signed Twilio webhooks in, the Twilio fake out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from tests.conftest import SMS_PUBLIC_URL, TWILIO_SID, TWILIO_TOKEN, Stack, eventually
from tests.twilio_forms import post_twilio, sign, sms_form

OUR_NUMBER = "+15550001111"
ALICE = "+14155550109"


async def post_signed(
    stack: Stack,
    path: str,
    form: dict[str, str],
    token: str = TWILIO_TOKEN,
    signature: str | None = None,
    traceparent: str | None = None,
) -> httpx.Response:
    """POST as Twilio does: the signature covers the public URL Twilio was configured with."""
    return await post_twilio(
        SMS_PUBLIC_URL + path,
        form,
        listening=stack.sms_url,
        token=token,
        signature=signature,
        headers={"traceparent": traceparent} if traceparent else None,
    )


def sent_messages(stack: Stack, to: str = ALICE) -> list[dict[str, str]]:
    return [
        r.form
        for r in stack.twilio.requests
        if r.path.endswith("/Messages.json") and r.status == 201 and r.form.get("To") == to
    ]


async def conversations(stack: Stack, channel: str = "sms") -> list[Any]:
    page = await stack.core.store.list_conversations(
        cursor=None, limit=100, filters={"channel": channel}
    )
    return page.items  # type: ignore[no-any-return]


async def transcript(stack: Stack, cid: str) -> list[tuple[str, str]]:
    return [(t.role, t.content) for t in await stack.core.store.turns_after(cid, 0, 1000)]


async def inbound_count(stack: Stack) -> int:
    """Envelopes ever stored in this test's INBOUND (a work queue: consumed ones are deleted, but
    the sequence keeps counting)."""
    info = await stack.core.bus.js.stream_info(stack.core.subjects.inbound_stream)
    return int(info.state.last_seq)


async def test_a_signed_text_gets_the_agents_reply_by_sms(stack: Stack) -> None:
    response = await post_signed(stack, "/twilio/sms", sms_form("how long do refunds take?"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert response.text.replace("\n", "") == '<?xml version="1.0" encoding="UTF-8"?><Response />'
    sent = await eventually(lambda: _ready(sent_messages(stack)), what="the reply SMS")
    assert sent[0]["From"] == OUR_NUMBER
    assert "14 days" in sent[0]["Body"]
    conv = (await conversations(stack))[0]
    delivery = await eventually(lambda: _first_delivery(stack, conv.id), what="the delivery record")
    # The callback names the turn and part, so a duplicate send would be recognisable.
    callback = f"{SMS_PUBLIC_URL}/twilio/sms/status?turn={delivery.turn_id}&part=0"
    assert sent[0]["StatusCallback"] == callback
    assert delivery.provider_ids[0].startswith("SM")
    assert delivery.status == "queued"


async def test_a_bad_or_missing_signature_is_403_and_nothing_is_published(stack: Stack) -> None:
    form = sms_form("hi")
    wrong = await post_signed(stack, "/twilio/sms", form, token="not-the-token")
    async with httpx.AsyncClient(base_url=stack.sms_url) as client:
        missing = await client.post("/twilio/sms", data=form)
    other_account = await post_signed(stack, "/twilio/sms", {**form, "AccountSid": "AC" + "2" * 32})
    assert (wrong.status_code, wrong.json()["error"]["details"]["reason"]) == (403, "mismatch")
    assert (missing.status_code, missing.json()["error"]["details"]["reason"]) == (403, "missing")
    assert other_account.json()["error"]["details"]["reason"] == "unknown_account"
    tampered = await post_signed(
        stack,
        "/twilio/sms",
        form,
        signature=sign(SMS_PUBLIC_URL + "/twilio/sms", {**form, "Body": "other"}),
    )
    assert tampered.status_code == 403
    assert await inbound_count(stack) == 0


async def test_a_signature_failure_names_the_url_it_was_checked_against(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy / ngrok trap: the answer and the log say which URL the check used."""
    form = sms_form("hi")
    local = sign(stack.sms_url + "/twilio/sms", form)
    with caplog.at_level(logging.WARNING):
        refused = await post_signed(stack, "/twilio/sms", form, signature=local)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["details"] == {"reason": "mismatch", "url": SMS_PUBLIC_URL + "/twilio/sms"}
    assert SMS_PUBLIC_URL + "/twilio/sms" in error["message"]
    logged = [r.getMessage() for r in caplog.records if r.name == "switchboard.http"]
    assert any(SMS_PUBLIC_URL + "/twilio/sms" in line for line in logged), logged
    status = sms_form("x", MessageStatus="delivered")
    async with httpx.AsyncClient(base_url=stack.sms_url) as client:
        missing = await client.post("/twilio/sms/status?turn=t1&part=0", data=status)
    assert missing.json()["error"]["details"] == {
        "reason": "missing",
        "url": SMS_PUBLIC_URL + "/twilio/sms/status?turn=t1&part=0",
    }


async def test_the_signature_is_checked_against_the_public_url_not_ours(stack: Stack) -> None:
    form = sms_form("hi")
    local = sign(stack.sms_url + "/twilio/sms", form)
    assert (await post_signed(stack, "/twilio/sms", form, signature=local)).status_code == 403


async def test_a_triple_delivery_of_one_message_is_one_turn(stack: Stack) -> None:
    form = sms_form("status of order 12345")
    for _ in range(3):
        assert (await post_signed(stack, "/twilio/sms", form)).status_code == 200
    await post_signed(stack, "/twilio/sms", sms_form("what are your hours?"))
    await eventually(lambda: _ready(sent_messages(stack), 2), what="two replies")
    conv = (await conversations(stack))[0]
    assert [r for r, _ in await transcript(stack, conv.id)] == ["user", "assistant"] * 2
    assert len(sent_messages(stack)) == 2
    assert await inbound_count(stack) == 2


async def test_texts_share_one_conversation_per_number_until_closed(stack: Stack) -> None:
    await post_signed(stack, "/twilio/sms", sms_form("hello"))
    await post_signed(stack, "/twilio/sms", sms_form("what are your hours?"))
    await eventually(lambda: _ready(sent_messages(stack), 2), what="two replies")
    first = await conversations(stack)
    assert len(first) == 1
    # Found by its thread key (sender + our number), as every channel's thread is.
    thread = f"{ALICE}|{OUR_NUMBER}"
    assert await stack.core.store.thread_conversation("sms", thread) == first[0].id
    await stack.api.post(f"/v1/conversations/{first[0].id}/close")
    await post_signed(stack, "/twilio/sms", sms_form("me again"))
    convs = await eventually(lambda: _ready(conversations(stack), 2), what="a new conversation")
    assert convs[0].id != first[0].id
    assert convs[0].end_user_id == first[0].end_user_id
    await eventually(lambda: _ready(sent_messages(stack), 3), what="the new conversation's reply")
    assert await stack.core.store.thread_conversation("sms", thread) == convs[0].id


async def test_stop_opts_out_and_nothing_more_is_sent_until_start(stack: Stack) -> None:
    await post_signed(stack, "/twilio/sms", sms_form("hello"))
    await eventually(lambda: _ready(sent_messages(stack)), what="the first reply")
    stop = await post_signed(stack, "/twilio/sms", sms_form("Stop"))
    assert stop.status_code == 200
    conv = (await conversations(stack))[0]

    async def opted_out() -> bool:
        return bool(await stack.core.store.is_opted_out("sms", OUR_NUMBER, ALICE))

    await eventually(opted_out, what="the opt-out")
    # An operator tries to write: recorded, not sent.
    await stack.api.post(f"/v1/conversations/{conv.id}/handoff")
    await stack.api.post(f"/v1/conversations/{conv.id}/human-turns", json={"content": "Hi?"})
    operator_turn = await eventually(
        lambda: _operator_delivery(stack, conv.id), what="the operator message's delivery record"
    )
    assert operator_turn.status == "suppressed"
    assert len(sent_messages(stack)) == 1
    assert all(c != "Stop" for _, c in await transcript(stack, conv.id))  # never a turn
    start = await post_signed(stack, "/twilio/sms", sms_form("START"))
    assert start.status_code == 200
    await eventually(lambda: _not(opted_out()), what="the opt-in")
    await stack.api.post(f"/v1/conversations/{conv.id}/human-turns", json={"content": "Back!"})
    sent = await eventually(lambda: _ready(sent_messages(stack), 2), what="a message after START")
    assert sent[-1]["Body"] == "Back!"


async def test_help_is_answered_with_the_help_text_and_never_reaches_the_agent(
    stack: Stack,
) -> None:
    response = await post_signed(stack, "/twilio/sms", sms_form("HELP"))
    assert "<Message>Acme Support: reply to this number" in response.text
    assert "Reply STOP to unsubscribe" in response.text
    assert await conversations(stack) == []


async def test_mms_media_become_attachments(stack: Stack) -> None:
    form = sms_form(
        "here is a photo of the damage",
        NumMedia="2",
        MediaUrl0="https://api.twilio.com/media/ME1",
        MediaContentType0="image/jpeg",
        MediaUrl1="https://api.twilio.com/media/ME2",
        MediaContentType1="image/png",
    )
    import msgspec

    from shared.envelopes import InboundMessage

    # Core consumes (and the work queue deletes) the envelope at once: watch it on the wire.
    published: list[bytes] = []

    async def keep(msg: Any) -> None:
        published.append(msg.data)

    nc = stack.core.bus.nc
    sub = await nc.subscribe(stack.core.subjects.inbound_all, cb=keep)
    await nc.flush()
    assert (await post_signed(stack, "/twilio/sms", form)).status_code == 200
    await eventually(lambda: asyncio.sleep(0, bool(published)), what="the envelope")
    await sub.unsubscribe()
    env = msgspec.json.decode(published[0], type=InboundMessage)
    assert [(a.url, a.content_type) for a in env.attachments] == [
        ("https://api.twilio.com/media/ME1", "image/jpeg"),
        ("https://api.twilio.com/media/ME2", "image/png"),
    ]
    assert env.provider_id == form["MessageSid"]
    assert env.sender is not None
    assert env.sender.normalized == ALICE


async def test_status_callbacks_move_the_delivery_forward_only(stack: Stack) -> None:
    await post_signed(stack, "/twilio/sms", sms_form("what are your hours?"))
    sent = await eventually(lambda: _ready(sent_messages(stack)), what="the reply")
    sid = next(r.response["sid"] for r in stack.twilio.requests if r.form == sent[0])
    conv = (await conversations(stack))[0]

    async def callback(status: str, **extra: str) -> httpx.Response:
        return await post_signed(
            stack,
            sent[0]["StatusCallback"].removeprefix(SMS_PUBLIC_URL),  # as Twilio calls it back
            {"MessageSid": sid, "AccountSid": TWILIO_SID, "MessageStatus": status, **extra},
        )

    assert (await callback("sent")).status_code == 200
    assert (await callback("delivered")).status_code == 200
    assert (await callback("sent")).status_code == 200  # late and out of order: ignored
    delivery = await stack.core.store.delivery_by_provider_id(sid)
    assert delivery.status == "delivered"
    assert delivery.conversation_id == conv.id
    bad = await post_signed(
        stack,
        "/twilio/sms/status",
        {"MessageSid": sid, "AccountSid": TWILIO_SID, "MessageStatus": "exploded"},
    )
    assert bad.status_code == 422


async def test_a_failed_status_records_the_error_code(stack: Stack) -> None:
    await post_signed(stack, "/twilio/sms", sms_form("hello"))
    sent = await eventually(lambda: _ready(sent_messages(stack)), what="the reply")
    sid = next(r.response["sid"] for r in stack.twilio.requests if r.form == sent[0])
    await post_signed(
        stack,
        "/twilio/sms/status",
        {
            "MessageSid": sid,
            "AccountSid": TWILIO_SID,
            "MessageStatus": "undelivered",
            "ErrorCode": "30003",
        },
    )
    delivery = await stack.core.store.delivery_by_provider_id(sid)
    assert (delivery.status, delivery.error_code) == ("undelivered", "30003")


async def test_a_handoff_over_sms_delivers_the_operators_message_as_sms(stack: Stack) -> None:
    await post_signed(stack, "/twilio/sms", sms_form("I want to talk to a human"))
    await eventually(lambda: _ready(sent_messages(stack)), what="the handoff reply")
    conv = (await conversations(stack))[0]
    assert (await stack.core.store.get_conversation(conv.id)).status == "waiting_for_human"
    await post_signed(stack, "/twilio/sms", sms_form("hello? anyone?"))
    # Nobody has claimed the handoff yet: the user hears the waiting line (once per wait).
    acked = await eventually(lambda: _ready(sent_messages(stack), 2), what="the waiting line")
    assert acked[1]["Body"].startswith("Thanks, your message is with our team.")
    await stack.api.post(
        f"/v1/conversations/{conv.id}/human-turns", json={"content": "Hi, this is Sam from Acme."}
    )
    sent = await eventually(lambda: _ready(sent_messages(stack), 3), what="the operator's SMS")
    assert sent[2]["Body"] == "Hi, this is Sam from Acme."
    assert sent[2]["From"] == OUR_NUMBER
    assert len(sent) == 3  # the AI did not answer "hello? anyone?"


async def test_transient_twilio_errors_are_retried(stack: Stack) -> None:
    stack.twilio.faults.append(_fault(503, 20500, 2))
    await post_signed(stack, "/twilio/sms", sms_form("what are your hours?"))
    sent = await eventually(lambda: _ready(sent_messages(stack)), timeout=15, what="the retry")
    assert "Monday" in sent[0]["Body"]
    assert [r.status for r in stack.twilio.requests][:3] == [503, 503, 201]


async def test_a_permanent_twilio_error_dead_letters_with_the_code(stack: Stack) -> None:
    await post_signed(stack, "/twilio/sms", sms_form("hello", sender="+15005550001"))
    letters = await eventually(lambda: _dead(stack), what="a dead letter")
    assert letters[0].reason.startswith("twilio_error 21211")
    conv = (await conversations(stack))[0]
    delivery = await eventually(lambda: _first_delivery(stack, conv.id), what="the failed delivery")
    assert (delivery.status, delivery.error_code) == ("failed", "21211")


async def test_long_replies_are_split_under_1600_characters(stack: Stack) -> None:
    from services.egress.sms import split_text

    text = ("word " * 700).strip()
    parts = split_text(text)
    assert len(parts) == 3
    assert all(len(p) <= 1600 for p in parts)
    assert " ".join(parts) == text
    assert split_text("x" * 3500) == ["x" * 1600, "x" * 1600, "x" * 300]


@pytest.mark.parametrize(
    "form",
    [
        {},
        {"MessageSid": "SM1", "AccountSid": TWILIO_SID},
        {
            "MessageSid": "SM1",
            "AccountSid": TWILIO_SID,
            "From": "junk",
            "To": OUR_NUMBER,
            "Body": "x",
        },
    ],
)
async def test_malformed_webhooks_are_4xx_and_publish_nothing(
    stack: Stack, form: dict[str, str]
) -> None:
    response = await post_signed(stack, "/twilio/sms", form)
    assert 400 <= response.status_code < 500, response.text
    assert await inbound_count(stack) == 0


# helpers ------------------------------------------------------------------------------------------


async def _ready(value: Any, n: int = 1) -> Any:
    items = await value if hasattr(value, "__await__") else value
    return items if len(items) >= n else None


async def _not(coro: Any) -> bool:
    return not await coro


async def _first_delivery(stack: Stack, cid: str) -> Any:
    deliveries = await stack.core.store.list_deliveries(cid)
    return deliveries[0] if deliveries else None


async def _operator_delivery(stack: Stack, cid: str) -> Any:
    turns = await stack.core.store.turns_after(cid, 0, 100)
    operator = [t for t in turns if t.author.kind == "operator"]
    return await stack.core.store.get_delivery(cid, operator[-1].id) if operator else None


async def _dead(stack: Stack) -> Any:
    import msgspec

    from shared.envelopes import DeadLetter

    js = stack.core.bus.js
    info = await js.stream_info(stack.core.subjects.dead_stream)
    if not info.state.messages:
        return None
    return [
        msgspec.json.decode(
            (await js.get_msg(stack.core.subjects.dead_stream, s)).data or b"", type=DeadLetter
        )
        for s in range(info.state.first_seq, info.state.last_seq + 1)
    ]


def _fault(status: int, code: int, count: int) -> Any:
    from services.twilio_fake.app import Fault

    return Fault(status, code, count)
