"""The servers underneath fail under load: nats-server and valkey-server restart, and one node of
a three-node NATS cluster stops. Services must reconnect by themselves, say so on /readyz while
they cannot work, and lose nothing that was accepted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from services.supervisor.embedded import (
    ChildProcess,
    free_port,
    nats_environment,
    nats_server_binary,
    start_nats,
    start_valkey,
    wait_for_port,
)
from shared.store import Store
from tests.conftest import Servers, eventually
from tests.faults.conftest import Fleet, launch_fleet
from tests.faults.test_crash import LOAD_SETTINGS, settled
from tests.faults.traffic import Traffic

PROBED = ("api", "sms", "core", "egress")


async def readiness(fleet: Fleet) -> dict[str, int | None]:
    return {name: await fleet.probe(name) for name in PROBED}


async def outage(
    fleet: Fleet, what: str, stop: Callable[[], object], start: Callable[[], object]
) -> str:
    """Stop a server, see every service report not ready, start it, see them ready again."""
    await asyncio.to_thread(stop)

    async def all_unready() -> dict[str, int | None] | None:
        states = await readiness(fleet)
        return states if all(s == 503 for s in states.values()) else None

    down = await eventually(all_unready, timeout=30, what=f"/readyz 503 everywhere without {what}")
    await asyncio.sleep(1.0)  # traffic keeps coming while it is down
    await asyncio.to_thread(start)

    async def all_ready() -> bool:
        return all(s == 200 for s in (await readiness(fleet)).values())

    await eventually(all_ready, timeout=60, what=f"every service ready again after {what}")
    return f"{what} down: /readyz {down}; back: all 200"


async def when_accepted(traffic: Traffic, fraction: float) -> None:
    async def reached() -> bool:
        return traffic.accepted >= traffic.total * fraction

    await eventually(reached, timeout=120, what=f"{fraction:.0%} of the traffic accepted")


async def test_nats_and_valkey_restart_under_load_and_nothing_is_lost(
    namespace: str, tmp_path: Path
) -> None:
    data = tmp_path / "servers"
    nats_port, redis_port = free_port(), free_port()
    servers = {
        "nats": start_nats(data, "127.0.0.1", nats_port),
        "valkey": start_valkey(data, "127.0.0.1", redis_port),
    }
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        async with launch_fleet(
            f"nats://127.0.0.1:{nats_port}", redis_url, namespace, tmp_path, **LOAD_SETTINGS
        ) as fleet:
            traffic = Traffic(fleet, {"api": 20, "sms": 30, "email": 10}, per_sender=5)
            await traffic.open_api_conversations()
            sending = asyncio.create_task(traffic.run())
            notes = []
            await when_accepted(traffic, 0.2)

            def restart(name: str) -> Callable[[], object]:
                def start() -> None:
                    if name == "nats":
                        servers[name] = start_nats(data, "127.0.0.1", nats_port)
                    else:
                        servers[name] = start_valkey(data, "127.0.0.1", redis_port)

                return start

            notes.append(await outage(fleet, "nats-server", servers["nats"].stop, restart("nats")))
            await when_accepted(traffic, 0.5)
            notes.append(
                await outage(fleet, "valkey-server", servers["valkey"].stop, restart("valkey"))
            )
            await asyncio.wait_for(sending, 300)
            store = Store(redis_url, namespace)
            try:
                report = await settled(traffic, store)
            finally:
                await store.close()
    finally:
        for server in servers.values():
            server.stop()
    print("\n" + "\n".join(notes))
    print(f"nats-server and valkey-server restarted under load: {report.line()}")
    assert report.accepted == traffic.total
    assert not report.problems, report.problems[:20]


def start_cluster_node(
    data: Path, index: int, ports: list[int], cluster_ports: list[int]
) -> ChildProcess:
    routes = ",".join(f"nats://127.0.0.1:{p}" for i, p in enumerate(cluster_ports) if i != index)
    store = data / f"n{index}"
    store.mkdir(parents=True, exist_ok=True)
    node = ChildProcess(
        f"nats-{index}",
        [
            nats_server_binary(),
            "--jetstream",
            "--store_dir",
            str(store),
            "--addr",
            "127.0.0.1",
            "--port",
            str(ports[index]),
            "--server_name",
            f"n{index}",
            "--cluster_name",
            "switchboard-test",
            "--cluster",
            f"nats://127.0.0.1:{cluster_ports[index]}",
            "--routes",
            routes,
        ],
        data / "logs" / f"nats-{index}.log",
        env=nats_environment(),
    )
    wait_for_port("127.0.0.1", ports[index], node.proc, 20, node.name, node.log_path)
    return node


async def test_one_node_of_a_three_node_cluster_stops_under_load_and_nothing_is_lost(
    servers: Servers, namespace: str, tmp_path: Path
) -> None:
    ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    nodes = [start_cluster_node(tmp_path, i, ports, cluster_ports) for i in range(3)]
    nats_url = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    try:
        await eventually(
            lambda: _jetstream_ready(nats_url), timeout=60, what="a JetStream meta leader"
        )
        async with launch_fleet(
            nats_url, servers.redis_url, namespace, tmp_path, stream_replicas="3", **LOAD_SETTINGS
        ) as fleet:
            replicas = await _stream_replicas(nats_url, namespace)
            traffic = Traffic(fleet, {"api": 20, "sms": 30, "email": 10}, per_sender=5)
            await traffic.open_api_conversations()
            sending = asyncio.create_task(traffic.run())
            await when_accepted(traffic, 0.3)
            await asyncio.to_thread(nodes[1].stop)
            stopped_at = traffic.accepted
            await asyncio.wait_for(sending, 300)
            store = Store(servers.redis_url, namespace)
            try:
                report = await settled(traffic, store)
            finally:
                await store.close()
    finally:
        for node in nodes:
            node.stop()
    print(f"\nstreams and their replicas: {replicas}")
    print(f"node n1 of 3 stopped after {stopped_at} accepted: {report.line()}")
    assert set(replicas.values()) == {3}
    assert report.accepted == traffic.total
    assert not report.problems, report.problems[:20]


async def _jetstream_ready(nats_url: str) -> bool:
    import nats

    try:
        nc = await nats.connect(nats_url.split(","), connect_timeout=2, max_reconnect_attempts=0)
    except Exception:
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await nc.close()


async def _stream_replicas(nats_url: str, namespace: str) -> dict[str, int]:
    import nats

    nc = await nats.connect(nats_url.split(","))
    try:
        js = nc.jetstream()
        streams = await js.streams_info()
        return {
            s.config.name or "": s.config.num_replicas or 1
            for s in streams
            if (s.config.name or "").startswith(namespace.upper())
        }
    finally:
        await nc.close()
