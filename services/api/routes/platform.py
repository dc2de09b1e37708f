"""Webhook subscriptions, simulations and usage."""

from __future__ import annotations

import secrets

from litestar import Controller, delete, get, post

from services.api.gateway import Gateway
from services.api.schemas import (
    CreatedWebhook,
    CreateSimulation,
    CreateWebhook,
    ItemList,
    SimulationResult,
    Usage,
    WebhookView,
)
from shared.envelopes import Simulate
from shared.ids import new_id
from shared.models import ApiKey, WebhookDelivery, WebhookSubscription, utcnow

SIMULATION_TIMEOUT = 60.0


def _view(sub: WebhookSubscription) -> WebhookView:
    return WebhookView(id=sub.id, url=sub.url, events=list(sub.events), created_at=sub.created_at)


class WebhookController(Controller):
    path = "/v1/webhooks"
    tags = ["webhooks"]

    @post("/", status_code=201)
    async def create(self, data: CreateWebhook, gateway: Gateway) -> CreatedWebhook:
        """Events for `live` sessions are POSTed to `url`, signed with the secret (shown once)."""
        sub = WebhookSubscription(
            id=new_id("whk"),
            url=data.url,
            events=tuple(data.events),
            secret=data.secret or "whsec_" + secrets.token_urlsafe(32),
            created_at=utcnow(),
        )
        await gateway.store.put_webhook(sub)
        await gateway.webhooks_changed()
        return CreatedWebhook(
            id=sub.id,
            url=sub.url,
            events=list(sub.events),
            created_at=sub.created_at,
            secret=sub.secret,
        )

    @get("/")
    async def list_webhooks(self, gateway: Gateway) -> ItemList[WebhookView]:
        return ItemList(items=[_view(s) for s in await gateway.store.list_webhooks()])

    @get("/{webhook_id:str}")
    async def get_webhook(self, webhook_id: str, gateway: Gateway) -> WebhookView:
        return _view(await gateway.store.get_webhook(webhook_id))

    @get("/{webhook_id:str}/deliveries")
    async def deliveries(self, webhook_id: str, gateway: Gateway) -> ItemList[WebhookDelivery]:
        await gateway.store.get_webhook(webhook_id)
        return ItemList(items=await gateway.store.deliveries(webhook_id))

    @delete("/{webhook_id:str}", status_code=204)
    async def remove(self, webhook_id: str, gateway: Gateway) -> None:
        await gateway.store.delete_webhook(webhook_id)
        await gateway.webhooks_changed()


class SimulationController(Controller):
    path = "/v1"
    tags = ["simulations"]

    @post("/simulations", status_code=201, opt={"scope": "client", "errors": (404,)})
    async def simulate(
        self, data: CreateSimulation, gateway: Gateway, caller: ApiKey
    ) -> SimulationResult:
        """Replay user turns against a revision. Read-only: no channel egress, no webhooks, and
        tools that change the world are not run."""
        result = await gateway.run(
            "simulate",
            Simulate(
                agent_id=data.agent_id,
                revision_id=data.revision_id,
                user_turns=tuple(data.user_turns),
                actor=caller.id,
            ),
            timeout=SIMULATION_TIMEOUT,
        )
        assert result.conversation is not None
        return SimulationResult(
            conversation_id=result.conversation.id,
            revision_id=result.conversation.pinned_revision_id,
            session_type=result.conversation.session_type,
            transcript=list(result.turns),
            outcome="completed" if result.stopped is None else result.stopped.reason,
            stopped=result.stopped,
        )

    @get("/usage")
    async def usage(self, gateway: Gateway) -> Usage:
        counts = await gateway.store.usage()
        return Usage(
            conversations={
                k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("conversations:")
            },
            turns={k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("turns:")},
        )
