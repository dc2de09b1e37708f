"""The store's connections pack commands with hiredis: what reaches Valkey must be what redis-py's
own packer would have sent, byte for byte."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as redis

from shared.store.pool import HiredisPackedConnection, LeanPool

COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "a" * 40, 2, "sb:conv:{c_1}", "sb:log:{c_1}", b"\x00\xff\r\n", "", 604800, -1),
    ("HSET", "k", "name", "Zoë ✓ 日本", "n", 0),
    ("SET", "k", b"x" * 100_000),  # past redis-py's chunking cutoff
    ("ZADD", "k", 1.5, "m"),  # a float: left to redis-py
    ("CONFIG GET", "maxmemory"),  # a command name with a space: left to redis-py
    ("SET", "k", memoryview(b"abc")),
]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_is_packed_as_redis_py_packs_it(command: tuple[Any, ...]) -> None:
    ours = b"".join(HiredisPackedConnection().pack_command(*command))
    theirs = b"".join(bytes(part) for part in redis.Connection().pack_command(*command))
    assert ours == theirs


def test_a_bool_is_refused_as_redis_py_refuses_it() -> None:
    with pytest.raises(redis.DataError):
        HiredisPackedConnection().pack_command("SET", "k", True)


def test_only_plain_tcp_connections_are_swapped() -> None:
    assert LeanPool.from_url("redis://h:1/0").connection_class is HiredisPackedConnection
    assert LeanPool.from_url("rediss://h:1/0").connection_class is redis.SSLConnection
