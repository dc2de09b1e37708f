"""Tagged traffic over the real channels, and the check that every accepted message was applied
exactly once, in order, and answered.

Each conversation is one sender: an API client, a phone texting, or a person replying in one mail
thread. A sender sends its messages one after another, each carrying a tag (`c17-m3`), and resends
a message it could not get accepted the way its provider would (same Idempotency-Key, same
MessageSid, same Message-ID), so "accepted" is exactly what the gateway acknowledged.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Literal

import aiosmtplib
import httpx

from shared.store import Store
from tests.conftest import ADMIN_KEY, TWILIO_SID, eventually
from tests.faults.conftest import OUR_NUMBER, Fleet
from tests.twilio_forms import post_twilio, sms_form

Kind = Literal["api", "sms", "email", "voice"]
TAG = re.compile(r"\bc(\d+)-m(\d+)\b")


@dataclass
class Sender:
    """One conversation's worth of messages (a voice sender places one call per message)."""

    index: int
    kind: Kind
    accepted: list[str] = field(default_factory=list)
    attempts: int = 0
    conversation_id: str | None = None  # API senders open theirs up front

    @property
    def address(self) -> str:
        if self.kind in ("sms", "voice"):
            return f"+1415555{self.index:04d}"
        return f"user{self.index}@example.com"


@dataclass
class Report:
    sent: int
    accepted: int
    applied: int
    lost: list[str]
    duplicated: list[str]
    out_of_order: list[str]
    unanswered: list[str]

    @property
    def problems(self) -> list[str]:
        return [
            *(f"lost {t}" for t in self.lost),
            *(f"duplicated {t}" for t in self.duplicated),
            *(f"out of order {c}" for c in self.out_of_order),
            *(f"unanswered {t}" for t in self.unanswered),
        ]

    def line(self) -> str:
        return (
            f"sent {self.sent} (attempts), accepted {self.accepted}, applied {self.applied}, "
            f"lost {len(self.lost)}, duplicated {len(self.duplicated)}, "
            f"out of order {len(self.out_of_order)}, unanswered {len(self.unanswered)}"
        )


