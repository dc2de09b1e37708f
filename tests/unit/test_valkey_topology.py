"""REDIS_URL forms beyond one server, and the usage shard of a conversation's slot."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from shared.store.connection import Connection, parse_url
from shared.store.keys import Keys, slot_of, tag_for_slot


def test_a_cluster_url_lists_its_seed_nodes_and_credentials() -> None:
    topology = parse_url("redis+cluster://:s%40cret@10.0.0.1:7000,10.0.0.2:7001,valkey-2/0")
    assert topology.kind == "cluster"
    assert topology.hosts == [("10.0.0.1", 7000), ("10.0.0.2", 7001), ("valkey-2", 6379)]
    assert (topology.password, topology.db) == ("s@cret", 0)
    with pytest.raises(ValueError, match="only database 0"):
        parse_url("redis+cluster://h:7000/3")


def test_a_sentinel_url_names_its_sentinels_service_and_options() -> None:
    topology = parse_url("redis+sentinel://s1,s2:26380/switchboard/2?wait_replicas=1")
    assert topology.kind == "sentinel"
    assert topology.hosts == [("s1", 26379), ("s2", 26380)]
    assert (topology.service, topology.db) == ("switchboard", 2)
    assert topology.options == {"wait_replicas": "1"}
    with pytest.raises(ValueError, match="names its service"):
        parse_url("redis+sentinel://s1:26379")


async def test_connections_pick_their_client_and_keep_our_options_from_redis_py() -> None:
    cluster = Connection("redis+cluster://127.0.0.1:1/0")
    assert isinstance(cluster.redis, RedisCluster)
    assert cluster.keys.cluster
    single = Connection("redis://127.0.0.1:1/0?wait_replicas=2&wait_timeout_ms=50")
    assert (single.kind, single.wait_replicas, single.wait_timeout_ms) == ("single", 2, 50)
    for connection in (cluster, single):
        await connection.close()
    with pytest.raises(ValueError, match="not a cluster"):
        Connection("redis+cluster://127.0.0.1:1/0?wait_replicas=1")


def test_every_slot_has_a_solved_tag_and_usage_shards_share_the_conversations_slot() -> None:
    assert all(slot_of(tag_for_slot(slot)) == slot for slot in range(16384))
    keys = Keys("ns", cluster=True)
    for cid in ("conv_01J0000000000000000000000", "conv_x", "conv_01JZZZZZZZZZZZZZZZZZZZZZZZ"):
        assert key_slot(keys.usage_shard(cid).encode()) == key_slot(keys.conversation(cid).encode())
    assert len(set(keys.usage_shards())) == 16384
    assert Keys("ns").usage_shard("conv_x") == Keys("ns").usage() == "ns:usage"
    assert Keys("ns").usage_shards() == []
