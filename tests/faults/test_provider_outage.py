"""A provider outage is not a poison message: with the SMTP relay gone, Twilio answering 503 and a
customer's webhook endpoint answering 503 for far longer than the old retry budget (six quick
redeliveries, ~6 s), users keep writing; once the providers return, every reply and every webhook
event is delivered exactly once, each recipient's replies in order, and nothing was dead-lettered. `pytest -s` prints the counts (docs/reliability.md keeps them)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from shared.bus import Bus
from shared.http import HttpServer
from shared.store import Store
from shared.subjects import Subjects
from tests.conftest import ADMIN_KEY, Servers, eventually
from tests.faults.conftest import launch_fleet
from tests.faults.traffic import Traffic
from tests.integration.test_streaming_webhooks_sessions import Receiver

OUTAGE_SECONDS = 25.0  # ~4× the old budget; the held messages retry every ≤ 3 s meanwhile


async def test_replies_outlast_a_relay_and_twilio_outage_and_arrive_once_in_order(
    servers: Servers, namespace: str, tmp_path: Path
) -> None:
    async with launch_fleet(
        servers.nats_url,
        servers.redis_url,
        namespace,
        tmp_path,
        egress_retry_base_seconds="0.5",
        egress_retry_max_delay_seconds="3",
    ) as fleet:
        bus = Bus(servers.nats_url, Subjects(namespace, 4), name="test-outage")
        await bus.connect()
        store = Store(servers.redis_url, namespace)
        receiver = Receiver(fail_first=10**9)  # the customer's endpoint answers 503 meanwhile
        endpoint = HttpServer(receiver.app(), "127.0.0.1", 0)
        await endpoint.start()
        try:
            async with httpx.AsyncClient(headers={"x-api-key": ADMIN_KEY}) as api:
                hook = await api.post(
                    fleet.url("api") + "/v1/webhooks",
                    json={
                        "url": f"http://127.0.0.1:{endpoint.port}/hook",
                        "events": ["turn.created"],
                    },
                )
                assert hook.status_code == 201, hook.text
            began = time.monotonic()
            await fleet.relay.stop()  # the relay goes away (and hangs up on egress)
            fleet.fake.outage = (503, 20500)  # Twilio answers every request with 503
            traffic = Traffic(fleet, {"sms": 8, "email": 4}, per_sender=3)
            await traffic.run()  # users write during the outage
            assert traffic.accepted == traffic.total

            async def replies_held() -> bool:
                return sum(r.status == 503 for r in fleet.fake.requests) >= 8

            await eventually(replies_held, timeout=30, what="egress trying Twilio in the outage")
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - began)))
            refused = sum(r.status == 503 for r in fleet.fake.requests)
            assert not [r for r in fleet.fake.requests if r.status == 201]
            assert fleet.relay.messages == []
            assert await bus.dead_letters() == []  # held, not dead-lettered
            outage = time.monotonic() - began
            refused_events = len(receiver.received)
            assert receiver.accepted == []
            fleet.fake.outage = None
            await fleet.relay.start()  # back, on the same port
            receiver.fail_first = len(receiver.received)  # and the endpoint answers 200 again
            returned = time.monotonic()

            report = await eventually(
                lambda: _all_answered(traffic, store), timeout=60, what="every message answered"
            )
            expected = await _replies(store)

            async def all_delivered() -> tuple[Counter[str], Counter[str]] | None:
                sms, mail = _delivered(fleet)
                done = set(sms) | set(mail) >= {t for turns in expected.values() for t in turns}
                return (sms, mail) if done else None

            sms, mail = await eventually(all_delivered, timeout=60, what="every reply delivered")
            events = {
                f"evt_turn.created_{turn.id}"
                for conv in (
                    await store.list_conversations(cursor=None, limit=1000, filters={})
                ).items
                for turn in await store.turns_after(conv.id, 0, 10_000)
            }

            async def all_events() -> bool:
                return {h["x-switchboard-event-id"] for h, _ in receiver.accepted} >= events

            await eventually(all_events, timeout=60, what="every turn.created webhook")
            drained = time.monotonic() - returned
            await asyncio.sleep(1.0)  # a duplicate would be a late extra send: give it a moment
            sms, mail = _delivered(fleet)
            wanted = {t for turns in expected.values() for t in turns}
            assert {t: n for t, n in (sms + mail).items() if n != 1} == {}
            assert set(sms + mail) == wanted
            accepted = Counter(h["x-switchboard-event-id"] for h, _ in receiver.accepted)
            assert {e: n for e, n in accepted.items() if n != 1} == {}
            assert set(accepted) == events
            assert _out_of_order(fleet, expected) == []
            assert await bus.dead_letters() == []
            for cid, turns in expected.items():
                for turn_id in turns:
                    record = await store.get_delivery(cid, turn_id)
                    assert record is not None
                    assert record.status in ("sent", "queued"), record
            log = (fleet.logs / "egress.log").read_text(errors="replace")
            for provider in ("Twilio Messaging", "SMTP relay"):
                assert f"provider outage begins: {provider}" in log
                assert f"provider outage ends: {provider}" in log
        finally:
            await endpoint.stop()
            await store.close()
            await bus.close()
    print(
        f"\nprovider outage: relay down + Twilio 503 for {outage:.0f}s while "
        f"{len(traffic.senders)} users wrote {traffic.accepted} messages; {report.line()}; "
        f"{refused} Twilio sends refused during the outage, 0 dead letters; after the providers "
        f"returned, {sum(sms.values())} SMS + {sum(mail.values())} emails delivered in "
        f"{drained:.1f}s, each exactly once, every recipient's in order; the webhook endpoint "
        f"refused {refused_events} attempts, then got all {len(events)} turn.created events once"
    )


async def _all_answered(traffic: Traffic, store: Store) -> object:
    report = await traffic.report(store)
    return report if report.applied == traffic.accepted and not report.problems else None


async def _replies(store: Store) -> dict[str, list[str]]:
    """Every assistant turn of every conversation, in seq order: what egress must deliver."""
    page = await store.list_conversations(cursor=None, limit=1000, filters={})
    return {
        conv.id: [
            t.id for t in await store.turns_after(conv.id, 0, 10_000) if t.role == "assistant"
        ]
        for conv in page.items
    }


def _delivered(fleet: object) -> tuple[Counter[str], Counter[str]]:
    """Turn ids of the SMS Twilio accepted (from each send's status callback) and of the mails
    the relay took (their Message-ID is `<turn_id@domain>`)."""
    sms: Counter[str] = Counter()
    for request in fleet.fake.requests:  # type: ignore[attr-defined]
        if request.status == 201 and request.path.endswith("/Messages.json"):
            query = parse_qs(urlsplit(request.form["StatusCallback"]).query)
            sms[query["turn"][0]] += 1
    mail = Counter(
        str(m["Message-ID"]).strip("<>").partition("@")[0]
        for m in fleet.relay.messages  # type: ignore[attr-defined]
    )
    return sms, mail


def _out_of_order(fleet: object, expected: dict[str, list[str]]) -> list[str]:
    """Recipients whose texts Twilio accepted in another order than their transcript's."""
    by_recipient: dict[str, list[str]] = {}
    for request in fleet.fake.requests:  # type: ignore[attr-defined]
        if request.status == 201 and request.path.endswith("/Messages.json"):
            turn = parse_qs(urlsplit(request.form["StatusCallback"]).query)["turn"][0]
            by_recipient.setdefault(request.form["To"], []).append(turn)
    position = {t: i for turns in expected.values() for i, t in enumerate(turns)}
    return [
        to for to, turns in by_recipient.items() if turns != sorted(turns, key=position.__getitem__)
    ]
