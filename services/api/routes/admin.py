"""Identity, end users, agents and revisions, API keys."""

from __future__ import annotations

from typing import Annotated, TypeVar

import msgspec
from litestar import Controller, delete, get, post
from litestar.params import Parameter

from services.api.auth import KeyRing, sees_only_its_own
from services.api.gateway import Gateway
from services.api.schemas import (
    ApiKeyInfo,
    CreateAgent,
    CreateApiKey,
    CreatedApiKey,
    ErasedEndUser,
    ItemList,
    LinkIdentity,
    ResolvedIdentity,
    ResolveIdentity,
    RevisionSpec,
    WhoAmI,
)
from shared.envelopes import EraseEndUser, Event
from shared.errors import InvalidRequest, NotFound
from shared.events import EndUserIdentityLinked, IdentityRef
from shared.identity import kind_for_channel, make_identifier, normalize_phone
from shared.ids import new_id
from shared.models import (
    Agent,
    ApiKey,
    EndUser,
    HttpRuntimeConfig,
    OpenAIRuntimeConfig,
    Revision,
    ToolSpec,
    utcnow,
)

KeyView = TypeVar("KeyView", ApiKeyInfo, CreatedApiKey, WhoAmI)


class IdentityController(Controller):
    path = "/v1"
    opt = {"scope": "client"}
    tags = ["identity"]

    @post("/identity/resolve", status_code=200)
    async def resolve(self, data: ResolveIdentity, gateway: Gateway) -> ResolvedIdentity:
        ident = make_identifier(kind_for_channel(data.channel), data.identifier)
        user_id, created = await gateway.store.resolve_identity(ident.kind, ident.normalized)
        return ResolvedIdentity(end_user_id=user_id, created=created)

    @post("/identity/link", status_code=200, opt={"scope": "operator", "errors": (404, 409)})
    async def link(self, data: LinkIdentity, gateway: Gateway, caller: ApiKey) -> EndUser:
        """Link an identity to an existing end user, so the same person is known on that channel
        too (audited as `end_user.identity_linked`). An identifier that already belongs to another
        end user is 409 `identity_conflict` naming both, never a merge; linking twice is a no-op."""
        ident = make_identifier(kind_for_channel(data.channel), data.identifier)
        user, _ = await gateway.store.link_identity(data.end_user_id, ident.kind, ident.normalized)
        await gateway.audit(
            EndUserIdentityLinked(
                end_user_id=user.id, identity=IdentityRef(kind=ident.kind, value=ident.normalized)
            ),
            f"{user.id}|{ident.kind}|{ident.normalized}",
            caller.id,
        )
        return user

    @get("/end-users/{end_user_id:str}")
    async def end_user(self, end_user_id: str, gateway: Gateway, caller: ApiKey) -> EndUser:
        """A client key with `own` visibility sees only end users it opened a conversation with."""
        if sees_only_its_own(caller) and not await gateway.store.key_opened_conversation_with(
            caller.id, end_user_id
        ):
            raise NotFound(
                f"end user {end_user_id} not found", details={"end_user_id": end_user_id}
            )
        return await gateway.store.get_end_user(end_user_id)

    @delete("/end-users/{end_user_id:str}", status_code=200, opt={"scope": "admin"})
    async def erase_end_user(
        self, end_user_id: str, gateway: Gateway, caller: ApiKey
    ) -> ErasedEndUser:
        """Erase the end user: their conversations (turns, originals, delivery records and
        addresses), identities and record, in Valkey and in the messages JetStream still holds.
        What remains is an `end_user.erased` event with these counts."""
        result = await gateway.run(
            "erase_end_user",
            EraseEndUser(end_user_id=end_user_id, actor=caller.id),
            timeout=gateway.settings.erasure_timeout_seconds,
        )
        return ErasedEndUser(end_user_id=end_user_id, **result.counts)

    @get("/erasures", opt={"scope": "admin"})
    async def erasures(
        self, gateway: Gateway, limit: Annotated[int, Parameter(ge=1, le=1000)] = 100
    ) -> ItemList[Event]:
        """The erasure log, newest first: `end_user.erased` and `conversation.erased` events with
        ids and counts, never personal data."""
        return ItemList(items=await gateway.store.erasures(limit))


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


