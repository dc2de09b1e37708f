"""A lean HTTP/1.1 keep-alive client and latency statistics for the load generator.

The load generator shares the machine's cores with the gateway, so every cycle it spends is a cycle
the server does not get. httpx costs about a millisecond of CPU per request; this client writes one
pre-built request and parses the status line and Content-Length, which is all a benchmark needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from dataclasses import dataclass


class HttpError(RuntimeError):
    pass


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
