"""Handoffs, the operators' inbox, and the live event stream the console listens to."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import msgspec
from litestar import Controller, get, post
from litestar.background_tasks import BackgroundTask
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.aio.msg import Msg

from services.api.auth import allows
from services.api.gateway import Gateway
from services.api.routes.dependencies import Limit
from services.api.schemas import (
    ClaimRequest,
    Inbox,
    InboxApproval,
    InboxHandoff,
    ItemList,
)
from shared.envelopes import ClaimHandoff, Event
from shared.errors import Forbidden, Unavailable
from shared.models import ApiKey, Conversation, Handoff, HandoffStatus, Turn

KEEPALIVE_SECONDS = 15.0
_event = msgspec.json.Decoder(Event)


class HandoffController(Controller):
    path = "/v1/handoffs"
    opt = {"scope": "operator"}
    tags = ["operators"]

    @get("/")
    async def list_handoffs(
        self,
        gateway: Gateway,
        status: HandoffStatus = "requested",
        cursor: str | None = None,
        limit: Limit = 50,
    ) -> ItemList[Handoff]:
        """Newest first, from the status's index (never a scan of conversations)."""
        items, next_cursor = await gateway.store.list_handoffs(
            status=status, cursor=cursor, limit=limit
        )
        return ItemList(items=items, next_cursor=next_cursor)

    @get("/{handoff_id:str}")
    async def get_handoff(self, handoff_id: str, gateway: Gateway) -> Handoff:
        return await gateway.store.get_handoff(handoff_id)

    @post("/{handoff_id:str}/claim", status_code=200)
    async def claim(
        self,
        handoff_id: str,
        gateway: Gateway,
        caller: ApiKey,
        data: ClaimRequest | None = None,
    ) -> Handoff:
        """Assign the handoff to the calling operator. Someone else's claim is 409 naming the
        holder; an admin may take it over with `{"reassign": true}`."""
        force = bool(data and data.reassign)
        if force and not allows(caller, "admin"):
            raise Forbidden("only an admin may reassign a handoff", details={"needed": "admin"})
        result = await gateway.run(
            "claim_handoff",
            ClaimHandoff(
                handoff_id=handoff_id,
                operator_id=caller.id,
                operator_name=caller.operator_name,
                force=force,
            ),
        )
        if result.handoff is None:
            raise Unavailable("core answered a claim without the handoff")
        return result.handoff


class InboxController(Controller):
    path = "/v1/inbox"
    opt = {"scope": "operator"}
    tags = ["operators"]

    @get("/")
    async def inbox(self, gateway: Gateway, limit: Limit = 50) -> Inbox:
        """Handoffs waiting for or held by a person and approvals waiting for a decision, newest
        first, each with its conversation's channel, end user and last message."""
        store = gateway.store
        requested, _ = await store.list_handoffs(status="requested", cursor=None, limit=limit)
        assigned, _ = await store.list_handoffs(status="assigned", cursor=None, limit=limit)
        handoffs = sorted([*requested, *assigned], key=lambda h: h.requested_at, reverse=True)
        approvals = (await store.list_approvals(status="pending", cursor=None, limit=limit)).items
        ids = {h.conversation_id for h in handoffs} | {a.conversation_id for a in approvals}
        convs = {c.id: c for c in await store.get_conversations(sorted(ids))}
        lasts = dict(
            zip(
                sorted(ids),
                await asyncio.gather(*(_last_message(gateway, cid) for cid in sorted(ids))),
                strict=True,
            )
        )
        return Inbox(
            handoffs=[
                InboxHandoff(
                    handoff=h,
                    user_address=_address(convs.get(h.conversation_id)),
                    last_message=last.content if (last := lasts[h.conversation_id]) else None,
                    last_message_at=last.created_at if last else None,
                )
                for h in handoffs
            ],
            approvals=[
                InboxApproval(
                    approval=a,
                    channel=conv.channel,
                    end_user_id=conv.end_user_id,
                    user_address=_address(conv),
                    last_message=last.content if (last := lasts[a.conversation_id]) else None,
                )
                for a in approvals
                if (conv := convs.get(a.conversation_id)) is not None
            ],
        )


def _address(conv: Conversation | None) -> str | None:
    return conv.user_address if conv is not None else None


async def _last_message(gateway: Gateway, cid: str) -> Turn | None:
    """The last thing the end user wrote (else the last turn at all)."""
    turns = await gateway.store.last_turns(cid, 8)
    users = [t for t in turns if t.role == "user"]
    return users[-1] if users else (turns[-1] if turns else None)


class EventStreamController(Controller):
    path = "/v1/events/stream"
    opt = {"scope": "operator"}
    tags = ["operators"]

    @get("/")
    async def stream(self, gateway: Gateway) -> ServerSentEvent:
        """Server-sent events for operators' screens: one frame per handoff, approval, status
        change and new turn (`event:` is the event type, `data:` the event; a `turn.created`
        carries only the seq: read the turn from the API). A `resync` frame says reload what
        you show: frames were dropped for a slow reader, or the stream has just opened (core
        sends these notices only while a stream is open, and hears of this one within about
        `operator_presence_seconds`: whatever happened before then is re-read once it has).

        Core chooses what operators follow (`for_operators` in its outbox) and alone publishes
        on this feed; every event on it is passed on as core wrote it, so an event type or a
        field that a newer core adds reaches the console without this API knowing it."""
        queue: asyncio.Queue[tuple[Event, str] | None] = asyncio.Queue(maxsize=1000)

        async def on_event(msg: Msg) -> None:
            try:
                event, text = _event.decode(msg.data), msg.data.decode()
            except (msgspec.DecodeError, UnicodeDecodeError):
                return  # not an event at all: nothing a screen could use
            with contextlib.suppress(asyncio.QueueFull):
                item = (event, text)
                queue.put_nowait(item) if queue.qsize() < 999 else queue.put_nowait(None)

        def resync() -> None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

        sub = await gateway.bus.nc.subscribe(gateway.subjects.operator_events_all, cb=on_event)
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                gateway.screens.closed(resync)
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

        try:
            await gateway.screens.opened(resync)  # core starts sending what we now listen to
        except BaseException:
            await release()
            raise

        async def frames() -> AsyncGenerator[ServerSentEventMessage, None]:
            try:
                yield ServerSentEventMessage(event="ready", data="{}")
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield ServerSentEventMessage(comment="keepalive")
                        continue
                    if item is None:
                        yield ServerSentEventMessage(event="resync", data="{}")
                        continue
                    event, text = item
                    yield ServerSentEventMessage(event=event.type, id=event.id, data=text)
            finally:
                await release()

        # Also released after the response: a client gone before the first frame cancels the
        # stream before the generator starts, and a generator never started runs no `finally`.
        return ServerSentEvent(frames(), background=BackgroundTask(release))
