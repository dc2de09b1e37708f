"""Core through the real broker: channel envelopes, redelivery idempotency, dead letters, events."""

from __future__ import annotations

import msgspec

from shared.envelopes import (
    DeadLetter,
    Event,
    InboundMessage,
)
from shared.identity import make_identifier
from shared.ids import reply_key
from shared.models import Conversation, utcnow
from tests.conftest import Stack, eventually

OUR_NUMBER = "+15550001111"


def sms(
    text: str,
    sender: str = "+14155550109",
    env_id: str | None = None,
    channel: str = "sms",
    recipient: str = OUR_NUMBER,
) -> InboundMessage:
    from shared.ids import new_id

    return InboundMessage(
        id=env_id or new_id("env"),
        channel=channel,  # type: ignore[arg-type]
        received_at=utcnow(),
        text=text,
        sender=make_identifier("phone", sender),
        recipient=recipient,
    )


async def publish(stack: Stack, env: InboundMessage, msg_id: str | None = None) -> None:
    bus = stack.core.bus
    await bus.publish(
        bus.subjects.inbound(env.channel, env.routing_key),
        msgspec.json.encode(env),
        msg_id=msg_id or env.id,
    )


async def stream_items(stack: Stack, stream: str, type_: type) -> list:  # type: ignore[type-arg]
    js = stack.core.bus.js
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    items = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        items.append(msgspec.json.decode(msg.data or b"", type=type_))
    return items


async def texts_sent(stack: Stack, to: str) -> list[dict[str, str]]:
    """The SMS egress sent to `to`, as the Twilio fake received them."""
    return [
        r.form
        for r in stack.twilio.requests
        if r.path.endswith("/Messages.json") and r.status == 201 and r.form.get("To") == to
    ]


async def audit_log(stack: Stack, cid: str) -> list[Event]:
    page = (await stack.api.get(f"/v1/conversations/{cid}/events", params={"limit": 100})).json()
    return msgspec.json.decode(msgspec.json.encode(page["items"]), type=list[Event])


async def conversations(stack: Stack) -> list[Conversation]:
    page = await stack.core.store.list_conversations(cursor=None, limit=100, filters={})
    return page.items  # type: ignore[no-any-return]


async def user_turns(stack: Stack, cid: str) -> list[str]:
    turns = await stack.core.store.turns_after(cid, 0, 1000)
    return [t.content for t in turns if t.role == "user"]


async def test_a_channel_message_opens_a_conversation_and_the_reply_goes_out(stack: Stack) -> None:
    await publish(stack, sms("how long do refunds take?"))
    sent = await eventually(lambda: texts_sent(stack, "+14155550109"), what="a reply by SMS")
    assert sent[0]["From"] == OUR_NUMBER
    assert "14 days" in sent[0]["Body"]
    (conv,) = await conversations(stack)
    assert (conv.channel, conv.status, conv.our_address) == ("sms", "active", OUR_NUMBER)
    assert conv.user_address == "+14155550109"


async def test_the_same_envelope_delivered_twice_yields_one_turn_and_one_reply(
    stack: Stack,
) -> None:
    env = sms("status of order 12345", env_id="env_dup")
    await publish(stack, env, msg_id="first-delivery")
    await publish(stack, env, msg_id="second-delivery")  # past JetStream's dedupe: core must cope
    await publish(stack, sms("what are your hours?"))  # a later message proves the first two ran
    convs = await eventually(lambda: conversations(stack), what="a conversation")

    async def four_turns() -> bool:
        return (await stack.core.store.get_conversation(convs[0].id)).last_seq >= 4

    await eventually(four_turns, what="both messages applied")
    turns = await stack.core.store.turns_after(convs[0].id, 0, 100)
    assert [(t.role, t.content[:20]) for t in turns] == [
        ("user", "status of order 1234"),
        ("assistant", "Order 12345 is shipp"),
        ("user", "what are your hours?"),
        ("assistant", "Our support team is "),
    ]

    # The turn is stored before its reply is published, so wait for the later message's reply:
    # the partition consumer is ordered, so any reply to the redelivery was published before it.
    async def hours_reply_out() -> list[dict[str, str]]:
        sent = await texts_sent(stack, "+14155550109")
        return sent if any("support team" in o["Body"] for o in sent) else []

    sent = await eventually(hours_reply_out, what="the reply to the later message")
    assert [o["Body"][:20] for o in sent] == ["Order 12345 is shipp", "Our support team is "]


async def test_one_person_on_sms_and_voice_is_one_end_user_with_one_conversation_each(
    stack: Stack,
) -> None:
    await publish(stack, sms("hello", sender="(415) 555-0109"))
    await publish(stack, sms("hello", sender="+1 415 555 0109", channel="voice"))
    convs = await eventually(lambda: _at_least(conversations(stack), 2), what="two conversations")
    assert {c.channel for c in convs} == {"sms", "voice"}
    assert len({c.end_user_id for c in convs}) == 1


