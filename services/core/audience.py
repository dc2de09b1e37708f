"""Whether anyone reads core's events off the broker.

Every event is kept in its conversation's audit log in Valkey, the durable record that
`GET /v1/conversations/{id}/events` reads. Through JetStream, events go only to egress's webhook
fan-out, which delivers `live` sessions' events to webhook subscriptions. With no subscription,
publishing them would cost a store and a deletion in the broker and a fetch and an ack in egress
for nothing — about a third of a turn's CPU — so core publishes an event only while at least one
subscription exists and the session is `live`.

Core learns whether one exists from Valkey (read every `webhook_presence_seconds`) and at once
from the API, which announces every change on `gw.ctl.webhooks` (core NATS) before it answers the
request: a subscription the client has been told about is known to core before anything the
client sends next. Until its first read, and after any announcement, core assumes a subscription
exists: publishing an event nobody needed is harmless, skipping one somebody needed is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg

from shared.bus import Bus
from shared.models import SessionType
from shared.store import Store

log = logging.getLogger("switchboard.core")


class WebhookAudience:
    def __init__(self, store: Store, bus: Bus, refresh_seconds: float) -> None:
        self.store = store
        self.bus = bus
        self.refresh_seconds = refresh_seconds
        self.present = True
        self._announcements = 0  # a read that began before an announcement must not undo it
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wants(self, session_type: SessionType | None) -> bool:
        """Should an event of a session of this type go through the broker?"""
        return session_type == "live" and self.present

    async def start(self) -> None:
        await self.bus.nc.subscribe(self.bus.subjects.webhooks_changed, cb=self._on_change)
        await self._refresh_or_assume()
        self._task = asyncio.create_task(self._keep_fresh(), name="webhook-audience")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        seen = self._announcements
        present = await self.store.webhooks_exist()
        if seen == self._announcements:
            self.present = present

    async def _on_change(self, _msg: Msg) -> None:
        self._announcements += 1
        self.present = True  # a new subscription counts from now, before the read confirms it
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
        except Exception as exc:  # Valkey away: assume a subscription, read again later
            self.present = True
            log.warning("webhook subscriptions unreadable: %s", exc)
