"""The one store API over Redis/Valkey (redis-py asyncio), composed of one part per aggregate.

Every key is built in `keys.py`; everything about one conversation is `{conv_id}`-tagged so it
lives in one Redis Cluster slot and one Lua script can change it atomically. Changes that span
entities (indexes) happen in an order that a crash between steps cannot make inconsistent.

    conversations.py  the conversation hash, status transitions, the indexes that find one
    turns.py          the turn log, the pending queue, the audit event log, usage counts
    approvals.py      approvals, their deadline index and the unapplied set
    handoffs.py       handoff records, their per-status indexes and the unclaimed timer
    channels.py       reply deliveries, SMS opt-outs, calls, email threading
    directory.py      end users and identities, agents and revisions, API keys, webhooks
    erasure.py        what one conversation or end user leaves behind, found and deleted
    idempotency.py    clients' Idempotency-Keys with a hash of the body they came with
    routing.py        the routing table: which agent answers at each of our addresses
    collection.py     the shared base: typed decoders, the cursor pager, the not-found mapping
    connection.py     the one Valkey connection per process (the rate limiter shares it)
    leases.py         partition leases: which replica of a group owns which partition
"""

from __future__ import annotations

from shared.store.approvals import Approvals
from shared.store.channels import ChannelState
from shared.store.collection import Page
from shared.store.connection import Connection
from shared.store.conversations import Conversations
from shared.store.directory import Directory, hash_api_key
from shared.store.erasure import Erasure
from shared.store.handoffs import Handoffs
from shared.store.idempotency import IdempotencyKeys
from shared.store.routing import Routes
from shared.store.turns import Appended, Turns

__all__ = ["Appended", "Connection", "Page", "Store", "hash_api_key"]


class Store(
    Erasure,
    Conversations,
    Turns,
    Approvals,
    Handoffs,
    ChannelState,
    Directory,
    IdempotencyKeys,
    Routes,
):
    def __init__(self, url: str, namespace: str = "") -> None:
        super().__init__(Connection(url, namespace))

    async def ping(self) -> bool:
        return await self.connection.ping()

    async def close(self) -> None:
        await self.connection.close()
