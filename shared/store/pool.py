"""redis-py's connection pool without the per-command work we never use.

Every command takes a connection from the pool and gives it back. In redis-py 8.1 that costs,
besides the pool's lock and lists: a deprecated-arguments wrapper, four awaited observability
recorders (no-ops unless redis-py's OpenTelemetry metrics are enabled, which we never do), a
released-connection event for credential providers (we use none), and a full `connect()` under
the retry policy for a connection that is already connected. Under turns that was ~4 % of core's
CPU (py-spy). This pool keeps what guards correctness, unchanged: a connection that is not
connected is connected (through redis-py's own path, retries included), one with unread data is
dropped and reconnected, one that must reconnect is disconnected on release, and the pool's cap
(`max_connections`) still holds. The health check (a PING after `health_check_interval` idle) and
the command's read/write timeouts stay in the connection, where redis-py has them.

Written against redis==8.1.0 (requirements.lock); tests/integration/test_store.py has a
connection the server closed, and scripts the server forgot.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, TimeoutError


class LeanPool(redis.ConnectionPool):
    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        async with self._lock:
            connection = self.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            # Connected and nothing left unread: ready (redis-py would call connect() anyway,
            # which returns at once for a connected one, through its retry policy). Anything
            # else, a socket the server closed included, takes redis-py's own path.
            try:
                ready = connection.is_connected and not await connection.can_read()
            except (ConnectionError, TimeoutError, OSError):
                ready = False
            if not ready:
                await self.ensure_connection(connection)
            return connection  # type: ignore[no-any-return]
        except BaseException:
            await self.release(connection)
            raise

    async def release(self, connection: AbstractConnection) -> None:
        async with self._lock:
            self._in_use_connections.remove(connection)
            if connection.should_reconnect():  # type: ignore[no-untyped-call]
                await connection.disconnect()
            self._available_connections.append(connection)
