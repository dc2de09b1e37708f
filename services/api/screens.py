"""Telling core that an operators' screen is open, so that it sends the console's live notices
(`gw.ops.*`); with none open it sends none (services/core/audience.py).

Two signals, as for webhook subscriptions: a key in Valkey that says so for `PRESENCE_SECONDS`,
renewed by this process while any of its operators' streams is open (what a core replica that
starts later, or missed the announcement, reads), and an announcement on core NATS when a stream
opens (what core acts on at once).

Each open stream is told to re-read what it shows (`resync`) once every core has heard of it,
`settle_seconds` after the announcement: a turn applied while the announcement was in flight was
not announced. The same happens if the key lapsed while streams were open (Valkey away for
longer than the key lives, or restarted empty): a core that read it absent meanwhile sent
nothing. Whoever writes the key and finds it absent (a renewal, or a stream opening on any API)
announces `lapsed`, and every API has each of its streams re-read once every core has heard of
it: one re-read per stream, after the last of however many announcements come.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.bus import Bus
from shared.store import Store

log = logging.getLogger("switchboard.api")

# Long enough that a renewal failing twice in a row (Valkey away for a moment) changes nothing;
# after the last screen closes core goes on sending notices for at most this long.
PRESENCE_SECONDS = 30.0
RENEW_SECONDS = PRESENCE_SECONDS / 3
RETRY_SECONDS = 1.0  # after a renewal that failed

Resync = Callable[[], None]
LAPSED = b"lapsed"


class OperatorScreens:
    def __init__(self, store: Store, bus: Bus, settle_seconds: float) -> None:
        self.store = store
        self.bus = bus
        self.settle_seconds = settle_seconds
        self._streams: set[Resync] = set()
        self._pending: dict[Resync, asyncio.TimerHandle] = {}  # re-reads scheduled
        self._renewing: asyncio.Task[None] | None = None
        self._lapses: Subscription | None = None

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def start(self) -> None:
        self._lapses = await self.bus.nc.subscribe(
            self.bus.subjects.operators_watching, cb=self._on_announcement
        )

    async def opened(self, resync: Resync) -> None:
        """A stream opens: core hears of it now, and `resync` is called once every core has.
        Raises if Valkey cannot be told (the request fails with 503 and the console retries), so
        no screen is open that core may not know of."""
        kept = await self.store.operators_watch(PRESENCE_SECONDS)
        # Absent: no stream was open (nothing to re-read elsewhere), or it lapsed under open ones.
        await self.bus.publish_core(self.bus.subjects.operators_watching, b"" if kept else LAPSED)
        self._streams.add(resync)
        self._resync_when_settled(resync)
        if self._renewing is None:
            # A context of its own: not the trace of the request that happened to start it.
            self._renewing = asyncio.create_task(
                self._renew(), name="operators' presence", context=contextvars.Context()
            )

    def closed(self, resync: Resync) -> None:
        self._streams.discard(resync)
        if (pending := self._pending.pop(resync, None)) is not None:
            pending.cancel()
        if not self._streams and self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    async def aclose(self) -> None:
        self._streams.clear()
        for pending in self._pending.values():
            pending.cancel()
        self._pending.clear()
        if self._lapses is not None:
            with contextlib.suppress(Exception):
                await self._lapses.unsubscribe()
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None

    def _resync_when_settled(self, resync: Resync) -> None:
        """One re-read, `settle_seconds` after the last reason for it (a later announcement moves
        a pending one later: it must come after every core has heard of that one too)."""
        if (pending := self._pending.pop(resync, None)) is not None:
            pending.cancel()
        loop = asyncio.get_running_loop()
        self._pending[resync] = loop.call_later(self.settle_seconds, self._settled, resync)

    def _resync_all_when_settled(self) -> None:
        for resync in list(self._streams):
            self._resync_when_settled(resync)

    def _settled(self, resync: Resync) -> None:
        self._pending.pop(resync, None)
        if resync in self._streams:
            resync()

    async def _on_announcement(self, msg: Msg) -> None:
        if msg.data == LAPSED:
            self._resync_all_when_settled()

    async def renew(self) -> None:
        """Write the presence again; if it had lapsed, announce `lapsed` so that every open
        stream, on every API, re-reads (this API's own at once, not waiting for the echo)."""
        if not await self.store.operators_watch(PRESENCE_SECONDS):
            log.warning("operators' presence had lapsed: announcing the streams again")
            self._resync_all_when_settled()
            await self.bus.publish_core(self.bus.subjects.operators_watching, LAPSED)

    async def _renew(self) -> None:
        failed = False
        while True:
            await asyncio.sleep(RETRY_SECONDS if failed else RENEW_SECONDS)
            try:
                await self.renew()
            except Exception as exc:  # tried again in a second, well inside the key's life
                failed = True
                log.warning("operators' presence not renewed: %s", exc)
            else:
                failed = False
