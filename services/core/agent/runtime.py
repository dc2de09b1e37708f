"""The one interface every runtime implements, and the registry core gets runtimes from.

A runtime turns an `AgentContext` into an `AgentReply`: text, or tool calls it proposes, or a
handoff. It never touches the store or the bus and never runs a tool itself: core decides every
proposed call under the revision's policies (`services/core/agent/steps.py`) and hands the
results back for the runtime's next step. A runtime that cannot answer within the turn's budget
raises `RuntimeFailed`; core then sends the revision's fallback text and records why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from services.core.agent.context import AgentContext
from shared.models import Evidence

log = logging.getLogger("switchboard.core.agent")

# Receives pieces of the reply's text as the runtime produces them (for SSE clients).
DeltaSink = Callable[[str], Awaitable[None]]


class ProposedToolCall(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: dict[str, Any] = {}
    id: str | None = None  # the runtime's own id for the call (OpenAI's `tool_call_id`)


class AgentReply(msgspec.Struct, frozen=True, kw_only=True):
    text: str = ""
    tool_calls: tuple[ProposedToolCall, ...] = ()
    handoff: bool = False
    evidence: tuple[Evidence, ...] = ()
    # True when the text already went to `on_delta` piece by piece as it was produced.
    streamed: bool = False


class RuntimeFailed(Exception):
    """The runtime gave no usable answer within the turn's budget (every attempt failed)."""

    def __init__(self, reason: str, attempts: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


class Runtime(Protocol):
    # False for runtimes that ignore history and identities, so core skips reading them.
    wants_history: bool

    async def reply(
        self, context: AgentContext, on_delta: DeltaSink | None = None
    ) -> AgentReply: ...


@dataclass(frozen=True)
class Budget:
    """How long one turn may spend on its runtime, and the pause between failed attempts."""

    turn_seconds: float = 20.0
    retry_backoff_seconds: float = 0.25


class AttemptFailed(Exception):
    """One attempt at a bot or a model failed; `retryable` unless the other side said no (4xx)."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Attempts:
    """How a runtime calls its bot or model: each attempt bounded by `timeout`, retried with
    backoff while the turn's `budget` lasts. An exception of one of the `failures` types (the
    client library's transport and protocol errors) is a failed, retryable attempt named by its
    type; an attempt raises `AttemptFailed` itself for anything it judges otherwise."""

    budget: Budget
    timeout: float
    failures: tuple[type[Exception], ...] = ()

    async def within_budget(
        self, attempt: Callable[[list[str]], Awaitable[AgentReply]], *, conversation_id: str
    ) -> AgentReply:
        async def named(sent: list[str]) -> AgentReply:
            try:
                return await attempt(sent)
            except self.failures as exc:
                raise AttemptFailed(type(exc).__name__) from exc

        return await retry_within_budget(
            self.budget, self.timeout, named, conversation_id=conversation_id
        )


async def retry_within_budget(
    budget: Budget,
    attempt_timeout: float,
    attempt: Callable[[list[str]], Awaitable[AgentReply]],
    *,
    conversation_id: str,
) -> AgentReply:
    """Run `attempt` until it answers, retrying with backoff while the turn's budget lasts.

    `attempt` appends every piece it streamed to clients to the list it is given: once pieces
    went out, a failure is final (a retry would show them twice). An attempt the budget cut
    short that then timed out does not hide the reason the earlier attempts failed.
    """
    deadline = time.monotonic() + budget.turn_seconds
    backoff = budget.retry_backoff_seconds
    attempts, reason = 0, ""
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        sent: list[str] = []
        try:
            return await asyncio.wait_for(attempt(sent), timeout=min(attempt_timeout, remaining))
        except AttemptFailed as exc:
            failure = exc
        except TimeoutError:
            failure = AttemptFailed("timeout")
        if not (failure.reason == "timeout" and remaining < attempt_timeout and reason):
            reason = failure.reason
        log.info(
            "agent attempt failed",
            extra={"conversation_id": conversation_id, "error": failure.reason},
        )
        if not failure.retryable:
            raise RuntimeFailed(reason, attempts)
        if sent:
            raise RuntimeFailed(f"stream broken: {reason}", attempts)
        if deadline - time.monotonic() <= backoff:
            raise RuntimeFailed(reason, attempts)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)
