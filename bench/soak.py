"""Soak: API turns for a while, sampling the broker's storage and memory and Valkey's memory.

The broker is a conveyor (shared/streams.py): with every consumer keeping up, JetStream's stored
bytes stay near zero and nats-server's memory flat however long the traffic runs, while Valkey
grows by what the turns themselves are.
"""

from __future__ import annotations

import asyncio
import time

import nats
import psutil
import redis.asyncio as redis

from bench.api import api_turns
from bench.client import Config


async def soak(cfg: Config) -> Config:
    nc = await nats.connect(cfg["nats_url"])
    js = nc.jetstream()
    store = redis.from_url(cfg["redis_url"])
    root = psutil.Process(cfg["gateway_pid"])
    broker = next(p for p in root.children(recursive=True) if p.name() == "nats-server")
    samples: list[dict[str, float]] = []
    began = time.monotonic()

    async def sample() -> None:
        account = await js.account_info()
        samples.append(
            {
                "t": round(time.monotonic() - began, 1),
                "jetstream_stored_bytes": account.storage,
                "nats_rss_bytes": broker.memory_info().rss,
                "valkey_used_bytes": int((await store.info("memory"))["used_memory"]),
            }
        )

    await sample()
    turns = asyncio.create_task(api_turns({**cfg, "warmup": 0.0}))
    while not turns.done():
        await asyncio.wait({turns}, timeout=cfg.get("sample_seconds", 1.0))
        await sample()
    result = turns.result()
    await nc.close()
    await store.aclose()
    completed = result["latency"].get("count", 0)
    stored = [s["jetstream_stored_bytes"] for s in samples]
    rss = [s["nats_rss_bytes"] for s in samples]
    valkey = samples[-1]["valkey_used_bytes"] - samples[0]["valkey_used_bytes"]
    return {
        "seconds": cfg["duration"],
        "turns": completed,
        "per_second": result["per_second"],
        "jetstream_stored_bytes": {"start": stored[0], "max": max(stored), "end": stored[-1]},
        "nats_rss_mb": {
            "start": round(rss[0] / 2**20, 1),
            "max": round(max(rss) / 2**20, 1),
            "end": round(rss[-1] / 2**20, 1),
        },
        "valkey_bytes_per_turn": round(valkey / completed) if completed else None,
        "samples": samples,
    }
