"""kill -9 in the middle of real traffic: core (which applies turns) and egress (which delivers
replies). Whatever the gateway acknowledged must be applied once, in order, and answered once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.store import Store
from tests.conftest import Servers, eventually
from tests.faults.conftest import Fleet, launch_fleet
from tests.faults.traffic import Traffic, settled

# One bench key sends everything, and API turns answer 504 fast while core is down.
LOAD_SETTINGS = {"turn_timeout_seconds": "3", "rate_limit_per_key_per_second": "100000"}


async def crash_mid_traffic(fleet: Fleet, traffic: Traffic, victim: str, at_fraction: float) -> int:
    """Send the traffic; kill -9 `victim` once `at_fraction` of it is accepted; restart it."""
    await traffic.open_api_conversations()
    sending = asyncio.create_task(traffic.run())
    await eventually(
        lambda: _true(traffic.accepted >= traffic.total * at_fraction),
        timeout=120,
        what=f"{at_fraction:.0%} of the traffic accepted",
    )
    await fleet.kill(victim)
    killed_at = traffic.accepted
    await asyncio.sleep(1.0)  # traffic keeps arriving while it is dead
    fleet.start(victim)
    await fleet.ready(victim)
    await asyncio.wait_for(sending, 300)
    return killed_at


@pytest.fixture
async def load_fleet(servers: Servers, namespace: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with launch_fleet(
        servers.nats_url, servers.redis_url, namespace, tmp_path, **LOAD_SETTINGS
    ) as fleet:
        yield fleet


async def test_kill_9_core_mid_2000_turns_loses_and_doubles_nothing(
    load_fleet: Fleet, store: Store
) -> None:
    traffic = Traffic(load_fleet, {"api": 80, "sms": 80, "email": 40}, per_sender=10)
    killed_at = await crash_mid_traffic(load_fleet, traffic, "core", 0.25)
    report = await settled(traffic, store)
    print(f"\nkill -9 core after {killed_at} accepted, 200 conversations: {report.line()}")
    assert report.accepted == 2000
    assert not report.problems, report.problems[:20]


async def test_kill_9_egress_mid_traffic_delivers_every_reply(
    load_fleet: Fleet, store: Store
) -> None:
    traffic = Traffic(load_fleet, {"sms": 40, "email": 20}, per_sender=5)
    killed_at = await crash_mid_traffic(load_fleet, traffic, "egress", 0.3)
    report = await settled(traffic, store)
    assert not report.problems, report.problems[:20]
    expected = await replies_by_channel(store)

    async def all_delivered() -> bool:
        sms, mail = delivered(load_fleet)
        return set(expected["sms"]) <= set(sms) and set(expected["email"]) <= set(mail)

    with contextlib.suppress(AssertionError):  # reported below, with what is missing
        await eventually(all_delivered, timeout=120, what="every reply delivered")
    sms, mail = delivered(load_fleet)
    missing = [t for t in expected["sms"] if t not in sms] + [
        t for t in expected["email"] if t not in mail
    ]
    doubled = {t: n for t, n in (sms + mail).items() if n > 1}
    print(
        f"\nkill -9 egress after {killed_at} accepted: replies expected "
        f"{len(expected['sms'])} SMS + {len(expected['email'])} email, delivered "
        f"{sum(sms.values())} SMS + {sum(mail.values())} email, missing {len(missing)}, "
        f"duplicated {len(doubled)} {sorted(doubled)}"
    )
    assert not missing, missing[:20]
    # A reply in flight when egress died may be sent again (Twilio has no idempotency key; a
    # relay may have taken the mail before the crash). Each duplicate names its turn (status
    # callback `turn=`, Message-ID), so it is recognisable; at most one per consumer in flight.
    assert len(doubled) <= 5, doubled


async def replies_by_channel(store: Store) -> dict[str, list[str]]:
    page = await store.list_conversations(cursor=None, limit=1000, filters={})
    found: dict[str, list[str]] = {"sms": [], "email": []}
    for conv in page.items:
        turns = await store.turns_after(conv.id, 0, 10_000)
        found[conv.channel] += [t.id for t in turns if t.role == "assistant"]
    return found


def delivered(fleet: Fleet) -> tuple[Counter[str], Counter[str]]:
    """Replies that reached the Twilio fake (by the turn in their status callback) and the relay
    (by Message-ID, which is `<turn id@domain>`)."""
    sms: Counter[str] = Counter()
    for request in fleet.fake.requests:
        if request.path.endswith("/Messages.json") and request.status == 201:
            query = parse_qs(urlsplit(request.form.get("StatusCallback", "")).query)
            sms[query.get("turn", ["?"])[0]] += 1
    mail: Counter[str] = Counter(
        str(m["Message-ID"]).strip("<>").split("@")[0] for m in fleet.relay.messages
    )
    return sms, mail


async def _true(value: bool) -> bool:
    return value