def _runtime_settings(
    spec: RevisionSpec,
) -> tuple[HttpRuntimeConfig | None, OpenAIRuntimeConfig | None, dict[str, str]]:
    """The runtime's settings as stored, and the write-only secrets kept apart from them."""
    if spec.runtime in ("http", "openai") and getattr(spec, spec.runtime) is None:
        raise InvalidRequest(
            f"runtime {spec.runtime} needs its settings in `{spec.runtime}`",
            details={"field": spec.runtime, "reason": "missing_runtime_settings"},
        )
    names = [tool.name for tool in spec.tools]
    if len(set(names)) != len(names):
        raise InvalidRequest(
            "tool names must be unique", details={"field": "tools", "reason": "duplicate_tool"}
        )
    secrets = {f"tool:{t.name}": t.secret for t in spec.tools if t.secret}
    http = openai = None
    if spec.runtime == "http" and spec.http is not None:
        http = HttpRuntimeConfig(url=spec.http.url, timeout_seconds=spec.http.timeout_seconds)
        if spec.http.secret:
            secrets["http"] = spec.http.secret
    if spec.runtime == "openai" and spec.openai is not None:
        openai = msgspec.convert(msgspec.to_builtins(spec.openai), OpenAIRuntimeConfig)
    return http, openai, secrets


async def _add_revision(gateway: Gateway, agent: Agent, spec: RevisionSpec) -> Revision:
    http, openai, secrets = _runtime_settings(spec)
    number = await gateway.store.next_revision_number(agent.id)
    defaults = Revision(id="", agent_id=agent.id, number=number, created_at=utcnow())
    revision = Revision(
        id=new_id("rev"),
        agent_id=agent.id,
        number=number,
        runtime=spec.runtime,
        http=http,
        openai=openai,
        created_at=utcnow(),
        knowledge_base=spec.knowledge_base,
        tools=tuple(
            ToolSpec(
                name=t.name,
                description=t.description,
                parameters=t.parameters,
                url=t.url,
                timeout_seconds=t.timeout_seconds,
            )
            for t in spec.tools
        ),
        policies=tuple(spec.policies),
        greeting=spec.greeting or defaults.greeting,
        fallback=spec.fallback or defaults.fallback,
        voice_greeting=spec.voice_greeting,
        sms_help_text=spec.sms_help_text,
        human_queue_number=(
            normalize_phone(spec.human_queue_number) if spec.human_queue_number else None
        ),
        holding_message=spec.holding_message or defaults.holding_message,
        waiting_message=spec.waiting_message or defaults.waiting_message,
        on_unclaimed=spec.on_unclaimed,
        unclaimed_message=spec.unclaimed_message or defaults.unclaimed_message,
    )
    await gateway.store.put_revision(revision, secrets)
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
    async def create_key(self, data: CreateApiKey, keyring: KeyRing) -> CreatedApiKey:
        if data.expires_at is not None and data.expires_at <= utcnow():
            raise InvalidRequest(
                "expires_at must be in the future",
                details={"expires_at": data.expires_at.isoformat()},
            )
        client_only = all(s == "client" for s in data.scopes)
        if data.visibility == "own" and not client_only:
            raise InvalidRequest(
                "visibility own applies to client keys; operator and admin keys see everything",
                details={"scopes": list(data.scopes)},
            )
        visibility = data.visibility or ("own" if client_only else "all")
        key, secret = await keyring.create(
            data.name,
            tuple(data.scopes),
            expires_at=data.expires_at,
            visibility=visibility,
            display_name=data.display_name,
        )
        return _shown(key, CreatedApiKey, key=secret)

    @get("/api-keys")
    async def list_keys(self, gateway: Gateway) -> ItemList[ApiKeyInfo]:
        return ItemList(
            items=[
                _shown(key, ApiKeyInfo, last_used_at=last_used)
                for key, last_used in await gateway.store.list_api_keys()
            ]
        )

    @delete("/api-keys/{key_id:str}", status_code=204)
    async def revoke_key(self, key_id: str, gateway: Gateway, keyring: KeyRing) -> None:
        """Revoke a key: from now on it answers 401 `key_revoked`, on every API replica."""
        await gateway.store.revoke_api_key(key_id)
        keyring.forget(key_id)
        await gateway.bus.publish_core(gateway.subjects.key_revoked, key_id.encode())

    @get("/whoami", opt={"scope": "client"})
    async def whoami(self, caller: ApiKey) -> WhoAmI:
        return _shown(caller, WhoAmI)


def _shown(record: ApiKey, view: type[KeyView], /, **extra: object) -> KeyView:
    """The key as a response shows it: the fields `view` declares, plus `extra`. The record holds
    no secret to leak (the store keeps the secret's hash apart from it)."""
    return msgspec.convert({**msgspec.structs.asdict(record), **extra}, view)
