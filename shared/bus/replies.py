"""Waiting for core's replies: one inbox per process instead of a subscription per request.

A process that waits for the replies to what it publishes (the API, voice) opens one `ReplyInbox` at
start: a single core NATS subscription to `gw.*.*.<token>` for the life of its connection. It puts
`token` on every envelope it publishes (`InboundMessage.reply_inbox`), and core answers that
envelope on `gw.reply.<conversation_id>.<token>`, its token deltas on
`gw.stream.<conversation_id>.<token>`, instead of on the conversation's own subjects.

- A request registers its envelope id (`expect`) before it publishes, so the reply cannot arrive
  before anyone waits for it, and takes what arrives for that id in the order core published it:
  one subscription on one connection, so a reply's deltas come before the reply.
- What arrives for an id nobody expects (a request that timed out, a client that went away) is
  dropped on arrival: nothing is kept for it, so a late reply costs no memory.
- Replies are core NATS, fire-and-forget, as before: a reply lost on the way (the connection
  dropped) leaves the request to time out (`504`, the turn accepted and in the transcript).
- A client's retry of an envelope JetStream already holds is answered by whoever waits for the
  first publish, which may be another process: the retry waits on the conversation's replies to
  any inbox instead (`Subjects.conversation_replies`, one subscription for that request only).

Why: a subscription and an unsubscription per request cost the process a subscription task and
two protocol messages, and nats-server two changes of its interest graph; with one inbox the
interest graph stays the same while turns flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.bus.connection import BusConnection
from shared.envelopes import StreamDelta, TurnReply
from shared.ids import new_id

log = logging.getLogger("switchboard.bus")

Reply = StreamDelta | TurnReply
_reply = msgspec.json.Decoder(TurnReply)
_delta = msgspec.json.Decoder(StreamDelta)


def decode_reply(msg: Msg) -> Reply:
    """A reply or a token delta addressed to an inbox, told apart by the subject:
    `gw.reply.<conversation_id>.<inbox>` or `gw.stream.<conversation_id>.<inbox>`."""
    kind = msg.subject.rsplit(".", 3)[-3]
    return _reply.decode(msg.data) if kind == "reply" else _delta.decode(msg.data)


def _decoded(msg: Msg) -> Reply | None:
    try:
        return decode_reply(msg)
    # (msgspec reports bytes that are not UTF-8 inside a string as UnicodeDecodeError)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        log.warning("undecodable reply dropped: %s", exc, extra={"subject": msg.subject})
        return None


class ReplyInbox:
    """This process's reply inbox: `token` goes on envelopes, `expect` waits for their replies."""

    def __init__(self, bus: BusConnection) -> None:
        self.bus = bus
        self.token = new_id("inbox")
        self._waiting: dict[str, list[asyncio.Queue[Reply]]] = {}
        self._following = 0  # retries waiting on their conversation's replies
        self._sub: Subscription | None = None

    @property
    def waiting(self) -> int:
        """How many requests wait for a reply here (all the inbox holds is their queues)."""
        return sum(len(queues) for queues in self._waiting.values()) + self._following

    async def open(self) -> None:
        """Subscribe, once; nats-py subscribes again by itself after a reconnect."""
        self._sub = await self.bus.nc.subscribe(
            self.bus.subjects.reply_inbox(self.token), cb=self._arrived
        )

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _arrived(self, msg: Msg) -> None:
        if (item := _decoded(msg)) is not None:
            for queue in self._waiting.get(item.envelope_id, ()):
                queue.put_nowait(item)

    @contextlib.contextmanager
    def expect(self, envelope_id: str) -> Iterator[asyncio.Queue[Reply]]:
        """Queue what arrives for `envelope_id` while the block runs; enter it before publishing."""
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        waiters = self._waiting.setdefault(envelope_id, [])
        waiters.append(queue)
        try:
            yield queue
        finally:
            waiters.remove(queue)
            if not waiters and self._waiting.get(envelope_id) is waiters:
                del self._waiting[envelope_id]

    @contextlib.asynccontextmanager
    async def following(
        self, conversation_id: str, envelope_id: str
    ) -> AsyncIterator[asyncio.Queue[Reply]]:
        """Queue what arrives for `envelope_id` addressed to any inbox, while the block runs: for
        a retry, whose reply goes to the inbox of the request it repeats. One subscription for
        the block only (retries are rare)."""
        queue: asyncio.Queue[Reply] = asyncio.Queue()

        async def arrived(msg: Msg) -> None:
            if (item := _decoded(msg)) is not None and item.envelope_id == envelope_id:
                queue.put_nowait(item)

        sub = await self.bus.nc.subscribe(
            self.bus.subjects.conversation_replies(conversation_id), cb=arrived
        )
        self._following += 1
        try:
            yield queue
        finally:
            self._following -= 1
            await sub.unsubscribe()
