"""Two core replicas share the partitions, and when one is kill -9'd under traffic the other takes
its partitions over: nothing lost, nothing doubled, every conversation in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shared.store import Store
from tests.conftest import Servers, eventually
from tests.faults.conftest import Fleet, launch_fleet
from tests.faults.test_crash import LOAD_SETTINGS, settled
from tests.faults.traffic import Traffic

PARTITIONS = 4  # the fleet's
# Short leases and ack waits so the takeover fits a test; production defaults are 10 s each.
REPLICA_SETTINGS = {**LOAD_SETTINGS, "partition_lease_seconds": "2", "ack_wait_seconds": "2"}


@pytest.fixture
async def replicas(servers: Servers, namespace: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    async with launch_fleet(
        servers.nats_url, servers.redis_url, namespace, tmp_path, **REPLICA_SETTINGS
    ) as fleet:
        fleet.add_replica("core2", "core")
        fleet.start("core2")
        await fleet.ready("core2")
        yield fleet


@pytest.fixture
async def store(servers: Servers, namespace: str) -> AsyncIterator[Store]:
    store = Store(servers.redis_url, namespace)
    yield store
    await store.close()


async def lease_owners(store: Store) -> list[str | None]:
    keys = [store.connection.keys.lease("core", p) for p in range(PARTITIONS)]
    values = await store.connection.redis.mget(keys)
    return [v.decode() if v is not None else None for v in values]


async def test_kill_9_one_of_two_core_replicas_mid_traffic_loses_and_doubles_nothing(
    replicas: Fleet, store: Store
) -> None:
    async def split() -> list[str | None] | None:
        owners = await lease_owners(store)
        return owners if None not in owners and len(set(owners)) == 2 else None

    owners = await eventually(split, timeout=30, what="two core replicas splitting the partitions")
    traffic = Traffic(replicas, {"api": 40, "sms": 40, "email": 20}, per_sender=10)
    await traffic.open_api_conversations()
    sending = asyncio.create_task(traffic.run())
    await eventually(
        lambda: _true(traffic.accepted >= traffic.total * 0.3),
        timeout=120,
        what="30% of the traffic accepted",
    )
    await replicas.kill("core2")
    killed_at, killed = traffic.accepted, time.monotonic()

    async def taken_over() -> str | None:
        now = await lease_owners(store)
        return now[0] if None not in now and len(set(now)) == 1 else None

    # The killed replica cannot renew, so one owner of everything is the survivor.
    survivor = await eventually(taken_over, timeout=60, what="the survivor owning every partition")
    takeover = time.monotonic() - killed
    orphaned = [p for p, owner in enumerate(owners) if owner != survivor]
    await asyncio.wait_for(sending, 300)
    report = await settled(traffic, store)
    print(
        f"\nkill -9 one of two core replicas after {killed_at} accepted "
        f"({len(orphaned)} of {PARTITIONS} partitions orphaned, lease 2 s): "
        f"taken over after {takeover:.1f} s; {report.line()}"
    )
    assert report.accepted == traffic.total
    assert not report.problems, report.problems[:20]


async def _true(value: bool) -> bool:
    return value
