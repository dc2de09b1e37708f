"""Which partitions this core replica applies: it keeps one running `PartitionConsumer` per
partition whose lease it holds (`shared.store.leases`), starts one when it takes a lease, and
stops one (draining it first) when it hands the partition back or its lease runs out.

Two replicas never consume a partition at the same time: a replica only starts a fetch that ends
well inside its lease, and a new owner applies nothing until every message the previous owner
still held is back in its own hands (`PartitionConsumer` take-over), so even a replica that
overslept its lease cannot apply a message concurrently with its successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from services.core.partitions import PartitionConsumer
from shared.store.leases import Leases

log = logging.getLogger("switchboard.core.ownership")


class PartitionOwner:
    """Keeps one running `PartitionConsumer` per partition this replica holds the lease of."""

    def __init__(
        self, leases: Leases, consumer_for: Callable[[int], PartitionConsumer], grace: float
    ) -> None:
        self.leases = leases
        self.consumer_for = consumer_for
        self.grace = grace
        self.consumers: dict[int, PartitionConsumer] = {}
        self._handing_back: dict[int, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Take the first partitions before returning (a lone replica owns them all at once)."""
        await self._tick()
        self._loop = asyncio.create_task(self._run(), name="partition-leases")

    async def stop(self) -> None:
        """Leave the members, drain every partition (in parallel) and give its lease back."""
        self._stopping.set()
        if self._loop is not None:
            await asyncio.gather(self._loop, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.leases.leave()
        await asyncio.gather(*self._handing_back.values(), return_exceptions=True)
        await asyncio.gather(
            *(self._hand_back(p) for p in list(self.consumers)), return_exceptions=True
        )

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.leases.tick)
            if self._stopping.is_set():
                return
            try:
                await self._tick()
            except Exception as exc:  # Valkey away: leases run out, consumers stop by themselves
                log.warning("lease renewal failed: %s: %s", type(exc).__name__, exc)

    async def _tick(self) -> None:
        owned, hand_back = await self.leases.renew()
        for partition, consumer in list(self.consumers.items()):
            if consumer.done and partition not in self._handing_back:
                del self.consumers[partition]  # its lease ran out (or it failed): start afresh
        for partition in sorted(owned - hand_back):
            if partition not in self.consumers and partition not in self._handing_back:
                consumer = self.consumer_for(partition)
                await consumer.start()
                self.consumers[partition] = consumer
                log.info("partition owned", extra={"partition": partition})
        for partition in hand_back:
            if partition not in self._handing_back:
                self._handing_back[partition] = asyncio.create_task(self._hand_back(partition))

    async def _hand_back(self, partition: int) -> None:
        try:
            consumer = self.consumers.get(partition)
            if consumer is not None:
                await consumer.stop(self.grace)
            await self.leases.release(partition)
            log.info("partition handed back", extra={"partition": partition})
        finally:
            self.consumers.pop(partition, None)
            self._handing_back.pop(partition, None)
