"""SIGTERM to each service under load: it stops taking work, finishes what it holds, exits 0, and
after a restart nothing that was accepted is lost or doubled.

Every service runs as a real process against the session's nats-server and valkey-server; the
Twilio fake and the SMTP relay sink run in the test. Load is API turns, signed SMS webhooks, mail
over SMTP and call starts, each carrying a unique tag, sent while the chosen service is stopped.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from email.message import EmailMessage

import aiosmtplib
import httpx
import pytest

from shared.store import Store
from tests.conftest import ADMIN_KEY, TWILIO_SID, Servers, eventually
from tests.faults.conftest import OUR_NUMBER, SERVICES, Fleet
from tests.twilio_forms import post_twilio, sms_form


@dataclass
class Load:
    """What was sent and what was accepted (acknowledged to the sender)."""

    accepted: dict[str, list[str]] = field(
        default_factory=lambda: {"api": [], "sms": [], "email": [], "voice": []}
    )
    refused: int = 0


async def send_load(fleet: Fleet, load: Load, rounds: int, stop: asyncio.Event) -> None:
    api = httpx.AsyncClient(base_url=fleet.url("api"), headers={"x-api-key": ADMIN_KEY}, timeout=30)
    sms_url = fleet.url("sms") + "/twilio/sms"
    voice_url = fleet.url("voice") + "/twilio/voice"
    conv_id = None
    for i in range(rounds):
        if stop.is_set():
            break
        tag = f"r{i}-{time.monotonic_ns()}"
        try:
            if conv_id is None:
                conv_id = (await api.post("/v1/conversations", json={})).json()["id"]
            reply = await api.post(
                f"/v1/conversations/{conv_id}/turns",
                json={"user_message": f"what are your hours? api-{tag}"},
            )
            if reply.status_code in (200, 202, 504):
                load.accepted["api"].append(f"api-{tag}")
        except (httpx.HTTPError, KeyError):
            load.refused += 1
        sender = f"+1415555{i:04d}"
        form = sms_form(f"hello {tag}", sender, sid=f"SM{i:032x}")
        try:
            response = await post_twilio(sms_url, form)
            if response.status_code == 200:
                load.accepted["sms"].append(sender)
            else:
                load.refused += 1
        except httpx.HTTPError:
            load.refused += 1
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = f"user{i}@example.com", "support@acme.test", tag
        msg["Message-ID"] = f"<{tag}@example.com>"
        msg.set_content(f"what are your hours? mail-{tag}")
        try:
            await aiosmtplib.send(msg, hostname="127.0.0.1", port=fleet.ports["SMTP"], timeout=10)
            load.accepted["email"].append(f"mail-{tag}")
        except (aiosmtplib.SMTPException, OSError):
            load.refused += 1
        call = {
            "CallSid": f"CA{i:032x}",
            "AccountSid": TWILIO_SID,
            "From": sender,
            "To": OUR_NUMBER,
            "CallStatus": "ringing",
        }
        try:
            response = await post_twilio(voice_url, call)
            if response.status_code == 200:
                load.accepted["voice"].append(call["CallSid"])
            else:
                load.refused += 1
        except httpx.HTTPError:
            load.refused += 1
    await api.aclose()


@pytest.mark.parametrize("victim", SERVICES)
async def test_sigterm_under_load_loses_nothing(
    fleet: Fleet, servers: Servers, namespace: str, victim: str
) -> None:
    load = Load()
    stop = asyncio.Event()
    sender = asyncio.create_task(send_load(fleet, load, rounds=30, stop=stop))
    await eventually(lambda: _at_least(load, 5), timeout=60, what="some load accepted")
    proc = fleet.procs[victim]
    proc.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(proc.wait, 45)
    assert exit_code == 0, (fleet.logs / f"{victim}.log").read_text()[-3000:]
    fleet.start(victim)
    await fleet.ready(victim)
    await sender
    store = Store(servers.redis_url, namespace)
    try:
        await eventually(
            lambda: _all_applied(store, fleet, load),
            timeout=90,
            what="every accepted message applied once and answered",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {fleet.problems[:10]}") from None
    finally:
        await store.close()
    print(
        f"SIGTERM {victim}: accepted "
        f"{ {k: len(v) for k, v in load.accepted.items()} }, refused while down {load.refused}"
    )


async def _at_least(load: Load, n: int) -> bool:
    return sum(len(v) for v in load.accepted.values()) >= n


async def _all_applied(store: Store, fleet: Fleet, load: Load) -> bool:
    problems = await missing(store, fleet, load)
    fleet.problems = problems
    return not problems


async def missing(store: Store, fleet: Fleet, load: Load) -> list[str]:
    """What is not (yet) true of the accepted load; empty when everything arrived exactly once."""
    page = await store.list_conversations(cursor=None, limit=1000, filters={})
    turns_of = {conv.id: await store.turns_after(conv.id, 0, 1000) for conv in page.items}
    texts = [t.content for turns in turns_of.values() for t in turns if t.role == "user"]
    problems = [
        f"{tag}: {n} user turns"
        for tag in load.accepted["api"] + load.accepted["email"]
        if (n := sum(tag in text for text in texts)) != 1
    ]
    problems += [
        f"{cid}: unanswered"
        for cid, turns in turns_of.items()
        if sum(t.role == "assistant" for t in turns) < sum(t.role == "user" for t in turns)
    ]
    sms_turns = [t for t in texts if t.startswith("hello ")]
    if len(sms_turns) != len(load.accepted["sms"]):
        problems.append(f"sms: {len(sms_turns)} turns for {len(load.accepted['sms'])} accepted")
    problems += [
        f"{sid}: no conversation"
        for sid in load.accepted["voice"]
        if not await store.conversation_by_call(sid)
    ]
    sent = [r for r in fleet.fake.requests if r.path.endswith("Messages.json") and r.status == 201]
    recipients = [r.form["To"] for r in sent]
    problems += [f"{n}: no SMS reply" for n in load.accepted["sms"] if n not in recipients]
    problems += [
        f"{n}: {recipients.count(n)} SMS replies"
        for n in set(recipients)
        if recipients.count(n) > 1
    ]
    return problems
