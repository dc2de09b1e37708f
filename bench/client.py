"""The load generator's building blocks: a lean HTTP/1.1 keep-alive client, a closed loop that
measures the gateway's CPU over its window, and latency statistics.

The load generator shares the machine's cores with the gateway, so every cycle it spends is a cycle
the server does not get. httpx costs about a millisecond of CPU per request; this client writes one
pre-built request and parses the status line and Content-Length, which is all a benchmark needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.cpu import CpuSnapshot, GatewayCpu

Config = dict[str, Any]


class HttpError(RuntimeError):
    pass


def hostport(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class Connection:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        head = [f"{method} {path} HTTP/1.1", f"host: {self.host}", f"content-length: {len(body)}"]
        head.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise HttpError("connection closed by the server")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding":
                raise HttpError("chunked responses are not supported by the bench client")
        return status, await self.reader.readexactly(length) if length else b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def closed_loop(
    workers: int,
    duration: float,
    warmup: float,
    step: Callable[[int], Awaitable[int]],
    cpu: GatewayCpu | None = None,
) -> Config:
    """`workers` loops calling `step` back to back; counts and times what lands after warm-up, and
    the CPU every process of the gateway spent in the same window."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = time.perf_counter()
    measure_from, end = started + warmup, started + warmup + duration
    window: list[CpuSnapshot] = []

    async def worker(index: int) -> None:
        while (now := time.perf_counter()) < end:
            status = await step(index)
            done = time.perf_counter()
            if now >= measure_from:
                if status in (200, 201):
                    latencies.append(done - now)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

    async def sample() -> None:
        assert cpu is not None
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        window.append(cpu.snapshot())
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        window.append(cpu.snapshot())

    await asyncio.gather(*(worker(i) for i in range(workers)), *([sample()] if cpu else []))
    result: Config = {
        "concurrency": workers,
        "seconds": duration,
        "per_second": round(len(latencies) / duration, 1),
        "latency": Latencies(latencies).summary(),
        "errors": errors,
    }
    if cpu is not None:
        result["cpu"] = GatewayCpu.per_operation(window[0], window[1], len(latencies), duration)
    return result


@dataclass
class Latencies:
    """Seconds per operation, reported in milliseconds."""

    samples: list[float]

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {"count": 0}
        ordered = sorted(self.samples)
        return {
            "count": len(ordered),
            "p50_ms": round(percentile(ordered, 50) * 1000, 2),
            "p90_ms": round(percentile(ordered, 90) * 1000, 2),
            "p99_ms": round(percentile(ordered, 99) * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats drifting
    return ordered[int(rank) - 1]
