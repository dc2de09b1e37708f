"""The routing table: which agent answers at each of our phone numbers and email addresses."""

from __future__ import annotations

from litestar import Controller, delete, get, put

from services.api.gateway import Gateway
from services.api.schemas import ItemList, PutRoute
from shared.errors import InvalidRequest
from shared.identity import route_address
from shared.models import Route, utcnow


class RouteController(Controller):
    path = "/v1/routes"
    tags = ["routing"]

    @get("/")
    async def list_routes(self, gateway: Gateway) -> ItemList[Route]:
        return ItemList(items=await gateway.store.list_routes())

    @put("/{address:str}", status_code=200, opt={"errors": (422,)})
    async def put_route(self, address: str, data: PutRoute, gateway: Gateway) -> Route:
        """Route channel traffic to `address` — one of our phone numbers (SMS and calls), an
        email address, or `@domain` for a whole email domain — to an agent. New conversations
        there pin that agent's active revision; running ones keep theirs."""
        kind, key = route_address(address)
        agent = await gateway.store.get_agent(data.agent_id)
        if agent.active_revision_id is None:
            raise InvalidRequest(
                f"agent {agent.id} has no active revision", details={"agent_id": agent.id}
            )
        route = Route(address=key, kind=kind, agent_id=agent.id, updated_at=utcnow())
        await gateway.store.put_route(route)
        return route

    @get("/{address:str}", opt={"errors": (422,)})
    async def get_route(self, address: str, gateway: Gateway) -> Route:
        return await gateway.store.get_route(route_address(address)[1])

    @delete("/{address:str}", status_code=204, opt={"errors": (422,)})
    async def delete_route(self, address: str, gateway: Gateway) -> None:
        """Traffic to `address` goes to the default agent again (`SWITCHBOARD_DEFAULT_AGENT`)."""
        await gateway.store.delete_route(route_address(address)[1])