class Traffic:
    def __init__(self, fleet: Fleet, mix: dict[Kind, int], per_sender: int) -> None:
        self.fleet = fleet
        self.per_sender = per_sender
        self.senders: list[Sender] = []
        for kind, count in mix.items():
            for _ in range(count):
                self.senders.append(Sender(len(self.senders), kind))
        self.api = httpx.AsyncClient(
            base_url=fleet.url("api"), headers={"x-api-key": ADMIN_KEY}, timeout=30
        )
        self.web = httpx.AsyncClient(timeout=30)
        self.sms_url = fleet.url("sms") + "/twilio/sms"
        self.smtp_port = fleet.ports["SMTP"]

    @property
    def accepted(self) -> int:
        return sum(len(s.accepted) for s in self.senders)

    @property
    def total(self) -> int:
        return len(self.senders) * self.per_sender

    async def open_api_conversations(self, agent_id: str | None = None) -> None:
        body = {"agent_id": agent_id} if agent_id else {}
        for sender in self.senders:
            if sender.kind == "api":
                response = await self.api.post("/v1/conversations", json=body)
                response.raise_for_status()
                sender.conversation_id = response.json()["id"]

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._send_all(s) for s in self.senders))
        finally:
            await self.api.aclose()
            await self.web.aclose()

    async def _send_all(self, sender: Sender) -> None:
        for n in range(self.per_sender):
            tag = f"c{sender.index}-m{n}"
            deadline = time.monotonic() + 120
            while not await self._send(sender, tag, n):
                assert time.monotonic() < deadline, f"{tag} never accepted"
                await asyncio.sleep(0.25)
            sender.accepted.append(tag)

    def call_sid(self, sender: Sender, n: int) -> str:
        return f"CA{sender.index:016x}{n:016x}"

    async def _send(self, sender: Sender, tag: str, n: int) -> bool:
        sender.attempts += 1
        try:
            if sender.kind == "api":
                response = await self.api.post(
                    f"/v1/conversations/{sender.conversation_id}/turns",
                    json={"user_message": f"what are your hours? {tag}"},
                    headers={"idempotency-key": tag},
                )
                # 504: stored in JetStream, the reply is late (core is down): accepted.
                return response.status_code in (200, 202, 504)
            if sender.kind == "sms":
                form = sms_form(
                    f"hello {tag}", sender.address, sid=f"SM{sender.index:016x}{n:016x}"
                )
                response = await post_twilio(self.sms_url, form, client=self.web)
                return response.status_code == 200
            if sender.kind == "voice":
                call = {
                    "CallSid": self.call_sid(sender, n),
                    "AccountSid": TWILIO_SID,
                    "From": sender.address,
                    "To": OUR_NUMBER,
                    "CallStatus": "ringing",
                }
                voice_url = self.fleet.url("voice") + "/twilio/voice"
                response = await post_twilio(voice_url, call, client=self.web)
                return response.status_code == 200
            msg = EmailMessage()
            first = f"<c{sender.index}-m0@example.com>"
            msg["From"], msg["To"] = sender.address, "support@acme.test"
            msg["Subject"] = f"{'Re: ' if n else ''}Question {sender.index}"
            msg["Message-ID"] = f"<{tag}@example.com>"
            if n:
                msg["In-Reply-To"], msg["References"] = first, first
            msg.set_content(f"what are your hours? {tag}")
            await aiosmtplib.send(msg, hostname="127.0.0.1", port=self.smtp_port, timeout=30)
            return True
        except (httpx.HTTPError, aiosmtplib.SMTPException, OSError):
            return False

    async def report(self, store: Store) -> Report:
        """What the store holds against what was accepted."""
        page = await store.list_conversations(cursor=None, limit=1000, filters={})
        seen: Counter[str] = Counter()
        order: dict[str, list[tuple[str, int]]] = {}  # sender -> [(conversation, m)]
        unanswered: list[str] = []
        for conv in page.items:
            turns = await store.turns_after(conv.id, 0, 10_000)
            replies = Counter(t.envelope_id for t in turns if t.role == "assistant")
            for turn in turns:
                found = TAG.search(turn.content) if turn.role == "user" else None
                if found is None:
                    continue
                tag = found.group(0)
                seen[tag] += 1
                order.setdefault(found.group(1), []).append((conv.id, int(found.group(2))))
                if replies[turn.envelope_id] != 1:
                    unanswered.append(f"{tag} ({replies[turn.envelope_id]} replies)")
        # A call is one conversation per CallSid, with no user turn to find the tag in.
        for sender in self.senders:
            if sender.kind == "voice":
                for n, tag in enumerate(sender.accepted):
                    seen[tag] += bool(await store.conversation_by_call(self.call_sid(sender, n)))
        accepted = [t for s in self.senders for t in s.accepted]
        out_of_order = [
            f"c{sender}: {steps}"
            for sender, steps in order.items()
            if len({c for c, _ in steps}) != 1
            or [m for _, m in steps] != sorted(m for _, m in steps)
        ]
        return Report(
            sent=sum(s.attempts for s in self.senders),
            accepted=len(accepted),
            applied=sum(1 for t in accepted if seen[t] >= 1),
            lost=[t for t in accepted if seen[t] == 0],
            duplicated=[t for t, n in seen.items() if n > 1],
            out_of_order=out_of_order,
            unanswered=unanswered,
        )


async def settled(traffic: Traffic, store: Store, timeout: float = 180) -> Report:
    """The report once everything accepted is applied and answered (or the last one, on time-out)."""
    last: list[Report] = []

    async def done() -> Report | None:
        last[:] = [await traffic.report(store)]
        report = last[0]
        return report if report.applied == report.accepted and not report.problems else None

    try:
        return await eventually(done, timeout=timeout, what="every accepted message applied")
    except AssertionError:
        return last[0]
