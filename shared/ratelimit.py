"""Fixed-window rate limits in Valkey, shared by every replica of a service.

One atomic script per check: count the hit in the current window and, past the limit, answer how
many seconds remain until the window resets (the `Retry-After` a client should honour). A window
is a key that expires by itself, so nothing needs cleaning up.
"""

from __future__ import annotations

import math

import redis.asyncio as redis

from shared.errors import RateLimited

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


class RateLimiter:
    def __init__(self, client: redis.Redis, namespace: str = "") -> None:
        self.ns = f"{namespace}:" if namespace else ""
        self._hit = client.register_script(_HIT)

    async def check(self, bucket: str, limit: int, window_seconds: float, what: str) -> None:
        """Count one hit on `bucket`; raise RateLimited once `limit` hits fell in the window.
        A limit of 0 turns the check off."""
        if limit <= 0:
            return
        wait_ms = int(
            await self._hit(
                keys=[f"{self.ns}rate:{bucket}"], args=[limit, int(window_seconds * 1000)]
            )
        )
        if wait_ms > 0:
            raise RateLimited(
                f"too many requests for this {what}; retry later",
                retry_after=max(1, math.ceil(wait_ms / 1000)),
                details={"limit": limit, "window_seconds": window_seconds, "scope": what},
            )
