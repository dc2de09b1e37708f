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

Its plain TCP connections pack commands with hiredis's C packer (`hiredis.pack_command`), as
redis-py's synchronous client already does; the asyncio client packs in Python, 7 % of core's CPU
under turns (an append script's command: ~30 µs → ~4 µs). Commands with an argument of any other
type than bytes, str and int (a float, a bool redis-py refuses, a memoryview), or a command name
with a space, are left to redis-py's packer, so what reaches Valkey is byte for byte the same.

Written against redis==8.1.0 (requirements.lock); tests/integration/test_store.py has a
connection the server closed, and scripts the server forgot.
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError, TimeoutError

_PLAIN = frozenset((bytes, str, int))


class HiredisPackedConnection(redis.Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if " " in name if type(name) is str else b" " in name:
            return super().pack_command(*args)
        for arg in args:
            if type(arg) not in _PLAIN:
                return super().pack_command(*args)
        return [hiredis.pack_command(args)]


class LeanPool(redis.ConnectionPool):
    def __init__(
        self, connection_class: type[AbstractConnection] = redis.Connection, **kwargs: Any
    ) -> None:
        if connection_class is redis.Connection:  # not TLS or a Unix socket
            connection_class = HiredisPackedConnection
        super().__init__(connection_class=connection_class, **kwargs)

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
