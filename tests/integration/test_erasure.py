"""Erasure of an end user and retention: afterwards, nothing in the store (every key and value of
the test's namespace) or in the streams (every message still held) contains what they wrote or
where they are reached — while a bystander's data is all still there."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta

import msgspec
import pytest
from nats.js.errors import NotFoundError

from shared.envelopes import Identifier, InboundMessage
from shared.models import utcnow
from tests.conftest import Stack, eventually
from tests.integration.test_email import mail, send
from tests.integration.test_sms import OUR_NUMBER, post_signed, sms_form
from tests.integration.test_streaming_webhooks_sessions import Receiver

ERIN = "erin.private@example.com"
SAM = "+14155550177"
ERIN_TEXTS = ["mail words kumquat 5531", "quoted history pomelo 7710", "api words quince 8812"]
SAM_TEXTS = ["sms words tamarind 4471", "dead letter words soursop 6262"]
BYSTANDER = "bystander words rambutan 9090"


@pytest.fixture
async def hook(stack: Stack) -> AsyncIterator[Receiver]:
    """A customer endpoint that is down: every event's webhook job (the event, texts included)
    stays in OUTBOUND while egress retries it, as it would through a real outage."""
    async with Receiver(fail_first=10**9).serving() as rec:
        created = await stack.api.post("/v1/webhooks", json={"url": rec.url, "events": ["*"]})
        assert created.status_code == 201
        yield rec


async def store_dump(stack: Stack) -> bytes:
    """Every key and every value in the test's namespace, lower-cased."""
    r = stack.core.store.connection.redis
    parts: list[bytes] = []
    async for key in r.scan_iter(match=f"{stack.namespace}:*", count=500):
        parts.append(key)
        kind = (await r.type(key)).decode()
        if kind == "string":
            parts.append(await r.get(key) or b"")
        elif kind == "hash":
            for field, value in (await r.hgetall(key)).items():
                parts += [field, value]
        elif kind == "list":
            parts += await r.lrange(key, 0, -1)
        elif kind == "set":
            parts += list(await r.smembers(key))
        elif kind == "zset":
            parts += await r.zrange(key, 0, -1)
        elif kind != "none":  # "none": it expired between the scan and the read
            raise AssertionError(f"unexpected key type {kind} of {key!r}")
    return b"\n".join(parts).lower()


async def streams_dump(stack: Stack) -> bytes:
    """Every message the test's streams still hold (subject, headers and payload), lower-cased."""
    js, s = stack.core.bus.js, stack.core.subjects
    parts: list[bytes] = []
    for stream in (s.inbound_stream, s.outbound_stream, s.events_stream, s.dead_stream):
        info = await js.stream_info(stream)
        if not info.state.messages:
            continue
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue  # deleted
            parts += [
                (msg.subject or "").encode(),
                json.dumps(msg.headers or {}).encode(),
                msg.data or b"",
            ]
    return b"\n".join(parts).lower()


def found(haystack: bytes, needles: list[str]) -> list[str]:
    return [n for n in needles if n.lower().encode() in haystack]


