"""Compiled runtimes, one per revision, and the HTTP client they and the tools share.

Revisions are immutable, so a runtime (and the revision's knowledge index) is built once per
revision id and kept, with the revision's write-only secrets (the bot's and each tool's signing
key), read from the store once by core. Core owns one `Runtimes` and closes it on shutdown.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httpx

from services.core.agent.builtin import BuiltinRuntime
from services.core.agent.context import AgentContext, ToolInfo
from services.core.agent.http_runtime import HttpRuntime
from services.core.agent.knowledge import KnowledgeIndex
from services.core.agent.runtime import AgentReply, Budget, DeltaSink, Runtime, RuntimeFailed
from services.core.agent.tools import ToolRunner, offered_tools
from shared.models import Revision

if TYPE_CHECKING:
    from services.core.agent.openai_runtime import OpenAIRuntime


class Misconfigured:
    """A revision whose runtime lacks its settings (written around the API): every turn fails
    over to the fallback, with the reason on record."""

    wants_history = False

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def reply(self, context: AgentContext, on_delta: DeltaSink | None = None) -> AgentReply:
        raise RuntimeFailed(self.reason)


class HttpClients:
    """The HTTP clients bots and tools are called through, taken in turn.

    httpx pools 100 connections by default: with a slow bot that would make the 101st
    conversation in flight wait for another's answer, which per-conversation concurrency exists
    to avoid. And httpcore scans every connection of its pool for each request it places, so
    one pool of hundreds of busy connections spends most of core's CPU there (measured: 400
    concurrent calls to a 1 s bot, half of core's CPU in the pool's bookkeeping); shards of a
    few dozen keep that cheap while allowing 2,000 connections in all.
    """

    def __init__(self, shards: int = 32, connections_each: int = 64) -> None:
        self._clients = [
            httpx.AsyncClient(
                timeout=30.0,
                limits=httpx.Limits(max_connections=connections_each, max_keepalive_connections=8),
            )
            for _ in range(shards)
        ]
        self._next = itertools.cycle(self._clients)

    def __call__(self) -> httpx.AsyncClient:
        return next(self._next)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class Runtimes:
    def __init__(self, budget: Budget | None = None) -> None:
        self.budget = budget or Budget()
        self.http = HttpClients()
        self.tools = ToolRunner(self.http, self.budget.retry_backoff_seconds)
        self._runtimes: dict[str, Runtime] = {}
        self._secrets: dict[str, dict[str, str]] = {}
        self._openai: list[OpenAIRuntime] = []  # to close their clients
        self._indexes: dict[str, KnowledgeIndex | None] = {}
        self._tools: dict[str, tuple[ToolInfo, ...]] = {}

    async def for_revision(
        self, revision: Revision, secrets: Callable[[], Awaitable[dict[str, str]]]
    ) -> Runtime:
        runtime = self._runtimes.get(revision.id)
        if runtime is None:
            needs_secrets = revision.runtime == "http" or any(t.url for t in revision.tools)
            self._secrets[revision.id] = await secrets() if needs_secrets else {}
            runtime = self._runtimes[revision.id] = self._build(revision)
        return runtime

    def secrets_of(self, revision_id: str) -> dict[str, str]:
        return self._secrets.get(revision_id, {})

    def _build(self, revision: Revision) -> Runtime:
        match revision.runtime:
            case "builtin":
                return BuiltinRuntime(revision)
            case "http":
                if revision.http is None:
                    return Misconfigured("revision has no http settings")
                secret = self._secrets.get(revision.id, {}).get("http", "")
                return HttpRuntime(revision.http, secret, self.http, self.budget)
            case "openai":
                if revision.openai is None:
                    return Misconfigured("revision has no openai settings")
                # Imported on first use: the SDK (pydantic and all) adds seconds to every core
                # start on a busy host, and most deployments never run a model here.
                from services.core.agent.openai_runtime import OpenAIRuntime

                runtime = OpenAIRuntime(revision.openai, self.budget)
                self._openai.append(runtime)
                return runtime

    def index_for(self, revision: Revision) -> KnowledgeIndex | None:
        if revision.id not in self._indexes:
            kb = revision.knowledge_base
            self._indexes[revision.id] = KnowledgeIndex(kb) if kb else None
        return self._indexes[revision.id]

    def tools_of(self, revision: Revision) -> tuple[ToolInfo, ...]:
        """The revision's tools as offered to runtimes (parameters as JSON schemas)."""
        tools = self._tools.get(revision.id)
        if tools is None:
            tools = self._tools[revision.id] = offered_tools(revision)
        return tools

    async def aclose(self) -> None:
        for runtime in self._openai:
            await runtime.close()
        await self.http.aclose()
