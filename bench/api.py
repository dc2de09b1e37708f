"""HTTP API scenarios: the ceiling, sync turns at scale, history growth, Valkey bytes per turn."""

from __future__ import annotations

import asyncio
import statistics
import time

import msgspec
import redis.asyncio as redis

from bench.client import Config, Connection, HttpError, closed_loop, hostport
from bench.cpu import GatewayCpu

TURN_TEXT = "how long do refunds take?"


class Api:
    """The gateway's HTTP API over one keep-alive connection."""

    def __init__(self, conn: Connection, key: str) -> None:
        self.conn = conn
        self.headers = {"x-api-key": key, "content-type": "application/json"}

    @classmethod
    async def open(cls, cfg: Config) -> Api:
        return cls(await Connection.open(*hostport(cfg["api"])), cfg["key"])

    async def conversation(self) -> str:
        status, body = await self.conn.request("POST", "/v1/conversations", b"{}", self.headers)
        if status != 201:
            raise HttpError(f"open conversation: {status} {body[:200]!r}")
        return str(msgspec.json.decode(body)["id"])

    async def turn(self, conv_id: str, text: str = TURN_TEXT) -> int:
        body = msgspec.json.encode({"user_message": text})
        status, _ = await self.conn.request(
            "POST", f"/v1/conversations/{conv_id}/turns", body, self.headers
        )
        return status


async def ceiling(cfg: Config) -> Config:
    body = msgspec.json.encode({"user_message": TURN_TEXT})
    headers = {"content-type": "application/json"}
    conns = [await Connection.open(*hostport(cfg["url"])) for _ in range(cfg["concurrency"])]

    async def step(i: int) -> int:
        status, _ = await conns[i].request("POST", "/v1/conversations/c/turns", body, headers)
        return status

    result = await closed_loop(cfg["concurrency"], cfg["duration"], cfg["warmup"], step)
    for conn in conns:
        await conn.close()
    return result


async def api_turns(cfg: Config) -> Config:
    """Synchronous turns from `concurrency` keep-alive connections over `conversations`
    conversations, with the CPU of every gateway process per turn.

    A conversation's turns are applied in order, so a conversation is in one client's hands at a
    time: a client takes the conversation that has waited longest, sends one turn, and puts it
    back. With many more conversations than connections, turns spread over every partition, as
    real traffic does; the cost per turn, not one conversation's latency, bounds the rate.
    """
    concurrency = cfg["concurrency"]
    clients = [await Api.open(cfg) for _ in range(concurrency)]
    count = max(cfg.get("conversations", 200), concurrency)
    free: asyncio.Queue[str] = asyncio.Queue()

    async def open_some(client: Api, n: int) -> None:
        for _ in range(n):
            free.put_nowait(await client.conversation())

    await asyncio.gather(
        *(open_some(c, len(range(i, count, concurrency))) for i, c in enumerate(clients))
    )

    async def step(i: int) -> int:
        conv = free.get_nowait()  # more conversations than clients: one is always free
        try:
            return await clients[i].turn(conv)
        finally:
            free.put_nowait(conv)

    cpu = GatewayCpu(cfg.get("gateway_pid"))
    result = await closed_loop(concurrency, cfg["duration"], cfg["warmup"], step, cpu)
    result["conversations"] = count
    for client in clients:
        await client.conn.close()
    return result


async def history(cfg: Config) -> Config:
    """Does turn N of a conversation cost more than turn 1? One conversation is grown to `turns`
    turns; then, `window` times, the first turn of a fresh conversation and the next turn of the
    long one are timed back to back, so host noise hits both sides alike."""
    api = await Api.open(cfg)
    long_conv = await api.conversation()
    for n in range(cfg["turns"] - 1):
        if await api.turn(long_conv) != 200:
            raise HttpError(f"turn {n + 1} failed")
    first: list[float] = []
    late: list[float] = []
    for _ in range(cfg.get("window", 50)):
        fresh = await api.conversation()
        for conv, samples in ((fresh, first), (long_conv, late)):
            began = time.perf_counter()
            if await api.turn(conv) != 200:
                raise HttpError("turn failed")
            samples.append(time.perf_counter() - began)
    await api.conn.close()
    first_ms = statistics.median(first) * 1000
    late_ms = statistics.median(late) * 1000
    return {
        "turns": cfg["turns"] + len(late) - 1,
        "first_turns_p50_ms": round(first_ms, 2),
        "last_turns_p50_ms": round(late_ms, 2),
        "ratio": round(late_ms / first_ms, 3),
        "window": len(late),
    }


async def memory(cfg: Config) -> Config:
    """Valkey's used memory before and after `conversations` conversations of `turns` turns."""
    store = redis.from_url(cfg["redis_url"])
    apis = [await Api.open(cfg) for _ in range(cfg.get("concurrency", 8))]
    # A first conversation warms lazily created structures (indexes, the agent) out of the delta.
    await apis[0].turn(await apis[0].conversation())
    before = int((await store.info("memory"))["used_memory"])
    queue = list(range(cfg["conversations"]))

    async def worker(api: Api) -> None:
        while queue:
            queue.pop()
            conv = await api.conversation()
            for _ in range(cfg["turns"]):
                if await api.turn(conv, "where is my order?") != 200:
                    raise HttpError("turn failed")

    await asyncio.gather(*(worker(api) for api in apis))
    after = int((await store.info("memory"))["used_memory"])
    await store.aclose()
    for api in apis:
        await api.conn.close()
    per_conversation = (after - before) / cfg["conversations"]
    return {
        "conversations": cfg["conversations"],
        "turns_per_conversation": cfg["turns"],
        "bytes_per_conversation": round(per_conversation),
        "bytes_per_turn": round(per_conversation / cfg["turns"]),
    }
