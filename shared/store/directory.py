"""The directory: end users and their identities, agents and their (immutable) revisions, API keys
(stored under the hash of their secret only), and webhook subscriptions with their delivery log."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import redis.asyncio as redis
from redis.asyncio.client import Pipeline

from shared.errors import IdentityConflict
from shared.ids import new_id
from shared.models import (
    Agent,
    ApiKey,
    EndUser,
    IdentifierKind,
    Identity,
    Revision,
    WebhookDelivery,
    WebhookSubscription,
    utcnow,
)
from shared.store.collection import Aggregate, Codec, encode, not_found, text

T = TypeVar("T")

_end_user = Codec(EndUser)
_agent = Codec(Agent)
_revision = Codec(Revision)
_api_key = Codec(ApiKey)
_webhook = Codec(WebhookSubscription)
_webhook_delivery = Codec(WebhookDelivery)


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Directory(Aggregate):
    # End users and identities -------------------------------------------------------------------

    async def resolve_identity(self, kind: IdentifierKind, value: str) -> tuple[str, bool]:
        """(end_user_id, created). Creates the user first, then claims the identifier, so a crash
        between the two leaves at most an orphan user, never an identifier pointing at nothing."""
        ident = self._k.identity(kind, value)
        existing = await self._r.get(ident)
        if existing:
            return text(existing), False
        user = EndUser(
            id=new_id("usr"), created_at=utcnow(), identities=(Identity(kind=kind, value=value),)
        )
        await self._r.set(self._k.end_user(user.id), encode(user))
        if await self._r.set(ident, user.id, nx=True):
            return user.id, True
        await self._r.delete(self._k.end_user(user.id))
        winner = await self._r.get(ident)
        return text(winner), False

    async def link_identity(
        self, end_user_id: str, kind: IdentifierKind, value: str
    ) -> tuple[EndUser, bool]:
        """Make the identifier resolve to the end user and list it among their identities. Returns
        the end user and whether this call linked it (False: it already was). An identifier that
        resolves to another end user is an IdentityConflict naming both: two people are never
        merged behind anyone's back.

        Two steps, as the identifier and the record live in different cluster slots: the
        identifier is claimed first (SET NX GET: one winner), then the record lists it (WATCH on
        the record alone). A crash between leaves an identifier that resolves to the right person
        and a record the next link of it completes."""
        ident, record = self._k.identity(kind, value), self._k.end_user(end_user_id)
        identity = Identity(kind=kind, value=value)
        raw = await self._r.get(record)
        if not raw:
            raise not_found("end user", end_user_id, "end_user_id")
        user = _end_user.decode(raw)
        owner = await self._r.set(ident, user.id, nx=True, get=True)
        if owner and text(owner) != user.id:
            raise IdentityConflict(
                f"this {kind} already belongs to end user {text(owner)}",
                details={
                    "end_user_id": user.id,
                    "linked_to_end_user_id": text(owner),
                    "kind": kind,
                },
            )
        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(record)
                    raw = await pipe.get(record)
                    if not raw:
                        raise not_found("end user", end_user_id, "end_user_id")
                    user = _end_user.decode(raw)
                    if owner and identity in user.identities:
                        return user, False
                    linked = msgspec.structs.replace(
                        user,
                        identities=(*(i for i in user.identities if i != identity), identity),
                    )
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(record, encode(linked))
                    await pipe.execute()
                    return linked, True
                except redis.WatchError:
                    continue

    async def create_anonymous_user(self) -> str:
        user = EndUser(id=new_id("usr"), created_at=utcnow())
        await self._r.set(self._k.end_user(user.id), encode(user))
        return user.id

    async def get_end_user(self, uid: str) -> EndUser:
        if (user := await self._decoded(self._k.end_user(uid), _end_user)) is None:
            raise not_found("end user", uid, "end_user_id")
        return user

    # Agents and revisions (immutable once written) -----------------------------------------------

    async def put_agent(self, agent: Agent) -> None:
        # The record, then the index: an index never names a record that is not there.
        await self.connection.in_order(
            lambda pipe: pipe.set(self._k.agent(agent.id), encode(agent)),
            lambda pipe: pipe.zadd(self._k.agents(), {agent.id: 0}),
        )

    async def get_agent(self, agent_id: str) -> Agent:
        if (agent := await self._decoded(self._k.agent(agent_id), _agent)) is None:
            raise not_found("agent", agent_id)
        return agent

    async def list_agents(self) -> list[Agent]:
        return await self._all_in(self._k.agents(), self._k.agent, _agent)

    async def next_revision_number(self, agent_id: str) -> int:
        return int(await self._r.incr(self._k.revision_counter(agent_id)))

    async def put_revision(
        self, revision: Revision, secrets: Mapping[str, str] | None = None
    ) -> None:
        """Store a revision and its write-only secrets (bot and tool signing keys) together."""
        fields: dict[Any, Any] = dict(secrets or {})
        # Secrets, then the revision, then the index: nothing is found before what it needs.
        await self.connection.in_order(
            lambda pipe: (
                pipe.hset(self._k.revision_secrets(revision.id), mapping=fields) if fields else None
            ),
            lambda pipe: pipe.set(self._k.revision(revision.id), encode(revision)),
            lambda pipe: pipe.zadd(
                self._k.revisions(revision.agent_id), {revision.id: revision.number}
            ),
        )

    async def get_revision(self, revision_id: str) -> Revision:
        if (revision := await self._decoded(self._k.revision(revision_id), _revision)) is None:
            raise not_found("revision", revision_id)
        return revision

    async def revision_secrets(self, revision_id: str) -> dict[str, str]:
        raw = await self._r.hgetall(self._k.revision_secrets(revision_id))
        return {text(k): text(v) for k, v in raw.items()}

    async def list_revisions(self, agent_id: str) -> list[Revision]:
        return await self._all_in(self._k.revisions(agent_id), self._k.revision, _revision)

    async def _all_in(self, index: str, key: Callable[[str], str], codec: Codec[T]) -> list[T]:
        """Every document an index (sorted set of ids) names, in index order."""
        ids = await self._r.zrange(index, 0, -1)
        raws = await self.connection.get_many([key(text(i)) for i in ids])
        return codec.decode_present(raws)

    # API keys ------------------------------------------------------------------------------------

    async def put_api_key(self, key: ApiKey, secret_hash: str, *, fixed_id: bool = False) -> bool:
        """Store a key under its id. A different secret already under that id (the bootstrap key
        after `SWITCHBOARD_BOOTSTRAP_API_KEY` changed) is revoked first, so a crash in between
        leaves the old one revoked and the new one written on the next try; the same secret
        again changes nothing (a revoked bootstrap key stays revoked). True when written.

        `fixed_id`: the id is reused across secrets (the bootstrap key), so records written
        before the id → hash index existed may hold older secrets under it: those are revoked."""
        previous = await self._r.hget(self._k.api_key_ids(), key.id)
        if previous is not None and text(previous) == secret_hash:
            return False
        stale = [text(previous)] if previous is not None else []
        if previous is None and fixed_id:
            stale = [d for d in await self._legacy_hashes_of(key.id) if d != secret_hash]
        for digest in stale:
            await self._revoke_hash(digest)

        def index(pipe: Pipeline) -> None:
            pipe.hset(self._k.api_key_ids(), key.id, secret_hash)
            pipe.zadd(self._k.api_keys(), {key.id: 0})

        # The record, then the indexes: an id always leads to its record.
        await self.connection.in_order(
            lambda pipe: pipe.set(self._k.api_key(secret_hash), encode(key)), index
        )
        return True

    async def api_key_by_hash(self, secret_hash: str) -> ApiKey | None:
        return await self._decoded(self._k.api_key(secret_hash), _api_key)

    async def list_api_keys(self) -> list[tuple[ApiKey, datetime | None]]:
        """Live (unrevoked) keys with when each was last used, oldest first."""
        ids = [text(i) for i in await self._r.zrange(self._k.api_keys(), 0, -1)]
        if not ids:
            return []
        hashes = await self._r.hmget(self._k.api_key_ids(), ids)
        if not all(hashes):
            await self._index_legacy_api_keys()
            hashes = await self._r.hmget(self._k.api_key_ids(), ids)
        used = await self._r.hmget(self._k.api_key_used(), ids)
        records = await self.connection.get_many(
            [self._k.api_key(text(h) if h else "-") for h in hashes]
        )
        found = []
        for raw, last in zip(records, used, strict=True):
            if raw:
                key = _api_key.decode(raw)
                if key.revoked_at is None:
                    found.append((key, datetime.fromisoformat(text(last)) if last else None))
        return sorted(found, key=lambda item: item[0].created_at)

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        """Mark the key revoked; its record stays, so using it answers `key_revoked`."""
        digest = await self._r.hget(self._k.api_key_ids(), key_id)
        if digest is None:
            await self._index_legacy_api_keys()
            digest = await self._r.hget(self._k.api_key_ids(), key_id)
        revoked = await self._revoke_hash(text(digest)) if digest else None
        if revoked is None:
            raise not_found("API key", key_id, "key_id")
        return revoked

    async def _revoke_hash(self, secret_hash: str) -> ApiKey | None:
        key = await self.api_key_by_hash(secret_hash)
        if key is None or key.revoked_at is not None:
            return None
        key = msgspec.structs.replace(key, revoked_at=utcnow())

        def unlist(pipe: Pipeline) -> None:
            pipe.zrem(self._k.api_keys(), key.id)
            pipe.hdel(self._k.api_key_used(), key.id)

        # Revoked first (what authentication reads), then out of the list of live keys.
        await self.connection.in_order(
            lambda pipe: pipe.set(self._k.api_key(secret_hash), encode(key)), unlist
        )
        return key

    async def _legacy_hashes_of(self, key_id: str) -> list[str]:
        found = []
        async for record_key in self._r.scan_iter(match=self._k.api_key("*"), count=500):
            raw = await self._r.get(record_key)
            if raw and _api_key.decode(raw).id == key_id:
                found.append(text(record_key).rpartition(":")[2])
        return found

    async def _index_legacy_api_keys(self) -> None:
        """Keys stored before the id → hash index existed: find them once, so they can be listed
        and revoked like the others (a scan of the `apikey:` records only)."""
        async for record_key in self._r.scan_iter(match=self._k.api_key("*"), count=500):
            raw = await self._r.get(record_key)
            if raw:
                key = _api_key.decode(raw)
                digest = text(record_key).rpartition(":")[2]
                await self._r.hsetnx(self._k.api_key_ids(), key.id, digest)

    async def touch_api_key(self, key_id: str, at: datetime) -> None:
        await self._r.hset(self._k.api_key_used(), key_id, at.isoformat())

    # Webhook subscriptions -----------------------------------------------------------------------

    async def put_webhook(self, sub: WebhookSubscription) -> None:
        await self._r.hset(self._k.webhooks(), sub.id, encode(sub))

    async def list_webhooks(self) -> list[WebhookSubscription]:
        raw = await self._r.hgetall(self._k.webhooks())
        return sorted(_webhook.decode_present(raw.values()), key=lambda s: s.id)

    async def webhooks_exist(self) -> bool:
        return bool(await self._r.hlen(self._k.webhooks()))

    async def operators_watch(self, ttl_seconds: float) -> bool:
        """An operators' stream is open: say so for `ttl_seconds` (renewed while it is). True if
        it was already said (the renewal found the key alive)."""
        previous = await self._r.set(
            self._k.operators_watching(), b"1", px=int(ttl_seconds * 1000), get=True
        )
        return previous is not None

    async def operators_watching(self) -> bool:
        return bool(await self._r.exists(self._k.operators_watching()))

    async def get_webhook(self, wid: str) -> WebhookSubscription:
        raw = await self._r.hget(self._k.webhooks(), wid)
        if not raw:
            raise not_found("webhook", wid, "webhook_id")
        return _webhook.decode(raw)

    async def delete_webhook(self, wid: str) -> None:
        if not await self._r.hdel(self._k.webhooks(), wid):
            raise not_found("webhook", wid, "webhook_id")

    async def log_delivery(self, wid: str, delivery: WebhookDelivery, keep: int = 200) -> None:
        key = self._k.webhook_log(wid)
        pipe = self._r.pipeline(transaction=False)
        pipe.lpush(key, encode(delivery))
        pipe.ltrim(key, 0, keep - 1)
        await pipe.execute()

    async def deliveries(self, wid: str, limit: int = 50) -> list[WebhookDelivery]:
        raws = await self._r.lrange(self._k.webhook_log(wid), 0, limit - 1)
        return _webhook_delivery.decode_present(raws)
