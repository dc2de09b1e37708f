"""One connection to Valkey per process, shared by the store and the rate limiter.

It owns the client, the key recipes and the scripts registered on it; it is handed to the parts of
`shared/` that need Valkey, never out to a service.

`REDIS_URL` names one of three deployments:

    redis://host:6379/0                              one server (rediss:// for TLS)
    redis+cluster://host:7000,host:7001/0            a Valkey/Redis Cluster: the listed nodes are
                                                     where the client learns the slot map
    redis+sentinel://host:26379,host:26380/service/0 a primary/replica set managed by Sentinel:
                                                     the client asks the sentinels for the primary
                                                     of `service` and follows a failover

Credentials go in the URL as usual (`redis+cluster://:secret@host:7000`); for Sentinel they are
the data nodes' (the sentinels are asked without them unless `?sentinel_password=` is given).
`?wait_replicas=N` (Sentinel or one server with replicas) makes every turn append wait until N
replicas have it (WAIT, `?wait_timeout_ms=`, default 1000) before it is acknowledged: a
failover then cannot lose an acknowledged turn (README, "Beyond one Valkey").
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError

from shared.errors import Unavailable
from shared.store.keys import Keys
from shared.store.pool import LeanPool

# redis-py's pool fails a command at once (MaxConnectionsError) past 100 connections in use; a
# burst of concurrent turns or requests needs more. Connections open on demand and stay pooled,
# so the cap costs nothing until a burst needs it (Valkey's default maxclients is 10000).
MAX_CONNECTIONS = 1024


@dataclass(frozen=True)
class Topology:
    """What a `REDIS_URL` names: the kind, the hosts, credentials and the options we read."""

    kind: str  # "single", "cluster" or "sentinel"
    hosts: list[tuple[str, int]]
    username: str | None
    password: str | None
    db: int
    service: str  # Sentinel: the monitored primary's name
    tls: bool
    options: dict[str, str]


def parse_url(url: str) -> Topology:
    """Read a `redis+cluster://` or `redis+sentinel://` URL (a plain one is redis-py's own)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    kind = "cluster" if scheme.endswith("+cluster") else "sentinel"
    default_port = 26379 if kind == "sentinel" else 6379
    netloc = parts.netloc.rpartition("@")[2]
    hosts = []
    for member in filter(None, netloc.split(",")):
        host, _, port = member.rpartition(":") if ":" in member else (member, "", "")
        hosts.append((host.strip("[]") or "127.0.0.1", int(port) if port else default_port))
    if not hosts:
        raise ValueError(f"{scheme} URL names no host: {url!r}")
    path = [unquote(p) for p in parts.path.split("/") if p]
    service = ""
    if kind == "sentinel":
        if not path:
            raise ValueError(f"a redis+sentinel URL names its service: {url!r}")
        service, path = path[0], path[1:]
    db = int(path[0]) if path else 0
    if kind == "cluster" and db != 0:
        raise ValueError("a Redis Cluster has only database 0")
    return Topology(
        kind=kind,
        hosts=hosts,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=db,
        service=service,
        tls=scheme.startswith("rediss"),
        options={k: v[-1] for k, v in parse_qs(parts.query).items()},
    )


_OPTIONS = ("wait_replicas", "wait_timeout_ms")


def _client(url: str) -> tuple[redis.Redis, str, dict[str, str]]:
    """The client for `url`, its kind, and the options the store itself reads."""
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis+cluster", "rediss+cluster", "redis+sentinel", "rediss+sentinel"):
        # Our options are not redis-py's: taken out of the query before it reads the rest.
        base, _, query = url.partition("?")
        ours = {k: v[-1] for k, v in parse_qs(query).items() if k in _OPTIONS}
        rest = "&".join(p for p in query.split("&") if p and p.split("=")[0] not in _OPTIONS)
        pool = LeanPool.from_url(
            f"{base}?{rest}" if rest else base,
            decode_responses=False,
            health_check_interval=10,
            max_connections=MAX_CONNECTIONS,
        )
        return redis.Redis.from_pool(pool), "single", ours
    topology = parse_url(url)
    auth: dict[str, Any] = {"username": topology.username, "password": topology.password}
    if topology.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in topology.hosts],
            decode_responses=False,
            ssl=topology.tls,
            **auth,
        )
        # Typed as the one-server client, whose commands it shares: the store builds no command a
        # cluster refuses (keys.py's rules), and the cluster tests hold it to that.
        return cast(redis.Redis, cluster), "cluster", topology.options
    sentinel_auth = (
        {"password": topology.options["sentinel_password"]}
        if ("sentinel_password" in topology.options)
        else {}
    )
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        topology.hosts,
        sentinel_kwargs={"socket_timeout": 1.0, **sentinel_auth},
        socket_timeout=5.0,
        ssl=topology.tls,
    )
    client = sentinel.master_for(
        topology.service,
        redis_class=redis.Redis,
        decode_responses=False,
        health_check_interval=10,
        max_connections=MAX_CONNECTIONS,
        db=topology.db,
        **auth,
    )
    return client, "sentinel", topology.options


