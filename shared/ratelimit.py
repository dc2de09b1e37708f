"""Fixed-window rate limits in Valkey, shared by every replica of a service.

One atomic script per limit: count the hit in the current window and, past the limit, answer how
many milliseconds remain until the window resets (the `Retry-After` a client should honour). A
window is a key that expires by itself, so nothing needs cleaning up. Several limits can ride on
one pipeline with other reads (`Store.get_conversation_rate_limited`), so a hot path pays one
round trip for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from redis.asyncio.client import Pipeline

from shared.errors import RateLimited
from shared.store.connection import Connection

# KEYS: the window's counter. ARGV: limit, window in milliseconds.
# Returns 0 when allowed, else the milliseconds until the window resets.
_HIT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if count <= tonumber(ARGV[1]) then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]); ttl = tonumber(ARGV[2]) end
return ttl
"""


@dataclass(frozen=True)
class Limit:
    bucket: str  # what is counted: "key:<id>", "user:<id>", "sms:<number>"
    limit: int  # hits per window; 0 turns the limit off
    window_seconds: float
    what: str  # for people: "API key", "end user", "sender"


class RateLimiter:
    """Counts hits on the store's connection (`RateLimiter(store.connection)`)."""

    def __init__(self, connection: Connection) -> None:
        self._keys = connection.keys
        self._hit = connection.script(_HIT)
        self._cluster = connection.cluster

    def _args(self, limit: Limit) -> tuple[list[str], list[int]]:
        return [self._keys.rate(limit.bucket)], [limit.limit, int(limit.window_seconds * 1000)]

    async def check(self, limit: Limit) -> None:
        """Count one hit; raise RateLimited once the limit is reached in the window."""
        if limit.limit > 0:
            keys, args = self._args(limit)
            self.verdict([limit], [await self._hit(keys=keys, args=args)])

    def queue(self, pipe: Pipeline, limits: list[Limit]) -> None:
        """Count one hit of each (enabled) limit on `pipe`; pass its results to `verdict`.

        By sha only: a script registered on the pipeline would cost a SCRIPT EXISTS round trip on
        every execute. A server that lacks the script (restarted, flushed) answers NOSCRIPT for
        these commands and runs none of them; the caller then calls `load` and runs the pipeline
        again, so no hit is counted twice."""
        for limit in limits:
            if limit.limit > 0:
                keys, args = self._args(limit)
                if self._cluster:  # a cluster pipeline refuses EVALSHA: the script rides along
                    pipe.eval(_HIT, len(keys), *keys, *args)
                    continue
                pipe.evalsha(self._hit.sha, len(keys), *keys, *args)

    async def load(self) -> None:
        await self._hit.load()

    def verdict(self, limits: list[Limit], results: list[Any]) -> None:
        for limit, wait_ms in zip([lim for lim in limits if lim.limit > 0], results, strict=True):
            if int(wait_ms) > 0:
                raise RateLimited(
                    f"too many requests for this {limit.what}; retry later",
                    retry_after=max(1, math.ceil(int(wait_ms) / 1000)),
                    details={
                        "limit": limit.limit,
                        "window_seconds": limit.window_seconds,
                        "scope": limit.what,
                    },
                )
