"""Whether anyone reads what core would publish besides the durable record: events for webhook
subscriptions, notices for operators' screens.

Every event is kept in its conversation's audit log in Valkey, the durable record that
`GET /v1/conversations/{id}/events` reads. Two readers take them off the broker as well:

- **Webhook subscriptions.** Through JetStream, events go only to egress's webhook fan-out,
  which delivers `live` sessions' events to subscriptions. With none, publishing them would cost
  a store and a deletion in the broker and a fetch and an ack in egress for nothing — about a
  third of a turn's CPU — so core publishes an event only while a subscription exists.
- **Operators' screens.** The console's live inbox follows `gw.ops.*` (core NATS, nothing
  stored) through the API's `GET /v1/events/stream`. With no screen open, two notices per
  exchange would be parsed and dropped by nats-server: about 6 % of a turn's CPU at 16
  connections (docs/performance.md). Core sends them only while a stream is open.

One rule for both (`Audience`): core learns whether the reader exists from Valkey (read every
`refresh_seconds`) and at once from the API, which announces on core NATS (`gw.ctl.*`) when one
appears — a webhook subscription created, an operators' stream opened — before it answers the
request. Until its first read, and after any announcement, core assumes the reader exists:
publishing what nobody reads is harmless, skipping what somebody reads is not. A read that began
before an announcement never undoes it.

What an announcement does not cover is its own flight: a turn core applies while the
announcement is still on its way is not announced. A webhook subscription is announced on the
connection the client's next turn is published on, so core hears of it before that turn. An
operators' stream re-reads what it shows after the announcement has had time to land (the API
sends it a `resync` frame; services/api/routes/handoffs.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg

from shared.bus import Bus
from shared.models import SessionType

log = logging.getLogger("switchboard.core")


class Audience:
    def __init__(
        self,
        what: str,
        read: Callable[[], Awaitable[bool]],
        bus: Bus,
        announcements: str,
        refresh_seconds: float,
    ) -> None:
        self.what = what  # for logs: "webhook subscriptions"
        self.read = read
        self.bus = bus
        self.announcements = announcements
        self.refresh_seconds = refresh_seconds
        self.present = True
        self._announced = 0  # a read that began before an announcement must not undo it
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.bus.nc.subscribe(self.announcements, cb=self._on_announcement)
        await self._refresh_or_assume()
        self._task = asyncio.create_task(self._keep_fresh(), name=f"audience {self.what}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        seen = self._announced
        present = await self.read()
        if seen == self._announced:
            self.present = present

    async def _on_announcement(self, _msg: Msg) -> None:
        self._announced += 1
        self.present = True  # counts from now, before the read confirms it
        self._changed.set()

    async def _keep_fresh(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.refresh_seconds)
            self._changed.clear()
            await self._refresh_or_assume()

    async def _refresh_or_assume(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # Valkey away: assume the reader exists, read again later
            self.present = True
            log.warning("%s unreadable: %s", self.what, exc)


class WebhookAudience(Audience):
    def wants(self, session_type: SessionType | None) -> bool:
        """Should an event of a session of this type go through the broker?"""
        return session_type == "live" and self.present


class OperatorAudience(Audience):
    def wants(self, session_type: SessionType | None) -> bool:
        """Should operators' screens hear of an event of a session of this type?"""
        return session_type != "simulation" and self.present  # replays are nobody's work
