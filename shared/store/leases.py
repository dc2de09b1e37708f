"""Partition leases: which replica of a group (every `core`) owns which partition.

A lease is a key holding its owner's id with a time-to-live. Every replica heartbeats its
membership (a sorted set scored by expiry on Valkey's clock, so replicas' clocks never need to
agree) and renews its leases every `ttl / 3`. Partitions are split by rendezvous hashing over the
live members: every replica computes the same split without talking to the others, a replica takes
the free partitions hashed to it and hands back those hashed to a newer member, and a member
joining or leaving moves only the partitions that hash to it. A replica that stops renewing
(kill -9, cut off from Valkey) loses its leases when they expire, and the owner-to-be takes them on
its next tick: at most `ttl` plus one tick.

`remaining()` is measured on the replica's own monotonic clock from the moment it *sent* the
renewal, so the lease can only be longer in Valkey than the replica believes. The keys of a group
share one hash tag, so the scripts work on a Valkey Cluster.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence

from shared.store.connection import Connection

# KEYS[1] the members sorted set. ARGV[1] this replica, ARGV[2] ttl in ms.
# Scores are expiry times on the server's clock, so replicas' clocks never need to agree.
# Returns the live members (this one included).
_HEARTBEAT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms)
redis.call('ZADD', KEYS[1], ms + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: lease keys. ARGV[1] this replica, ARGV[2] ttl in ms, ARGV[3..] per key: "take" (acquire
# if free, renew if ours) or "keep" (renew only if ours). Returns 1/0 per key: ours after this.
_LEASE = """
local out = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  elseif not owner and ARGV[2 + i] == 'take' then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS[1] a lease key. ARGV[1] this replica. Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def preferred_owner(partition: int, members: Sequence[str]) -> str:
    """Rendezvous hashing: every replica computes the same owner, and a member joining or
    leaving moves only the partitions that hash to it."""
    return max(members, key=lambda m: (zlib.crc32(f"{m}/{partition}".encode()), m))


class Leases:
    """One replica's view of the partition leases of its group (e.g. every `core`)."""

    def __init__(
        self, connection: Connection, group: str, replica: str, partitions: int, ttl: float
    ) -> None:
        self.connection = connection
        self.replica = replica
        self.partitions = partitions
        self.ttl = ttl
        self._members_key = connection.keys.lease_members(group)
        self._keys = [connection.keys.lease(group, p) for p in range(partitions)]
        self._heartbeat = connection.script(_HEARTBEAT)
        self._lease = connection.script(_LEASE)
        self._release = connection.script(_RELEASE)
        self._valid_until: dict[int, float] = {}  # partition -> monotonic time the lease ends

    @property
    def tick(self) -> float:
        return self.ttl / 3

    def owned(self) -> set[int]:
        now = time.monotonic()
        return {p for p, until in self._valid_until.items() if until > now}

    def remaining(self, partition: int) -> float:
        """Seconds this replica may still act as the partition's owner (0 if it is not)."""
        return max(0.0, self._valid_until.get(partition, 0.0) - time.monotonic())

    async def renew(self) -> tuple[set[int], set[int]]:
        """One tick: heartbeat, renew what we hold, take free partitions hashed to us.

        Returns (owned, to_hand_back): the partitions we now hold, and those among them that
        hash to another live member and should be handed back once drained.
        """
        sent = time.monotonic()
        ttl_ms = str(int(self.ttl * 1000))
        members = [
            m.decode() for m in await self._heartbeat([self._members_key], [self.replica, ttl_ms])
        ]
        if self.replica not in members:
            members.append(self.replica)
        mine = {p for p in range(self.partitions) if preferred_owner(p, members) == self.replica}
        held = self.owned()
        wanted = sorted(mine | held)
        if wanted:
            modes = ["take" if p in mine else "keep" for p in wanted]
            results = await self._lease(
                [self._keys[p] for p in wanted], [self.replica, ttl_ms, *modes]
            )
            for p, ok in zip(wanted, results, strict=True):
                if ok:
                    self._valid_until[p] = sent + self.ttl
                else:
                    self._valid_until.pop(p, None)
        owned = self.owned()
        return owned, owned - mine

    async def release(self, partition: int) -> None:
        """Give a partition back (after its consumer has drained), so the next owner need not
        wait for the lease to expire."""
        self._valid_until.pop(partition, None)
        await self._release([self._keys[partition]], [self.replica])

    async def leave(self) -> None:
        """Drop out of the members (on shutdown), so the others re-split at once."""
        await self.connection.redis.zrem(self._members_key, self.replica)
