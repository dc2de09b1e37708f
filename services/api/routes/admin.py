"""Identity, end users, agents and revisions, API keys."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post

from services.api.auth import KeyRing
from services.api.gateway import Gateway
from services.api.schemas import (
    CreateAgent,
    CreateApiKey,
    CreatedApiKey,
    ItemList,
    ResolvedIdentity,
    ResolveIdentity,
    RevisionSpec,
    WhoAmI,
)
from shared.errors import NotFound
from shared.identity import kind_for_channel, make_identifier
from shared.ids import new_id
from shared.models import Agent, EndUser, Revision, utcnow


class IdentityController(Controller):
    path = "/v1"
    opt = {"scope": "client"}
    tags = ["identity"]

    @post("/identity/resolve", status_code=200)
    async def resolve(self, data: ResolveIdentity, gateway: Gateway) -> ResolvedIdentity:
        ident = make_identifier(kind_for_channel(data.channel), data.identifier)
        user_id, created = await gateway.store.resolve_identity(ident.kind, ident.normalized)
        return ResolvedIdentity(end_user_id=user_id, created=created)

    @get("/end-users/{end_user_id:str}")
    async def end_user(self, end_user_id: str, gateway: Gateway) -> EndUser:
        return await gateway.store.get_end_user(end_user_id)


class AgentController(Controller):
    path = "/v1/agents"
    tags = ["agents"]

    @post("/", status_code=201)
    async def create(self, data: CreateAgent, gateway: Gateway) -> Agent:
        agent = Agent(id=new_id("agent"), name=data.name, created_at=utcnow())
        await gateway.store.put_agent(agent)
        if data.revision is not None:
            revision = await _add_revision(gateway, agent, data.revision)
            if data.revision.activate:
                agent = await _activate(gateway, agent, revision.id)
        return agent

    @get("/", opt={"scope": "client"})
    async def list_agents(self, gateway: Gateway) -> ItemList[Agent]:
        return ItemList(items=await gateway.store.list_agents())

    @get("/{agent_id:str}", opt={"scope": "client"})
    async def get_agent(self, agent_id: str, gateway: Gateway) -> Agent:
        return await gateway.store.get_agent(agent_id)

    @post("/{agent_id:str}/revisions", status_code=201)
    async def create_revision(
        self, agent_id: str, data: RevisionSpec, gateway: Gateway
    ) -> Revision:
        agent = await gateway.store.get_agent(agent_id)
        revision = await _add_revision(gateway, agent, data)
        if data.activate:
            await _activate(gateway, agent, revision.id)
        return revision

    @get("/{agent_id:str}/revisions", opt={"scope": "client"})
    async def list_revisions(self, agent_id: str, gateway: Gateway) -> ItemList[Revision]:
        await gateway.store.get_agent(agent_id)
        return ItemList(items=await gateway.store.list_revisions(agent_id))

    @post("/{agent_id:str}/revisions/{revision_id:str}/activate", status_code=200)
    async def activate(self, agent_id: str, revision_id: str, gateway: Gateway) -> Agent:
        agent = await gateway.store.get_agent(agent_id)
        revision = await gateway.store.get_revision(revision_id)
        if revision.agent_id != agent.id:
            raise NotFound(f"revision {revision_id} not found for agent {agent_id}")
        return await _activate(gateway, agent, revision.id)


async def _add_revision(gateway: Gateway, agent: Agent, spec: RevisionSpec) -> Revision:
    number = await gateway.store.next_revision_number(agent.id)
    defaults = Revision(id="", agent_id=agent.id, number=number, created_at=utcnow())
    revision = Revision(
        id=new_id("rev"),
        agent_id=agent.id,
        number=number,
        runtime=spec.runtime,
        created_at=utcnow(),
        knowledge_base=spec.knowledge_base,
        tools=tuple(spec.tools),
        policies=tuple(spec.policies),
        greeting=spec.greeting or defaults.greeting,
        fallback=spec.fallback or defaults.fallback,
    )
    await gateway.store.put_revision(revision)
    return revision


async def _activate(gateway: Gateway, agent: Agent, revision_id: str) -> Agent:
    """New conversations pin this revision; running ones keep the one they were opened with."""
    agent = Agent(
        id=agent.id, name=agent.name, created_at=agent.created_at, active_revision_id=revision_id
    )
    await gateway.store.put_agent(agent)
    return agent


class KeyController(Controller):
    path = "/v1"
    tags = ["api-keys"]

    @post("/api-keys", status_code=201)
    async def create_key(
        self, data: CreateApiKey, request: Request[Any, Any, Any]
    ) -> CreatedApiKey:
        keyring: KeyRing = request.app.state.keyring
        key, secret = await keyring.create(data.name, tuple(data.scopes))
        return CreatedApiKey(id=key.id, name=key.name, scopes=list(key.scopes), key=secret)

    @get("/whoami", opt={"scope": "client"})
    async def whoami(self, request: Request[Any, Any, Any]) -> WhoAmI:
        key = request.state.api_key
        return WhoAmI(id=key.id, name=key.name, scopes=list(key.scopes))
