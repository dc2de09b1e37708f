"""API keys: `x-api-key` on every call, looked up by SHA-256, with scopes.

Scopes nest: `admin` may do everything, `operator` everything a `client` may, plus human turns and
approvals. A route says the least scope it needs in `opt={"scope": ...}`; a route without one is
admin-only, so forgetting to mark a route fails closed.
"""

from __future__ import annotations

import secrets
import time

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from shared.errors import Forbidden, Unauthenticated
from shared.ids import new_id
from shared.models import ApiKey, Scope, utcnow
from shared.store import Store, hash_api_key

RANK: dict[str, int] = {"client": 1, "operator": 2, "admin": 3}
CACHE_SECONDS = 5.0


def new_secret() -> str:
    return "sk_" + secrets.token_urlsafe(32)


class KeyRing:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, ApiKey]] = {}

    async def create(
        self,
        name: str,
        scopes: tuple[Scope, ...],
        secret: str | None = None,
        key_id: str | None = None,
    ) -> tuple[ApiKey, str]:
        secret = secret or new_secret()
        key = ApiKey(
            id=key_id or new_id("key"),
            name=name,
            scopes=scopes,
            created_at=utcnow(),
            prefix=secret[:7],
        )
        await self.store.put_api_key(key, hash_api_key(secret))
        return key, secret

    async def lookup(self, secret: str) -> ApiKey | None:
        digest = hash_api_key(secret)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        key = await self.store.api_key_by_hash(digest)
        if key is not None:
            self._cache[digest] = (now + CACHE_SECONDS, key)
        return key


def allows(key: ApiKey, needed: str) -> bool:
    return max(RANK[s] for s in key.scopes) >= RANK[needed]


async def require_scope(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    if handler.opt.get("public") or connection.scope["path"].startswith("/schema"):
        return  # probes and the OpenAPI document are public
    secret = connection.headers.get("x-api-key")
    if not secret:
        raise Unauthenticated("missing x-api-key header")
    keyring: KeyRing = connection.app.state.keyring
    key = await keyring.lookup(secret)
    if key is None:
        raise Unauthenticated("unknown API key")
    needed = handler.opt.get("scope", "admin")
    if not allows(key, needed):
        raise Forbidden(
            f"this route needs the {needed} scope",
            details={"needed": needed, "scopes": list(key.scopes)},
        )
    connection.state.api_key = key
    if not handler.opt.get("limits_with_conversation"):  # else counted with the conversation read
        gateway = connection.app.state.gateway
        await gateway.limiter.check(gateway.key_limit(key.id))
