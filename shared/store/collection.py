"""What every aggregate of the store is built on: the shared connection, typed decoders built once,
one cursor pager over a lexicographic index, and the one not-found mapping."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from shared.errors import NotFound
from shared.store.connection import Connection

T = TypeVar("T")

encode = msgspec.json.Encoder().encode


def text(value: Any) -> str:
    """redis-py types replies as bytes | str; with decode_responses=False they are bytes."""
    return value.decode() if isinstance(value, bytes) else str(value)


def not_found(what: str, ident: str, field: str | None = None) -> NotFound:
    """`<what> <id> not found`, with `{field: id}` in the details when the caller names a field."""
    return NotFound(f"{what} {ident} not found", details={field: ident} if field else None)


class Codec(Generic[T]):
    """JSON of one msgspec type, its decoder built once."""

    def __init__(self, type_: type[T]) -> None:
        self._decoder = msgspec.json.Decoder(type_)

    def decode(self, raw: bytes | str) -> T:
        return self._decoder.decode(raw)

    def decode_present(self, raws: Iterable[bytes | str | None]) -> list[T]:
        """The decoded values of those that exist (a missing key reads as None)."""
        return [self._decoder.decode(raw) for raw in raws if raw]


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


class Aggregate:
    """Base of the store's aggregates: each is a mixin over the one shared connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._r = connection.redis
        self._k = connection.keys

    async def _hashes(self, keys: Iterable[str]) -> list[dict[Any, Any]]:
        """The hashes that exist among `keys`, in order, in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [raw for raw in await pipe.execute() if raw]

    async def _decoded(self, key: str, codec: Codec[T]) -> T | None:
        raw = await self._r.get(key)
        return codec.decode(raw) if raw else None

    async def _text_at(self, key: str) -> str | None:
        raw = await self._r.get(key)
        return text(raw) if raw else None

    async def _page_newest_first(
        self,
        index: str,
        *,
        cursor: str | None,
        limit: int,
        load: Callable[[list[str]], Awaitable[list[T]]],
        keep: Callable[[T], bool],
        id_of: Callable[[T], str],
    ) -> Page[T]:
        """Page a sorted set of time-sortable ids (all scores 0) newest first; `cursor` is the last
        id of the previous page. `keep` filters within each scanned batch."""
        found: list[T] = []
        upper = f"({cursor}".encode() if cursor else b"+"
        while len(found) <= limit:
            ids = await self._r.zrevrangebylex(index, upper, b"-", start=0, num=max(limit * 2, 50))
            if not ids:
                break
            found.extend(item for item in await load([text(i) for i in ids]) if keep(item))
            upper = b"(" + text(ids[-1]).encode()
        items = found[:limit]
        more = len(found) > limit
        return Page(items=items, next_cursor=id_of(items[-1]) if more and items else None)
