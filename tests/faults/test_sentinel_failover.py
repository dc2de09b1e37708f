"""A Sentinel-managed Valkey fails over under turns and loses none that were acknowledged.

The gateway (every service in this process) reaches Valkey through
`REDIS_URL=redis+sentinel://s1,s2,s3/switchboard/0?wait_replicas=1`: every turn append waits until
a replica has it before the turn is acknowledged. Writers send turns, each retried with its
Idempotency-Key until answered; the primary is killed with SIGKILL mid-traffic; the sentinels
promote the most up-to-date replica and the gateway follows. Every turn answered 200 — before,
during or after the failover — is then in its transcript exactly once, in order.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Servers, Stack, eventually
from tests.valkey_topologies import HOST, SentinelSet, start_sentinel_set

WRITERS = 4


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    group = start_sentinel_set(Path(tmp_path_factory.mktemp("valkey-sentinel")))
    yield group
    group.stop()


@pytest.fixture(scope="module")
def servers(servers: Servers, sentinel_set: SentinelSet) -> Servers:
    """The session's nats-server, with the Sentinel-managed set in place of the one valkey."""
    return replace(servers, redis_url=sentinel_set.url(wait_replicas=1))


async def transcript(stack: Stack, cid: str) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        page = await stack.api.get(f"/v1/conversations/{cid}/turns", params=params)
        assert page.status_code == 200, page.text
        turns += page.json()["items"]
        if not (cursor := page.json()["next_cursor"]):
            return turns


async def test_a_killed_primary_fails_over_without_losing_an_acknowledged_turn(
    stack: Stack, sentinel_set: SentinelSet
) -> None:
    assert stack.servers.redis_url.startswith("redis+sentinel://")
    cids = []
    for _ in range(WRITERS):
        created = await stack.api.post("/v1/conversations", json={})
        assert created.status_code == 201, created.text
        cids.append(created.json()["id"])
    acked: dict[str, list[str]] = {cid: [] for cid in cids}
    refused: list[int] = []  # status codes of attempts that were not acknowledged
    killed_at: list[float] = []
    stop = asyncio.Event()

    async def write(cid: str) -> None:
        i = 0
        while not stop.is_set():
            message = f"what are your hours? #{i}"
            try:
                answer = await stack.api.post(
                    f"/v1/conversations/{cid}/turns",
                    json={"user_message": message},
                    headers={"idempotency-key": f"{cid}-{i}"},
                    timeout=10,
                )
                status = answer.status_code
            except httpx.HTTPError:
                status = 0
            if status == 200:
                acked[cid].append(message)
                i += 1
            else:
                assert status in (0, 409, 500, 502, 503, 504), status
                refused.append(status)
                await asyncio.sleep(0.1)  # the same message again, under the same key

    def total() -> int:
        return sum(len(messages) for messages in acked.values())

    writers = [asyncio.create_task(write(cid)) for cid in cids]
    try:
        await eventually(lambda: total() >= 20, timeout=30, what="turns before the kill")
        old_primary = sentinel_set.primary()
        before = total()
        sentinel_set.servers[old_primary[1]].proc.send_signal(signal.SIGKILL)
        killed_at.append(time.monotonic())
        new_primary = await eventually(
            lambda: (p := sentinel_set.primary()) != old_primary and p,
            timeout=30,
            what="the sentinels to promote a replica",
        )
        promoted = time.monotonic() - killed_at[0]
        after_promotion = total()
        await eventually(
            lambda: all(len(m) >= 3 for m in acked.values()) and total() >= after_promotion + 20,
            timeout=60,
            what="turns acknowledged by the new primary",
        )
        answering = time.monotonic() - killed_at[0]
    finally:
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)

    for cid in cids:
        said = [t["content"] for t in await transcript(stack, cid) if t["role"] == "user"]
        # Every acknowledged turn is there, once, in order (a refused attempt may have landed
        # too: its retry under the same key found it, so it is acknowledged and not doubled).
        assert said[: len(acked[cid])] == acked[cid], (cid, said, acked[cid])
        assert len(said) == len(set(said)), said
    print(
        f"\nprimary {old_primary[1]} killed after {before} acknowledged turns; replica "
        f"{new_primary[1]} promoted after {promoted:.1f}s; turns answered again "
        f"{answering:.1f}s after the kill; {total()} acknowledged in all, "
        f"{len(refused)} attempts refused meanwhile (retried), 0 acknowledged turns lost"
    )
    assert new_primary[0] == HOST


async def test_a_turn_is_not_acknowledged_while_fewer_replicas_than_required_have_it(
    servers: Servers,
) -> None:
    """`wait_replicas` asks more replicas than exist: the write is refused as Unavailable (503 at
    the API, held by a consumer), never acknowledged on the primary alone."""
    from shared.errors import Unavailable
    from shared.store.connection import Connection

    # A second for the one replica to confirm, even on a loaded box: with 100 ms this test failed
    # once in a local run beside other work (not reproduced; a late confirmation is the likely
    # cause, which would make `replicas` below 0).
    connection = Connection(
        servers.redis_url.replace("wait_replicas=1", "wait_replicas=5&wait_timeout_ms=1000")
    )
    try:
        assert (connection.kind, connection.wait_replicas) == ("sentinel", 5)
        write = "return redis.call('INCR', KEYS[1])"
        with pytest.raises(Unavailable) as refused:
            await connection.replicated_script(write, ["t-wait-probe"], [], applied=lambda _: True)
        assert refused.value.details["required"] == 5
        assert 0 < refused.value.details["replicas"] < 5  # the remaining replica did confirm
        # A write whose outcome says nothing was applied is not held to the replicas.
        assert (
            await connection.replicated_script(write, ["t-wait-probe"], [], applied=lambda _: False)
            == 2
        )
    finally:
        await connection.close()
