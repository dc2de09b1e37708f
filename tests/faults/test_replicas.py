"""Two core replicas share the partitions, and when one is kill -9'd under traffic the other takes
its partitions over: nothing lost, nothing doubled, every conversation in order. The agent is a
slow `http` bot, so the killed replica dies holding many messages of each partition."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shared.store import Store
from tests.conftest import ADMIN_KEY, Servers, eventually
from tests.faults.conftest import OUR_NUMBER, Fleet, launch_fleet
from tests.faults.test_crash import LOAD_SETTINGS, settled
from tests.faults.traffic import Report, Traffic

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


@contextlib.asynccontextmanager
async def slow_bot(seconds: float, answered: list[str]) -> AsyncIterator[str]:
    """A bot for the `http` runtime that takes `seconds` over every answer (each one appended to
    `answered`): its URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readline():
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                context = json.loads(await reader.readexactly(length))
                await asyncio.sleep(seconds)
                answered.append(context["message"]["text"])
                body = json.dumps({"text": f"answer to {context['message']['text']}"}).encode()
                head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
                writer.write(head.encode() + b"\r\n\r\n" + body)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/bot"
    finally:
        server.close()


async def route_everything_to(fleet: Fleet, bot_url: str) -> str:
    """An agent on the bot, answering our number and the mail domain; its id."""
    async with httpx.AsyncClient(
        base_url=fleet.url("api"), headers={"x-api-key": ADMIN_KEY}, timeout=10
    ) as api:
        revision = {"runtime": "http", "http": {"url": bot_url, "secret": "s" * 20}}
        response = await api.post("/v1/agents", json={"name": "Slow", "revision": revision})
        assert response.status_code == 201, response.text
        agent = str(response.json()["id"])
        for address in (OUR_NUMBER, "@acme.test"):
            routed = await api.put(f"/v1/routes/{address}", json={"agent_id": agent})
            assert routed.status_code == 200, routed.text
    return agent


async def lease_owners(store: Store) -> list[str | None]:
    keys = [store.connection.keys.lease("core", p) for p in range(PARTITIONS)]
    values = await store.connection.redis.mget(keys)
    return [v.decode() if v is not None else None for v in values]


async def test_kill_9_a_core_replica_while_a_slow_bot_holds_many_turns_in_flight(
    replicas: Fleet, store: Store
) -> None:
    """Every conversation's turn waits 0.3 s on the bot, so the killed replica dies holding many
    messages per partition (running and queued): they come back to the survivor, in order."""
    answered: list[str] = []
    async with slow_bot(0.3, answered) as bot:
        agent = await route_everything_to(replicas, bot)
        report, killed_at, orphaned, takeover = await kill_one_replica_mid_traffic(
            replicas, store, agent_id=agent
        )
    print(
        f"\nkill -9 one of two core replicas, 0.3 s bot, after {killed_at} accepted "
        f"({orphaned} of {PARTITIONS} partitions orphaned): taken over after {takeover:.1f} s; "
        f"{report.line()}"
    )
    assert report.accepted == 1000
    assert not report.problems, report.problems[:20]
    assert len(set(answered)) == 1000  # every turn was the bot's (some twice: killed mid-call)


async def kill_one_replica_mid_traffic(
    replicas: Fleet, store: Store, agent_id: str | None = None
) -> tuple[Report, int, int, float]:
    """1,000 tagged turns; kill -9 `core2` at 30 %; the report once everything settled, when it
    was killed, how many partitions it had, and how long until the survivor held them all."""

    async def split() -> list[str | None] | None:
        owners = await lease_owners(store)
        return owners if None not in owners and len(set(owners)) == 2 else None

    owners = await eventually(split, timeout=30, what="two core replicas splitting the partitions")
    traffic = Traffic(replicas, {"api": 40, "sms": 40, "email": 20}, per_sender=10)
    await traffic.open_api_conversations(agent_id)
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
    orphaned = sum(1 for owner in owners if owner != survivor)
    await asyncio.wait_for(sending, 300)
    return await settled(traffic, store), killed_at, orphaned, takeover


async def _true(value: bool) -> bool:
    return value
