"""SIGTERM to each service under load: it stops taking work, finishes what it holds, exits 0, and
after a restart nothing that was accepted is lost or doubled.

Every service runs as a real process against the session's nats-server and valkey-server; the
Twilio fake and the SMTP relay sink run in the test. Load is the fault suite's tagged traffic (API
turns, signed SMS webhooks, mail over SMTP and call starts), sent while the chosen service stops;
a sender resends what was refused, as its provider would.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from shared.store import Store
from tests.conftest import Servers, eventually
from tests.faults.conftest import SERVICES, Fleet
from tests.faults.traffic import Traffic, settled


@pytest.mark.parametrize("victim", SERVICES)
async def test_sigterm_under_load_loses_nothing(
    fleet: Fleet, servers: Servers, namespace: str, victim: str
) -> None:
    traffic = Traffic(fleet, {"api": 2, "sms": 4, "email": 3, "voice": 3}, per_sender=4)
    await traffic.open_api_conversations()
    sending = asyncio.create_task(traffic.run())
    await eventually(lambda: traffic.accepted >= 5, timeout=60, what="some load accepted")
    proc = fleet.procs[victim]
    proc.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(proc.wait, 45)
    assert exit_code == 0, (fleet.logs / f"{victim}.log").read_text()[-3000:]
    fleet.start(victim)
    await fleet.ready(victim)
    await asyncio.wait_for(sending, 300)
    store = Store(servers.redis_url, namespace)
    try:
        report = await settled(traffic, store, timeout=90)
    finally:
        await store.close()
    print(f"\nSIGTERM {victim}: {report.line()}")
    assert report.accepted == traffic.total
    assert not report.problems, report.problems[:20]
    # Every SMS answered once by Twilio: nothing the stopping egress held was sent twice or lost.
    expected = {s.address: len(s.accepted) for s in traffic.senders if s.kind == "sms"}
    await eventually(
        lambda: _sms_replies(fleet) == expected, timeout=60, what="one SMS reply per message"
    )


def _sms_replies(fleet: Fleet) -> dict[str, int]:
    sent = [r for r in fleet.fake.requests if r.path.endswith("Messages.json") and r.status == 201]
    return dict(Counter(r.form["To"] for r in sent))
