"""Providers retry: Twilio re-posts a webhook it got no answer to, a mail server re-sends a message
after a lost 250. Three deliveries of the same thing, through the real processes, are one turn and
one reply."""

from __future__ import annotations

from email.message import EmailMessage

import aiosmtplib
import httpx

from shared.store import Store
from tests.conftest import Servers, eventually
from tests.faults.conftest import Fleet
from tests.twilio_forms import post_twilio, sms_form


async def test_the_same_webhook_and_the_same_mail_three_times_are_one_turn_each(
    fleet: Fleet, servers: Servers, namespace: str
) -> None:
    sms_url = fleet.url("sms") + "/twilio/sms"
    form = sms_form("what are your hours? sms-retried", "+14155550177", sid="SM" + "7" * 32)
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(3):
            assert (await post_twilio(sms_url, form, client=client)).status_code == 200
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "retry@example.com", "support@acme.test", "Hours"
    msg["Message-ID"] = "<mail-retried@example.com>"
    msg.set_content("what are your hours? mail-retried")
    for _ in range(3):
        await aiosmtplib.send(msg, hostname="127.0.0.1", port=fleet.ports["SMTP"], timeout=10)

    store = Store(servers.redis_url, namespace)
    try:

        async def both_answered() -> list[tuple[str, list[str]]] | None:
            page = await store.list_conversations(cursor=None, limit=10, filters={})
            found = [
                (c.channel, [t.role for t in await store.turns_after(c.id, 0, 100)])
                for c in page.items
            ]
            done = len(found) == 2 and all(len(roles) >= 2 for _, roles in found)
            return found if done else None

        found = await eventually(both_answered, timeout=30, what="both messages answered")
    finally:
        await store.close()
    assert sorted(found) == [("email", ["user", "assistant"]), ("sms", ["user", "assistant"])]

    async def delivered() -> tuple[int, int] | None:
        sms = sum(
            r.form.get("To") == "+14155550177" and r.status == 201 for r in fleet.fake.requests
        )
        mail = len(fleet.relay.messages)
        return (sms, mail) if sms and mail else None

    # One assistant turn each (above), so a second delivery could only be a resend.
    assert await eventually(delivered, timeout=30, what="both replies delivered") == (1, 1)
    print(
        "\nprovider retries: 3 identical SMS webhooks + 3 identical mails → 1 turn + 1 reply each"
    )