class Script:
    """A Lua script run by its sha (EVALSHA), its body sent (SCRIPT LOAD) only when the server
    answers NOSCRIPT (restarted, flushed, or another cluster node). redis-py's `register_script`
    object does the same per call, plus an isinstance check against a typing Protocol and a copy
    of the keys and arguments: about 1 % of core's CPU under turns."""

    def __init__(self, client: redis.Redis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self._run(keys, args)
        except NoScriptError:
            await self.load()
            return await self._run(keys, args)

    def _run(self, keys: Sequence[Any], args: Sequence[Any]) -> Awaitable[Any]:
        command = self.client.execute_command  # untyped in redis-py
        return command("EVALSHA", self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]

    async def load(self) -> None:
        await self.client.script_load(self.source)


class Connection:
    def __init__(self, url: str, namespace: str = "") -> None:
        self.redis, self.kind, options = _client(url)
        self.cluster = self.kind == "cluster"
        self.keys = Keys(namespace, cluster=self.cluster)
        # Replicas that must hold a turn before it is acknowledged (0: don't wait).
        self.wait_replicas = int(options.get("wait_replicas", "0"))
        self.wait_timeout_ms = int(options.get("wait_timeout_ms", "1000"))
        if self.cluster and self.wait_replicas:
            raise ValueError(
                "wait_replicas is for one primary (Sentinel or one server), not a cluster"
            )

    async def in_order(self, *steps: Callable[[Pipeline], object]) -> list[Any]:
        """Run `steps` (each queues commands on a pipeline) so that each is done before the next
        begins: one MULTI on one server (one round trip, all or nothing), one pipeline per step on
        a cluster, where keys of different slots cannot share a transaction. Callers order the
        steps so that stopping after any of them leaves nothing a reader is misled by (keys.py)."""
        if not self.cluster:
            pipe = self.redis.pipeline(transaction=True)
            for step in steps:
                step(pipe)
            return list(await pipe.execute())
        results: list[Any] = []
        for step in steps:
            pipe = self.redis.pipeline(transaction=False)
            step(pipe)
            results += await pipe.execute()
        return results

    async def get_many(self, keys: list[str]) -> list[Any]:
        """GET of each key in one round trip (MGET, which a cluster refuses across slots)."""
        if not keys:
            return []
        if not self.cluster:
            return list(await self.redis.mget(keys))
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return list(await pipe.execute())

    async def replicated_script(
        self, source: str, keys: list[str], args: list[Any], applied: Callable[[Any], bool]
    ) -> Any:
        """Run a script, then WAIT for `wait_replicas` replicas, on one connection (one pipeline):
        WAIT covers the writes the primary had applied when this connection last wrote, so a WAIT
        on another pooled connection could return before the script's write is replicated. When
        `applied(result)` and too few replicas confirm in time, raise Unavailable: the caller does
        not acknowledge what it wrote (a retry finds it and waits again)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.eval(source, len(keys), *keys, *args)  # the body, not the sha: no NOSCRIPT to handle
        pipe.wait(self.wait_replicas, self.wait_timeout_ms)
        result, acked = await pipe.execute()
        if applied(result) and int(acked) < self.wait_replicas:
            raise Unavailable(
                f"only {acked} of {self.wait_replicas} Valkey replicas confirmed the write",
                details={"replicas": int(acked), "required": self.wait_replicas},
            )
        return result

    def script(self, source: str) -> Script:
        return Script(self.redis, source)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()
