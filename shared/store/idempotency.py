"""`Idempotency-Key`: a retry is the same request; a reused key with another body is a client bug.

As Stripe does it: the first request under a key stores a hash of its body; a later request under
the same key with the same body is a retry (answered with the first request's result), and one with
a different body is refused with `422 idempotency_key_reused` instead of replaying an answer to a
question the client did not ask. Keys are scoped by the caller (a conversation for turns, an API
key for new conversations) and remembered for `KEEP_SECONDS`.

Value: `<sha256 of the body>|<result>`, the result empty while the first request is still being
answered. That in-flight claim expires after `CLAIM_SECONDS`, so a crash between claiming and
finishing never blocks the key for long.
"""

from __future__ import annotations

import hashlib

from shared.errors import IdempotencyKeyInUse, IdempotencyKeyReused
from shared.store.collection import Aggregate, text

KEEP_SECONDS = 24 * 3600
CLAIM_SECONDS = 60


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _reused(key: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "this Idempotency-Key was used with a different request body",
        details={"idempotency_key": key},
    )


class IdempotencyKeys(Aggregate):
    async def claim_idempotency_key(self, scope: str, key: str, body: bytes) -> str | None:
        """Claim `key` for this body. None: the first request, go ahead (then `finish_…` it). A
        str: a retry of a finished request, whose result it is. Raises IdempotencyKeyReused for
        another body, IdempotencyKeyInUse while the first request is still running."""
        digest = _digest(body)
        # SET NX GET: claims the key and returns what was there before, in one atomic step.
        earlier = await self._r.set(
            self._k.idempotency(scope, key), f"{digest}|", nx=True, get=True, ex=CLAIM_SECONDS
        )
        if earlier is None:
            return None
        stored, _, result = text(earlier).partition("|")
        if stored != digest:
            raise _reused(key)
        if not result:
            raise IdempotencyKeyInUse(
                "a request with this Idempotency-Key is still being answered; retry shortly",
                details={"idempotency_key": key},
            )
        return result

    async def finish_idempotency_key(self, scope: str, key: str, body: bytes, result: str) -> None:
        """Remember the result of the request that claimed `key`, for its retries."""
        await self._r.set(
            self._k.idempotency(scope, key), f"{_digest(body)}|{result}", ex=KEEP_SECONDS
        )

    async def release_idempotency_key(self, scope: str, key: str) -> None:
        """The claiming request failed: a retry may run it again."""
        await self._r.delete(self._k.idempotency(scope, key))

    async def remember_idempotency_key(self, scope: str, key: str, body: bytes) -> None:
        """Record a key whose retries the caller replays itself (a turn's envelope id comes from
        its key); raises IdempotencyKeyReused when the key came before with another body."""
        digest = _digest(body)
        earlier = await self._r.set(
            self._k.idempotency(scope, key), f"{digest}|-", nx=True, get=True, ex=KEEP_SECONDS
        )
        if earlier is not None and text(earlier).partition("|")[0] != digest:
            raise _reused(key)