async def test_erasing_an_end_user_leaves_nothing_of_them_in_the_store_or_the_streams(
    stack: Stack, hook: Receiver
) -> None:
    # Erin writes by email (with quoted history: an original is kept) and through the API.
    body = f"{ERIN_TEXTS[0]}\n\nOn Monday Support wrote:\n> {ERIN_TEXTS[1]}\n"
    assert (await send(stack, mail(body, sender=ERIN), sender=ERIN))[0] == 250
    opened = await stack.api.post(
        "/v1/conversations",
        json={"channel": "email", "identity": {"channel": "email", "identifier": ERIN}},
    )
    erin_api = opened.json()
    erin = erin_api["end_user_id"]
    said = await stack.api.post(
        f"/v1/conversations/{erin_api['id']}/turns", json={"user_message": ERIN_TEXTS[2]}
    )
    assert said.status_code == 200, said.text
    # Sam texts; a bystander uses the API.
    assert (
        await post_signed(stack, "/twilio/sms", sms_form(SAM_TEXTS[0], sender=SAM))
    ).status_code == 200
    # A message about Sam that could not be processed waits in the DEAD stream.
    unreadable = InboundMessage(
        id="env_from_the_future",
        v=99,
        channel="sms",
        received_at=utcnow(),
        sender=Identifier(kind="phone", raw=SAM, normalized=SAM),
        recipient=OUR_NUMBER,
        text=SAM_TEXTS[1],
    )
    await stack.core.bus.publish(
        stack.core.subjects.inbound("sms", unreadable.routing_key),
        msgspec.json.encode(unreadable),
        msg_id=unreadable.id,
    )
    other = (await stack.api.post("/v1/conversations", json={})).json()
    await stack.api.post(f"/v1/conversations/{other['id']}/turns", json={"user_message": BYSTANDER})

    async def all_delivered() -> bool:
        sms_sent = any(r.form.get("To") == SAM for r in stack.twilio.requests)
        mails = len(stack.relay.messages) >= 2  # the email reply and the API turn's answer
        hooks = sum(b"rambutan" in body or b"tamarind" in body for _, body in hook.received) >= 2
        dead = await stack.core.bus.js.stream_info(stack.core.subjects.dead_stream)
        return sms_sent and mails and hooks and dead.state.messages >= 1

    await eventually(all_delivered, timeout=20, what="replies sent and webhooks delivered")
    sam = (
        await stack.api.post("/v1/identity/resolve", json={"channel": "sms", "identifier": SAM})
    ).json()
    needles = [
        *ERIN_TEXTS,
        *SAM_TEXTS,
        ERIN,
        "erin.private",
        SAM,
        SAM[2:],
        erin,
        sam["end_user_id"],
    ]
    store_before, streams_before = await store_dump(stack), await streams_dump(stack)
    assert set(found(store_before, needles)) >= {*ERIN_TEXTS, SAM_TEXTS[0], ERIN, SAM}
    assert set(found(streams_before, needles)) >= {ERIN_TEXTS[0], ERIN_TEXTS[2], *SAM_TEXTS}

    erased = await stack.api.delete(f"/v1/end-users/{erin}")
    assert erased.status_code == 200, erased.text
    counts = erased.json()
    assert (counts["end_user_id"], counts["conversations"]) == (erin, 2)
    assert counts["turns"] >= 4
    assert counts["stream_messages"] > 0
    assert (await stack.api.delete(f"/v1/end-users/{sam['end_user_id']}")).status_code == 200
    print(f"erasure counts: {counts}")

    store_after, streams_after = await store_dump(stack), await streams_dump(stack)
    # The one trace left, in the store and the streams alike: the erasure's audit event, which
    # names the (now meaningless) end user id and nothing else of theirs.
    leftovers = [line for line in store_after.split(b"\n") if found(line, needles)]
    assert all(b"end_user.erased" in line for line in leftovers), leftovers[:10]
    assert found(store_after, needles[:-2]) == []
    print(f"held in the streams before: {len(streams_before.splitlines())} lines")
    naming = [m for m in streams_after.split(b"\n") if found(m, needles)]
    assert all(b"end_user.erased" in m for m in naming), naming[:5]
    assert found(streams_after, needles[:-2]) == []
    # What is not theirs is all still there, and the erasure itself is on record.
    assert BYSTANDER.encode() in store_after
    assert BYSTANDER.encode() in streams_after
    log = (await stack.api.get("/v1/erasures")).json()["items"]
    assert [(e["type"], e["data"]["end_user_id"]) for e in log] == [
        ("end_user.erased", sam["end_user_id"]),
        ("end_user.erased", erin),
    ]
    assert log[1]["data"]["conversations"] == 2
    assert found(json.dumps(log).lower().encode(), needles[:-2]) == []
    assert (await stack.api.get(f"/v1/end-users/{erin}")).status_code == 404
    assert (await stack.api.get(f"/v1/conversations/{erin_api['id']}")).status_code == 404
    assert (await stack.api.delete(f"/v1/end-users/{erin}")).status_code == 404
    # Writing again makes a new, unrelated end user.
    assert (
        await post_signed(stack, "/twilio/sms", sms_form("hello again", sender=SAM))
    ).status_code == 200
    resolved = await stack.api.post(
        "/v1/identity/resolve", json={"channel": "sms", "identifier": SAM}
    )
    assert resolved.json()["end_user_id"] != sam["end_user_id"]
    assert OUR_NUMBER  # our own number is not personal data and may stay


async def test_retention_closes_and_erases_conversations_idle_past_the_limit(
    stack: Stack, hook: Receiver
) -> None:
    old = (await stack.api.post("/v1/conversations", json={})).json()
    said = await stack.api.post(
        f"/v1/conversations/{old['id']}/turns", json={"user_message": "old words persimmon 3131"}
    )
    assert said.status_code == 200
    recent = (await stack.api.post("/v1/conversations", json={})).json()
    await stack.api.post(
        f"/v1/conversations/{recent['id']}/turns", json={"user_message": "recent words lychee 4242"}
    )

    async def held() -> bool:
        dump = await streams_dump(stack)
        return b"persimmon" in dump and b"lychee" in dump

    await eventually(held, what="both conversations' webhook jobs held in OUTBOUND")
    # Age the first conversation by two days, as time would have.
    r = stack.core.store.connection.redis
    key = f"{stack.namespace}:conv:{{{old['id']}}}"
    doc = json.loads(await r.hget(key, "doc"))
    long_ago = (utcnow() - timedelta(days=2)).isoformat()
    doc["created_at"] = long_ago
    await r.hset(key, mapping={"doc": json.dumps(doc), "updated_at": long_ago})
    await stack.restart_core(retention_days=1, retention_sweep_seconds=0.2)

    async def gone() -> bool:
        return (await stack.api.get(f"/v1/conversations/{old['id']}")).status_code == 404

    await eventually(gone, what="the idle conversation erased")
    store_after, streams_after = await store_dump(stack), await streams_dump(stack)
    assert found(store_after, ["persimmon"]) == []
    naming = [line for line in store_after.split(b"\n") if old["id"].lower().encode() in line]
    # The audit record; and a webhook attempt that was in flight during the sweep may still log
    # its event id (which names the conversation) and status code afterwards.
    assert all(b"conversation.erased" in line or b'"attempt":' in line for line in naming), naming
    assert found(streams_after, ["persimmon"]) == []
    assert b"lychee" in store_after
    assert b"lychee" in streams_after
    assert (await stack.api.get(f"/v1/conversations/{recent['id']}")).json()["status"] == "active"
    log = (await stack.api.get("/v1/erasures")).json()["items"]
    assert [(e["type"], e["data"]["conversation_id"]) for e in log] == [
        ("conversation.erased", old["id"])
    ]
