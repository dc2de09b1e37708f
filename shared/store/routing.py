"""The routing table: which agent answers channel traffic to each of our numbers and addresses.

A phone number routes SMS and calls to it; an email address routes mail to it; `@domain` routes
every address of that domain without a route of its own. Traffic to an unrouted address goes to
the gateway's default agent. Channel services read the answering agent's active revision for what
they say on its behalf (greeting, HELP text).
"""

from __future__ import annotations

from shared.models import Agent, Revision, Route
from shared.store.collection import Aggregate, Codec, encode, not_found

_route = Codec(Route)
_agent = Codec(Agent)
_revision = Codec(Revision)


def _candidates(address: str) -> list[str]:
    """An address's own route first, then its email domain's."""
    if "@" not in address:
        return [address]
    address = address.casefold()
    return [address, "@" + address.rpartition("@")[2]]


class Routes(Aggregate):
    async def put_route(self, route: Route) -> None:
        await self._r.hset(self._k.routes(), route.address, encode(route))

    async def get_route(self, address: str) -> Route:
        raw = await self._r.hget(self._k.routes(), address)
        if not raw:
            raise not_found("route", address, "address")
        return _route.decode(raw)

    async def list_routes(self) -> list[Route]:
        routes = _route.decode_present((await self._r.hgetall(self._k.routes())).values())
        return sorted(routes, key=lambda r: r.address)

    async def delete_route(self, address: str) -> None:
        if not await self._r.hdel(self._k.routes(), address):
            raise not_found("route", address, "address")

    async def routed_agent(self, address: str | None) -> str | None:
        """The agent routed for traffic to `address` (ours), or None: the default answers."""
        if not address:
            return None
        for raw in await self._r.hmget(self._k.routes(), _candidates(address)):
            if raw:
                return _route.decode(raw).agent_id
        return None

    async def answering_revision(self, address: str | None, default_agent: str) -> Revision | None:
        """The active revision of the agent that answers at `address` (routed, else the default);
        None when that agent or its revision is missing (callers then use their settings)."""
        agent_id = await self.routed_agent(address) or default_agent
        agent = await self._decoded(self._k.agent(agent_id), _agent)
        if agent is None or agent.active_revision_id is None:
            return None
        return await self._decoded(self._k.revision(agent.active_revision_id), _revision)