async def test_texts_to_one_number_share_a_conversation_until_it_is_closed(stack: Stack) -> None:
    await publish(stack, sms("hello"))
    await publish(stack, sms("what are your hours?"))
    first = await eventually(lambda: conversations(stack), what="a conversation")
    await eventually(lambda: _at_least(user_turns(stack, first[0].id), 2), what="two turns")
    assert len(await conversations(stack)) == 1
    closed = await stack.api.post(f"/v1/conversations/{first[0].id}/close")
    assert closed.status_code == 200
    await publish(stack, sms("back again"))
    convs = await eventually(lambda: _at_least(conversations(stack), 2), what="a new conversation")
    newest = convs[0]
    assert newest.id != first[0].id
    assert await eventually(lambda: user_turns(stack, newest.id)) == ["back again"]
    assert newest.end_user_id == first[0].end_user_id


async def test_another_of_our_numbers_is_another_conversation(stack: Stack) -> None:
    await publish(stack, sms("hello", recipient="+15550001111"))
    await publish(stack, sms("hello", recipient="+15550002222"))
    convs = await eventually(lambda: _at_least(conversations(stack), 2), what="two conversations")
    assert {c.our_address for c in convs} == {"+15550001111", "+15550002222"}


async def test_an_unknown_schema_version_is_dead_lettered_never_guessed(stack: Stack) -> None:
    raw = msgspec.json.decode(msgspec.json.encode(sms("hi")))
    raw["v"] = 99
    bus = stack.core.bus
    await bus.publish(bus.subjects.inbound("sms", "x"), msgspec.json.encode(raw), msg_id="v99")
    letters = await eventually(
        lambda: stream_items(stack, bus.subjects.dead_stream, DeadLetter), what="a dead letter"
    )
    assert letters[0].reason == "unknown_version: v=99"
    assert await conversations(stack) == []


async def test_a_channel_envelope_without_a_sender_is_dead_lettered(stack: Stack) -> None:
    env = InboundMessage(id="env_nosender", channel="sms", received_at=utcnow(), text="hi")
    await publish(stack, env)
    letters = await eventually(
        lambda: stream_items(stack, stack.core.subjects.dead_stream, DeadLetter),
        what="a dead letter",
    )
    assert "without a sender" in letters[0].reason


async def test_events_record_what_happened(stack: Stack) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    await stack.api.post(
        f"/v1/conversations/{conv['id']}/turns", json={"user_message": "get me a human"}
    )
    # Events leave the broker once egress fanned them out; the audit log in Valkey keeps them.
    events = await eventually(lambda: _at_least(audit_log(stack, conv["id"]), 6), what="events")
    kinds = [e.type for e in events if e.conversation_id == conv["id"]]
    assert kinds[0] == "conversation.created"
    # Every turn has its event, the handoff's system note too.
    roles = [e.data["role"] for e in events if e.type == "turn.created"]
    assert sorted(roles) == ["assistant", "system", "user"]
    assert "handoff.started" in kinds
    changed = next(e for e in events if e.type == "conversation.status_changed")
    assert changed.data == {"from": "active", "to": "waiting_for_human", "reason": "transfer_call"}
    assert changed.actor == "agent"


async def _at_least(items_coro, n: int):  # type: ignore[no-untyped-def]
    items = await items_coro
    return items if len(items) >= n else None


async def test_a_redelivery_finishes_an_approval_a_crash_left_half_done(stack: Stack) -> None:
    """Core recorded the suspend message, then died before creating the approval: the redelivered
    envelope must not leave the conversation active with a refund nobody can approve."""
    from shared.models import Author, ToolCall, Turn

    store = stack.core.store
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    env = InboundMessage(
        id="env_crashed",
        channel="api",
        received_at=utcnow(),
        conversation_id=conv["id"],
        text="please refund order 12345",
    )
    # What the crashed run had written: the user turn and the agent's suspend message.
    for turn, key in (
        (
            Turn(
                id="turn_env_crashed",
                conversation_id=conv["id"],
                seq=0,
                role="user",
                content=env.text,
                author=Author(kind="end_user"),
                created_at=utcnow(),
                envelope_id=env.id,
            ),
            env.id,
        ),
        (
            Turn(
                id="turn_env_crashed_reply",
                conversation_id=conv["id"],
                seq=0,
                role="assistant",
                content="I've asked a colleague to approve this.",
                author=Author(kind="agent"),
                created_at=utcnow(),
                envelope_id=env.id,
                tool_calls=(
                    ToolCall(
                        name="issue_refund",
                        arguments={"order_id": "12345"},
                        decision="require_approval",
                    ),
                ),
            ),
            reply_key(env.id),
        ),
    ):
        await store.append_turn(turn, allowed=("active",), dedupe_key=key, dedupe_ttl=60)
    await publish(stack, env)  # the redelivery

    async def awaiting() -> bool:
        return (await store.get_conversation(conv["id"])).status == "awaiting_approval"

    await eventually(awaiting, what="the approval to be created on redelivery")
    pending = (await stack.api.get("/v1/approvals", params={"status": "pending"})).json()["items"]
    assert [a["payload"] for a in pending if a["conversation_id"] == conv["id"]] == [
        {"tool": "issue_refund", "arguments": {"order_id": "12345"}, "user_seq": 1}
    ]
    assert len(await store.turns_after(conv["id"], 0, 10)) == 2  # nothing appended twice
