"""What operators do: take over, write to the end user, hand back; decide approvals."""

from __future__ import annotations

from typing import Literal

from litestar import Controller, get, post

from services.api.auth import allows
from services.api.gateway import Gateway
from services.api.routes.dependencies import Limit
from services.api.schemas import HandoffRequest, HumanTurnRequest, ItemList, ResolveApprovalRequest
from shared.envelopes import HumanTurn, ResolveApproval, StartHandoff
from shared.errors import Forbidden, NotFound
from shared.models import ApiKey, Approval, Conversation


class OperatorController(Controller):
    path = "/v1/conversations/{conversation_id:str}"
    opt = {"scope": "operator"}
    tags = ["operators"]

    @post("/handoff", status_code=200, opt={"errors": (409,)})
    async def handoff(
        self,
        conversation_id: str,
        gateway: Gateway,
        caller: ApiKey,
        data: HandoffRequest | None = None,
    ) -> Conversation:
        """An operator takes over: `active` → `waiting_for_human`; the AI stops answering."""
        reason = data.reason if data else "operator_takeover"
        return await gateway.command(
            "handoff",
            StartHandoff(
                conversation_id=conversation_id,
                reason=reason,
                actor=caller.id,
                actor_name=caller.operator_name,
            ),
        )

    @post("/human-turns", status_code=200, opt={"errors": (409,)})
    async def human_turn(
        self,
        conversation_id: str,
        data: HumanTurnRequest,
        gateway: Gateway,
        caller: ApiKey,
    ) -> Conversation:
        """The operator's message goes to the end user on the conversation's own channel;
        `hand_back: true` returns control to the agent, which answers what queued meanwhile."""
        return await gateway.command(
            "human_turn",
            HumanTurn(
                conversation_id=conversation_id,
                content=data.content,
                hand_back=data.hand_back,
                close=data.close,
                operator_id=caller.id,
                operator_name=caller.operator_name,
            ),
        )

    @post("/approvals/{approval_id:str}/resolve", status_code=200, opt={"errors": (409,)})
    async def resolve(
        self,
        conversation_id: str,
        approval_id: str,
        data: ResolveApprovalRequest,
        gateway: Gateway,
        caller: ApiKey,
    ) -> Approval:
        approval = await gateway.store.get_approval(approval_id)
        if approval.conversation_id != conversation_id:
            raise NotFound(f"approval {approval_id} not found in conversation {conversation_id}")
        if not allows(caller, approval.approver_role):
            raise Forbidden(
                f"this approval needs the {approval.approver_role} role",
                details={"needed": approval.approver_role},
            )
        result = await gateway.run(
            "resolve_approval",
            ResolveApproval(
                conversation_id=conversation_id,
                approval_id=approval_id,
                decision=data.decision,
                note=data.note,
                # Who decided is the calling key; a `reviewer` in the body is ignored.
                reviewer=caller.id,
                reviewer_name=caller.operator_name,
            ),
        )
        assert result.approval is not None
        return result.approval


class ApprovalController(Controller):
    path = "/v1/approvals"
    opt = {"scope": "operator"}
    tags = ["operators"]

    @get("/")
    async def list_approvals(
        self,
        gateway: Gateway,
        status: Literal["pending", "approved", "rejected", "timed_out", "cancelled"] | None = None,
        cursor: str | None = None,
        limit: Limit = 50,
    ) -> ItemList[Approval]:
        page = await gateway.store.list_approvals(status=status, cursor=cursor, limit=limit)
        return ItemList(items=page.items, next_cursor=page.next_cursor)

    @get("/{approval_id:str}")
    async def get_approval(self, approval_id: str, gateway: Gateway) -> Approval:
        return await gateway.store.get_approval(approval_id)
