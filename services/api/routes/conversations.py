"""Conversations and their turns."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

import msgspec
from litestar import Controller, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from services.api.auth import sees_only_its_own
from services.api.gateway import Gateway
from services.api.routes.dependencies import (
    TURN_CONVERSATION,
    VISIBLE_CONVERSATION,
    IdempotencyKey,
    Limit,
    VisibleConversation,
)
from services.api.schemas import (
    CloseRequest,
    CreateConversation,
    ItemList,
    Messages,
    PostTurn,
    QueuedTurn,
    TurnResult,
)
from shared.envelopes import CloseConversation, Event, OpenConversation, StreamDelta, TurnReply
from shared.errors import (
    AddressRequired,
    InvalidRequest,
    SwitchboardError,
    error_body_of,
    error_from_code,
)
from shared.identity import kind_for_channel, make_identifier
from shared.models import (
    ApiKey,
    Channel,
    Conversation,
    Delivery,
    IdentifierKind,
    Identity,
    SessionType,
    Status,
    Turn,
)

_enc = msgspec.json.Encoder()
REACHED_BY: dict[str, IdentifierKind] = {"sms": "phone", "email": "email"}


class ConversationController(Controller):
    path = "/v1/conversations"
    opt = {"scope": "client"}
    tags = ["conversations"]
    dependencies = VISIBLE_CONVERSATION

    @post("/", status_code=201, opt={"errors": (404, 409)})
    async def create(
        self,
        data: CreateConversation,
        gateway: Gateway,
        caller: ApiKey,
        idempotency_key: IdempotencyKey = None,
    ) -> Conversation:
        if idempotency_key is None:
            return await _create_conversation(data, gateway, caller.id)
        scope, body = f"conversations:{caller.id}", _enc.encode(data)
        earlier = await gateway.store.claim_idempotency_key(scope, idempotency_key, body)
        if earlier is not None:  # a retry: the conversation the first request opened
            return await gateway.store.get_conversation(earlier)
        try:
            conv = await _create_conversation(data, gateway, caller.id)
        except BaseException:
            await gateway.store.release_idempotency_key(scope, idempotency_key)
            raise
        await gateway.store.finish_idempotency_key(scope, idempotency_key, body, conv.id)
        return conv

    @get("/")
    async def list_conversations(
        self,
        gateway: Gateway,
        caller: ApiKey,
        channel: Channel | None = None,
        status: Status | None = None,
        session_type: SessionType | None = None,
        end_user_id: str | None = None,
        cursor: str | None = None,
        limit: Limit = 50,
    ) -> ItemList[Conversation]:
        filters = {
            k: v
            for k, v in {
                "channel": channel,
                "status": status,
                "session_type": session_type,
                "end_user_id": end_user_id,
            }.items()
            if v
        }
        page = await gateway.store.list_conversations(
            cursor=cursor,
            limit=limit,
            filters=filters,
            created_by=caller.id if sees_only_its_own(caller) else None,
        )
        return ItemList(items=page.items, next_cursor=page.next_cursor)

    @get("/{conversation_id:str}")
    async def get_conversation(self, conversation: VisibleConversation) -> Conversation:
        return await conversation()

    @post("/{conversation_id:str}/close", status_code=200, opt={"errors": (409,)})
    async def close(
        self,
        conversation: VisibleConversation,
        gateway: Gateway,
        caller: ApiKey,
        data: CloseRequest | None = None,
    ) -> Conversation:
        conv = await conversation()
        reason = data.reason if data else "closed_by_client"
        return await gateway.command(
            "close_conversation",
            CloseConversation(conversation_id=conv.id, reason=reason, actor=caller.id),
        )

    @post(
        "/{conversation_id:str}/turns",
        status_code=200,
        opt={"limits_with_conversation": True, "errors": (409, 504)},
        dependencies=TURN_CONVERSATION,
        responses={
            202: ResponseSpec(
                data_container=QueuedTurn,
                description="Queued: the conversation is not active right now",
            )
        },
    )
    async def post_turn(
        self,
        conversation: Conversation,
        data: PostTurn,
        gateway: Gateway,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[TurnResult | QueuedTurn]:
        reply = await gateway.post_turn(
            conversation,
            data.user_message,
            idempotency_key=idempotency_key,
            metadata=data.metadata,
        )
        body, status = _turn_body(reply, data.include_evidence)
        return Response(body, status_code=status)

    @post(
        "/{conversation_id:str}/turns/stream",
        status_code=200,
        opt={"limits_with_conversation": True, "errors": (409,)},
        dependencies=TURN_CONVERSATION,
        responses={
            200: ResponseSpec(
                data_container=str,
                media_type="text/event-stream",
                generate_examples=False,
                description='Server-sent events: `delta` frames (`{"text"}`), then `complete` '
                "(the body of the sync turn, or the queued body) or `error` (the error body)",
            )
        },
    )
    async def stream_turn(
        self,
        conversation: Conversation,
        data: PostTurn,
        gateway: Gateway,
        idempotency_key: IdempotencyKey = None,
    ) -> ServerSentEvent:
        """Server-sent events: `delta` frames with pieces of the reply, then `complete` with the
        same body as the sync endpoint (or the queued body), or `error` with the error shape."""
        feed = gateway.turn_feed(
            conversation,
            data.user_message,
            stream=True,
            metadata=data.metadata,
            idempotency_key=idempotency_key,
        )

        async def frames() -> AsyncGenerator[ServerSentEventMessage, None]:
            try:
                async for item in feed:
                    if isinstance(item, StreamDelta):
                        yield ServerSentEventMessage(event="delta", data=_json({"text": item.text}))
                    else:
                        body, _ = _turn_body(item, data.include_evidence)
                        yield ServerSentEventMessage(event="complete", data=_json(body))
            except SwitchboardError as exc:
                yield ServerSentEventMessage(
                    event="error",
                    data=_json(error_body_of(exc)),
                )

        return ServerSentEvent(frames())

    @get("/{conversation_id:str}/messages")
    async def messages(
        self,
        conversation: VisibleConversation,
        gateway: Gateway,
        since_seq: Annotated[int, Parameter(ge=0)] = 0,
        limit: Limit = 100,
    ) -> Messages:
        """Polling: the status and every message after `since_seq`. `next_seq` never rewinds."""
        conv = await conversation()
        turns = await gateway.store.turns_after(conv.id, since_seq, limit)
        return Messages(
            conversation_id=conv.id,
            session_status=conv.status,
            messages=turns,
            next_seq=turns[-1].seq if turns else since_seq,
        )

    @get("/{conversation_id:str}/events")
    async def events(
        self,
        conversation: VisibleConversation,
        gateway: Gateway,
        cursor: str | None = None,
        limit: Limit = 100,
    ) -> ItemList[Event]:
        """The audit trail: every state change, with who, what and when."""
        conv = await conversation()
        offset = int(cursor) if cursor and cursor.isdigit() else 0
        items = await gateway.store.list_events(conv.id, offset, limit + 1)
        more = len(items) > limit
        return ItemList(items=items[:limit], next_cursor=str(offset + limit) if more else None)

    @get("/{conversation_id:str}/turns")
    async def list_turns(
        self,
        conversation: VisibleConversation,
        gateway: Gateway,
        cursor: Annotated[int, Parameter(ge=0)] = 0,
        limit: Limit = 50,
    ) -> ItemList[Turn]:
        """The transcript in seq order; `cursor` is the last seq already seen."""
        conv = await conversation()
        turns = await gateway.store.turns_after(conv.id, cursor, limit)
        more = bool(turns) and turns[-1].seq < conv.last_seq
        return ItemList(items=turns, next_cursor=str(turns[-1].seq) if more else None)

    @get("/{conversation_id:str}/deliveries")
    async def deliveries(
        self, conversation: VisibleConversation, gateway: Gateway
    ) -> ItemList[Delivery]:
        """How each outbound message fared with its provider: status, provider ids, errors."""
        conv = await conversation()
        return ItemList(items=await gateway.store.list_deliveries(conv.id))


async def _create_conversation(
    data: CreateConversation, gateway: Gateway, key_id: str
) -> Conversation:
    if data.end_user_id is not None and data.identity is not None:
        raise InvalidRequest("give end_user_id or identity, not both")
    reach = REACHED_BY.get(data.channel)  # SMS and email reach the person at an address
    addresses: list[Identity] = []
    if data.end_user_id:
        end_user = await gateway.store.get_end_user(data.end_user_id)
        end_user_id, addresses = end_user.id, list(end_user.identities)
    elif data.identity:
        ident = make_identifier(kind_for_channel(data.identity.channel), data.identity.identifier)
        if reach is not None and ident.kind != reach:
            raise AddressRequired(
                f"a {data.channel} conversation needs a {reach} identity",
                details={"channel": data.channel, "identity_kind": ident.kind},
            )
        end_user_id, _ = await gateway.store.resolve_identity(ident.kind, ident.normalized)
        addresses = [Identity(kind=ident.kind, value=ident.normalized)]
    else:
        end_user_id = await gateway.store.create_anonymous_user()
    user_address = None
    if reach is not None:
        user_address = next((i.value for i in addresses if i.kind == reach), None)
        if user_address is None:
            raise AddressRequired(
                f"a {data.channel} conversation needs the end user's {reach}: give identity",
                details={"channel": data.channel},
            )
    return await gateway.command(
        "open_conversation",
        OpenConversation(
            channel=data.channel,
            session_type=data.session_type,
            agent_id=data.agent_id,
            end_user_id=end_user_id,
            context_variables=data.context_variables,
            actor=key_id,
            user_address=user_address,
        ),
    )


def _turn_body(reply: TurnReply, include_evidence: bool) -> tuple[TurnResult | QueuedTurn, int]:
    """Core's reply as the API shows it: 200 with the answer, or 202 when it was queued."""
    if reply.outcome == "rejected":
        raise error_from_code(
            reply.error_code or "conflict",
            reply.error_message or "rejected",
            {"status": reply.session_status},
        )
    if reply.outcome == "queued" or reply.turn is None:
        return QueuedTurn(
            conversation_id=reply.conversation_id,
            session_status=reply.session_status,
            seq=reply.user_seq or reply.message_seqs[0],
            message_seqs=list(reply.message_seqs),
        ), 202
    turn = reply.turn
    return TurnResult(
        turn_id=turn.id,
        conversation_id=reply.conversation_id,
        text=turn.content,
        session_status=reply.session_status,
        message_seqs=list(reply.message_seqs),
        tool_calls=list(turn.tool_calls),
        evidence=list(turn.evidence) if include_evidence else [],
    ), 200


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()
