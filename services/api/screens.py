"""Telling core that an operators' screen is open, so that it sends the console's live notices
(`gw.ops.*`); with none open it sends none (services/core/audience.py).

Two signals, as for webhook subscriptions: a key in Valkey that says so for `PRESENCE_SECONDS`,
renewed by this process while any of its operators' streams is open (what a core replica that
starts later, or missed the announcement, reads), and an announcement on core NATS when a stream
opens (what core acts on at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from shared.bus import Bus
from shared.store import Store

log = logging.getLogger("switchboard.api")

# Long enough that a renewal failing twice in a row (Valkey away for a moment) changes nothing;
# after the last screen closes core goes on sending notices for at most this long.
PRESENCE_SECONDS = 30.0


class OperatorScreens:
    def __init__(self, store: Store, bus: Bus) -> None:
        self.store = store
        self.bus = bus
        self._open = 0
        self._renewing: asyncio.Task[None] | None = None

    async def opened(self) -> None:
        """A stream opens: core hears of it now. Raises if Valkey cannot be told (the request
        fails with 503 and the console retries), so no screen is open that core may not know of."""
        await self.store.operators_watch(PRESENCE_SECONDS)
        await self.bus.publish_core(self.bus.subjects.operators_watching, b"")
        self._open += 1
        if self._renewing is None:
            self._renewing = asyncio.create_task(self._renew(), name="operators' presence")

    def closed(self) -> None:
        self._open -= 1
        if self._open == 0 and self._renewing is not None:
            self._renewing.cancel()
            self._renewing = None

    async def aclose(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_SECONDS / 3)
            try:
                await self.store.operators_watch(PRESENCE_SECONDS)
            except Exception as exc:  # the next renewal tries again, well inside the TTL
                log.warning("operators' presence not renewed: %s", exc)
