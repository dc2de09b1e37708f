"""Dead letters through the admin API: a reply that failed for good is marked `failed`, raises
`delivery.failed`, shows in `GET /v1/dead-letters` with its reason, and a replay puts it back
once; replaying a message that had in fact been applied never doubles a turn."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from services.twilio_fake.app import Fault
from tests.conftest import Stack, eventually, make_key
from tests.integration.test_sms import ALICE, conversations, post_signed, sent_messages, sms_form


async def _letters(stack: Stack) -> list[dict[str, Any]]:
    response = await stack.api.get("/v1/dead-letters")
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


async def test_a_failed_reply_is_marked_listed_and_replayed_once(stack: Stack) -> None:
    stack.twilio.faults.append(Fault(400, 21610, 1))  # "unsubscribed recipient": permanent
    await post_signed(stack, "/twilio/sms", sms_form("what are your hours?"))
    letters = await eventually(lambda: _letters(stack), what="the dead letter")
    assert len(letters) == 1
    letter = letters[0]
    assert letter["reason"].startswith("twilio_error 21610")
    assert letter["source_subject"].startswith(stack.core.subjects.outbound("sms"))
    assert letter["replayed_at"] is None
    conv = (await conversations(stack))[0]
    events = (await stack.api.get(f"/v1/conversations/{conv.id}/events")).json()["items"]
    failed = [e for e in events if e["type"] == "delivery.failed"]
    assert len(failed) == 1
    assert failed[0]["data"]["reason"].startswith("twilio_error 21610")
    turn_id = failed[0]["data"]["turn_id"]
    record = await stack.core.store.get_delivery(conv.id, turn_id)
    assert record is not None
    assert (record.status, record.error_code) == ("failed", "21610")
    assert sent_messages(stack) == []

    # The operator fixed the cause (the fault was one-off); the replay delivers it, once.
    replayed = await stack.api.post(f"/v1/dead-letters/{letter['id']}/replay")
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["source_subject"] == letter["source_subject"]
    sent = await eventually(lambda: _nonempty(sent_messages(stack)), what="the replayed reply")
    again = await stack.api.post(f"/v1/dead-letters/{letter['id']}/replay")
    assert again.status_code == 409
    assert again.json()["error"]["details"]["replayed_at"] == replayed.json()["replayed_at"]
    everything = await stack.api.post("/v1/dead-letters/replay-all")
    assert everything.json() == {"replayed": 0, "already_replayed": 1}
    shown = (await stack.api.get(f"/v1/dead-letters/{letter['id']}")).json()
    assert shown["replayed_at"] == replayed.json()["replayed_at"]

    async def delivered() -> Any:
        record = await stack.core.store.get_delivery(conv.id, turn_id)
        return record if record is not None and record.status != "failed" else None

    assert (await eventually(delivered, what="the delivery record")).provider_ids
    assert len(sent) == 1
    assert sent[0]["To"] == ALICE
    assert len(sent_messages(stack)) == 1


async def test_replaying_a_message_that_was_applied_does_not_double_the_turn(
    stack: Stack,
) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    bus = stack.core.bus
    # INBOUND is a work queue (the applied envelope is deleted once acked): keep a copy off the wire.
    published: list[Any] = []

    async def keep(msg: Any) -> None:
        published.append(msg)

    tap = await bus.nc.subscribe(bus.subjects.inbound_all, cb=keep)
    await bus.nc.flush()
    answered = await stack.api.post(
        f"/v1/conversations/{conv['id']}/turns", json={"user_message": "what are your hours?"}
    )
    assert answered.status_code == 200, answered.text
    await tap.unsubscribe()
    # As if core had died after applying the turn and the message had then been dead-lettered.
    info = await bus.js.stream_info(bus.subjects.inbound_stream)
    (stored,) = published
    await bus.dead_letter(stored.subject, stored.data, "max_deliver: simulated", 5)
    letter = (await _letters(stack))[0]

    replayed = await stack.api.post(f"/v1/dead-letters/{letter['id']}/replay")
    assert replayed.status_code == 200, replayed.text
    consumed = await eventually(
        lambda: _consumed(stack, info.state.last_seq + 1), what="core consuming the replay"
    )
    assert consumed
    turns = (await stack.api.get(f"/v1/conversations/{conv['id']}/turns")).json()["items"]
    assert [t["role"] for t in turns] == ["user", "assistant"]


async def test_dead_letters_are_admin_only_and_unknown_ids_are_404(stack: Stack) -> None:
    operator = await make_key(stack, "operator")
    listed = await stack.api.get("/v1/dead-letters", headers={"x-api-key": operator})
    assert listed.status_code == 403
    missing = await stack.api.post("/v1/dead-letters/dead_nope/replay")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    bad_cursor = await stack.api.get("/v1/dead-letters", params={"cursor": "x"})
    assert bad_cursor.status_code == 422


async def _nonempty(items: list[Any]) -> list[Any] | None:
    return items or None


async def _consumed(stack: Stack, seq: int) -> bool:
    """Every core partition consumer has acked up to the replay (stream sequence `seq`)."""
    bus = stack.core.bus
    info = await bus.js.stream_info(bus.subjects.inbound_stream)
    if info.state.last_seq < seq:
        return False
    consumers = await bus.js.consumers_info(bus.subjects.inbound_stream)
    return all(c.num_ack_pending == 0 and c.num_pending == 0 for c in consumers)


async def test_the_dead_command_lists_and_replays_once(stack: Stack) -> None:
    bus = stack.core.bus
    subject = bus.subjects.outbound("nobody")  # no consumer: the replay stays in the stream
    await bus.dead_letter(subject, b'{"id": "whj_x"}', "gave_up: webhook wh_1: HTTP 500", 9)
    letter = (await _letters(stack))[0]

    async def dead(*args: str) -> tuple[int, str]:
        env = {
            **os.environ,
            "NATS_URL": stack.servers.nats_url,
            "SWITCHBOARD_NAMESPACE": stack.namespace,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.supervisor", "dead", *args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await dead("list")
    assert code == 0, out
    assert letter["id"] in out
    assert "gave_up: webhook wh_1: HTTP 500" in out
    assert "1 dead letters, 1 not replayed" in out
    assert (await dead("replay", letter["id"]))[0] == 0
    code, out = await dead("replay", letter["id"])
    assert code == 1
    assert "already replayed" in out
    assert (await dead("replay", "--all"))[1].strip() == (
        "replayed 0 dead letters (1 had been replayed before)"
    )
    code, out = await dead("list", "--json")
    assert json.loads(out)[0]["replayed_at"] is not None
    info = await bus.js.stream_info(bus.subjects.outbound_stream, subjects_filter=subject)
    assert info.state.subjects == {subject: 1}  # the one replay, not two


async def test_an_inbound_message_with_bytes_that_are_not_utf8_is_dead_on_its_first_delivery(
    stack: Stack,
) -> None:
    """msgspec reports such bytes inside a string as UnicodeDecodeError, not a DecodeError: core
    must still call the message undecodable (dead at once), not retry it as a failure."""
    bus = stack.core.bus
    subject = bus.subjects.inbound("api", "conv_x")
    await bus.publish(
        subject, b'{"kind": "message", "id": "env_\xff", "channel": "api"}', msg_id="env_bad"
    )
    letters = await eventually(lambda: _letters(stack), what="the dead letter")
    assert [(x["source_subject"], x["deliveries"]) for x in letters] == [(subject, 1)]
    assert letters[0]["reason"].startswith("undecodable")
