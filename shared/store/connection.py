"""One connection to Valkey per process, shared by the store and the rate limiter.

It owns the client, the key recipes and the scripts registered on it; it is handed to the parts of
`shared/` that need Valkey, never out to a service.
"""

from __future__ import annotations

import redis.asyncio as redis
from redis.commands.core import AsyncScript

from shared.store.keys import Keys


class Connection:
    def __init__(self, url: str, namespace: str = "") -> None:
        self.redis: redis.Redis = redis.Redis.from_url(
            url, decode_responses=False, health_check_interval=10
        )
        self.keys = Keys(namespace)

    def script(self, source: str) -> AsyncScript:
        return self.redis.register_script(source)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (redis.RedisError, OSError):
            return False

    async def close(self) -> None:
        await self.redis.aclose()
