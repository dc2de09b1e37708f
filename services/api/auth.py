"""API keys: `x-api-key` on every call, looked up by SHA-256, with scopes, expiry and revocation.

Scopes nest: `admin` may do everything, `operator` everything a `client` may, plus human turns and
approvals. A route says the least scope it needs in `opt={"scope": ...}`; a route without one is
admin-only, so forgetting to mark a route fails closed.

Lookups are cached for a few seconds per process (the turn path is hot). Revoking a key drops it
from this replica's cache and broadcasts its id on `gw.ctl.key_revoked`, so every replica forgets
it at once; the short cache lifetime bounds the damage if a broadcast is missed. Expiry is checked
on every request against the cached record. `last_used_at` is written at most once a minute per
key and process, never on every call.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.types import ASGIApp, ExceptionHandler, ExceptionHandlersMap, Receive, Send
from litestar.types import Scope as ASGIScope

from shared.errors import Forbidden, KeyExpired, KeyRevoked, Unauthenticated
from shared.ids import new_id
from shared.models import ApiKey, Scope, Visibility, utcnow
from shared.store import Store, hash_api_key

RANK: dict[str, int] = {"client": 1, "operator": 2, "admin": 3}
CACHE_SECONDS = 5.0
TOUCH_SECONDS = 60.0
BOOTSTRAP_KEY_ID = "key_bootstrap"


def new_secret() -> str:
    return "sk_" + secrets.token_urlsafe(32)


class KeyRing:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        self._touched: dict[str, float] = {}

    async def create(
        self,
        name: str,
        scopes: tuple[Scope, ...],
        secret: str | None = None,
        key_id: str | None = None,
        expires_at: datetime | None = None,
        visibility: Visibility = "all",
        display_name: str | None = None,
    ) -> tuple[ApiKey, str]:
        secret = secret or new_secret()
        key = ApiKey(
            id=key_id or new_id("key"),
            name=name,
            scopes=scopes,
            created_at=utcnow(),
            prefix=secret[:7],
            expires_at=expires_at,
            visibility=visibility,
            display_name=display_name,
        )
        await self.store.put_api_key(key, hash_api_key(secret), fixed_id=key_id is not None)
        return key, secret

    async def lookup(self, secret: str) -> ApiKey | None:
        digest = hash_api_key(secret)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        key = await self.store.api_key_by_hash(digest)
        if key is not None:
            if len(self._cache) >= 10_000:
                self._cache.clear()
            self._cache[digest] = (now + CACHE_SECONDS, key)
        return key

    def forget(self, key_id: str) -> None:
        """Drop a revoked key from this replica's cache."""
        for digest in [d for d, (_, key) in self._cache.items() if key.id == key_id]:
            del self._cache[digest]

    async def touch(self, key: ApiKey) -> None:
        """Record a use of the key, at most once per TOUCH_SECONDS in this process."""
        now = time.monotonic()
        if now - self._touched.get(key.id, -TOUCH_SECONDS) >= TOUCH_SECONDS:
            self._touched[key.id] = now
            await self.store.touch_api_key(key.id, utcnow())


def allows(key: ApiKey, needed: str) -> bool:
    return max(RANK[s] for s in key.scopes) >= RANK[needed]


def sees_only_its_own(key: ApiKey) -> bool:
    """A client key with `own` visibility sees only the conversations it created."""
    return key.visibility == "own" and not allows(key, "operator")


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
    if key.revoked_at is not None:
        raise KeyRevoked("this API key was revoked", details={"key_id": key.id})
    if key.expires_at is not None and key.expires_at <= utcnow():
        raise KeyExpired(
            "this API key has expired",
            details={"key_id": key.id, "expired_at": key.expires_at.isoformat()},
        )
    needed = handler.opt.get("scope", "admin")
    if not allows(key, needed):
        raise Forbidden(
            f"this route needs the {needed} scope",
            details={"needed": needed, "scopes": list(key.scopes)},
        )
    connection.state.api_key = key
    await keyring.touch(key)
    if not handler.opt.get("limits_with_conversation"):  # else counted with the conversation read
        gateway = connection.app.state.gateway
        await gateway.limiter.check(gateway.key_limit(key.id))


def authenticate(app: ASGIApp) -> ASGIApp:
    """ASGI middleware: `require_scope` for every request, once Litestar has routed it (the
    route's handler, whose `opt` says the scope it needs, is in the ASGI scope by then). Not a
    guard: Litestar hands every guard a copy of the route handler, about 4 % of the API's CPU
    per turn. A refusal is answered here, by the app's handler for its exception (the same
    401/403/429/503 a guard's got), so it is answered inside the request's trace: the tracing
    middleware around this one sees a response, not an error, and a log line carries the trace."""

    async def middleware(scope: ASGIScope, receive: Receive, send: Send) -> None:
        handler = scope["route_handler"]
        try:
            await require_scope(ASGIConnection(scope), handler)
        except Exception as exc:
            answer = _exception_handler(handler.resolve_exception_handlers(), exc)
            if answer is None:
                raise
            request: Request[Any, Any, Any] = Request(scope, receive)
            response = answer(request, exc).to_asgi_response(None, request)
            await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return middleware


def _exception_handler(
    handlers: ExceptionHandlersMap, exc: Exception
) -> ExceptionHandler[Any] | None:
    """The app's handler for `exc`: the first of its classes, most specific first, with one
    (the app maps exception classes only, no status codes)."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
