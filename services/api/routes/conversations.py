"""Conversations and their turns."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter

from services.api.gateway import Gateway
from services.api.schemas import (
    CloseRequest,
    CreateConversation,
    ItemList,
    PostTurn,
    QueuedTurn,
    TurnResult,
)
from shared.envelopes import CloseConversation, OpenConversation
from shared.errors import InvalidRequest, NotFound, error_from_code
from shared.identity import kind_for_channel, make_identifier
from shared.models import Conversation, Turn

Limit = Annotated[int, Parameter(ge=1, le=100)]


class ConversationController(Controller):
    path = "/v1/conversations"
    opt = {"scope": "client"}
    tags = ["conversations"]

    @post("/", status_code=201)
    async def create(
        self, data: CreateConversation, gateway: Gateway, request: Request[Any, Any, Any]
    ) -> Conversation:
        if data.end_user_id and data.identity:
            raise InvalidRequest("give end_user_id or identity, not both")
        if data.end_user_id:
            end_user_id = (await gateway.store.get_end_user(data.end_user_id)).id
        elif data.identity:
            ident = make_identifier(
                kind_for_channel(data.identity.channel), data.identity.identifier
            )
            end_user_id, _ = await gateway.store.resolve_identity(ident.kind, ident.normalized)
        else:
            end_user_id = await gateway.store.create_anonymous_user()
        return await gateway.command(
            "open_conversation",
            OpenConversation(
                channel=data.channel,
                session_type=data.session_type,
                agent_id=data.agent_id,
                end_user_id=end_user_id,
                context_variables=data.context_variables,
                actor=request.state.api_key.id,
            ),
        )

    @get("/")
    async def list_conversations(
        self,
        gateway: Gateway,
        channel: str | None = None,
        status: str | None = None,
        session_type: str | None = None,
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
        page = await gateway.store.list_conversations(cursor=cursor, limit=limit, filters=filters)
        return ItemList(items=page.items, next_cursor=page.next_cursor)

    @get("/{conversation_id:str}")
    async def get_conversation(self, conversation_id: str, gateway: Gateway) -> Conversation:
        return await gateway.store.get_conversation(conversation_id)

    @post("/{conversation_id:str}/close", status_code=200)
    async def close(
        self,
        conversation_id: str,
        gateway: Gateway,
        request: Request[Any, Any, Any],
        data: CloseRequest | None = None,
    ) -> Conversation:
        reason = data.reason if data else "closed_by_client"
        return await gateway.command(
            "close_conversation",
            CloseConversation(
                conversation_id=conversation_id, reason=reason, actor=request.state.api_key.id
            ),
        )

    @post(
        "/{conversation_id:str}/turns",
        status_code=200,
        responses={
            202: ResponseSpec(
                data_container=QueuedTurn,
                description="Queued: the conversation is not active right now",
            )
        },
    )
    async def post_turn(
        self,
        conversation_id: str,
        data: PostTurn,
        gateway: Gateway,
        request: Request[Any, Any, Any],
    ) -> Response[TurnResult | QueuedTurn]:
        conv = await gateway.store.get_conversation(conversation_id)
        if conv.status == "closed":
            raise error_from_code(
                "conversation_closed", "conversation is closed", {"status": "closed"}
            )
        reply = await gateway.post_turn(
            conv,
            data.user_message,
            idempotency_key=request.headers.get("idempotency-key"),
            metadata=data.metadata,
        )
        if reply.outcome == "rejected":
            raise error_from_code(
                reply.error_code or "conflict",
                reply.error_message or "rejected",
                {"status": reply.session_status},
            )
        if reply.outcome == "queued" or reply.turn is None:
            return Response(
                QueuedTurn(
                    conversation_id=conv.id,
                    session_status=reply.session_status,
                    seq=reply.user_seq or reply.message_seqs[0],
                    message_seqs=list(reply.message_seqs),
                ),
                status_code=202,
            )
        turn = reply.turn
        return Response(
            TurnResult(
                turn_id=turn.id,
                conversation_id=conv.id,
                text=turn.content,
                session_status=reply.session_status,
                message_seqs=list(reply.message_seqs),
                tool_calls=list(turn.tool_calls),
                evidence=list(turn.evidence) if data.include_evidence else [],
            )
        )

    @get("/{conversation_id:str}/turns")
    async def list_turns(
        self, conversation_id: str, gateway: Gateway, cursor: str | None = None, limit: Limit = 50
    ) -> ItemList[Turn]:
        """The transcript in seq order; `cursor` is the last seq already seen."""
        conv = await gateway.store.get_conversation(conversation_id)
        try:
            after = int(cursor) if cursor else 0
        except ValueError as exc:
            raise InvalidRequest("cursor must be a seq number", details={"cursor": cursor}) from exc
        turns = await gateway.store.turns_after(conv.id, after, limit)
        more = bool(turns) and turns[-1].seq < conv.last_seq
        return ItemList(items=turns, next_cursor=str(turns[-1].seq) if more else None)


__all__ = ["ConversationController", "NotFound"]
